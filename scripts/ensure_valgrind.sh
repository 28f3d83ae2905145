#!/usr/bin/env bash
# valgrind counts the instructions a server runs per call (`make bench-instructions`, and the test that
# counts the no-op server's). Install it where apt-get can; otherwise say how.
set -u

command -v callgrind_control >/dev/null && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing valgrind (apt-get install valgrind)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; } >/dev/null 2>&1
fi
if ! command -v callgrind_control >/dev/null; then
  echo "valgrind not found: install Debian's valgrind (apt-get install -y valgrind);" \
    "make bench-instructions needs it and its test skips (fails under CI=true)"
fi
exit 0

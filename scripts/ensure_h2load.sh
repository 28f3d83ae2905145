#!/usr/bin/env bash
# h2load, from Debian's nghttp2-client, is the benchmark's load generator (`make bench`, and the test
# that runs the harness in a tiny mode). Install it where apt-get can; otherwise say how.
set -u

command -v h2load >/dev/null && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing h2load (apt-get install nghttp2-client)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client; } >/dev/null 2>&1
fi
if ! command -v h2load >/dev/null; then
  echo "h2load not found: install Debian's nghttp2-client (apt-get install -y nghttp2-client);" \
    "make bench needs it and its test skips (fails under CI=true)"
fi
exit 0

#!/usr/bin/env bash
# `buf breaking` for protos/ against a base that exists in any clone CI may get:
#   on a branch:  the merge base with main (or origin/main), so other people's changes on main don't count;
#   on main:      the previous commit (HEAD~1), the contract as it was before this commit.
# The base's protos are exported with `git archive`, so buf needs no access to the repository's refs.
# With no base at all (a first commit, or a shallow clone), there is nothing to compare: it says so.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF="${BUF:-.venv/bin/buf}"

main_ref=""
for candidate in main origin/main; do
  if git rev-parse --verify -q "$candidate^{commit}" >/dev/null; then main_ref="$candidate"; break; fi
done

base=""
if [ -n "$main_ref" ] && [ "$(git rev-parse HEAD)" != "$(git rev-parse "$main_ref")" ]; then
  base="$(git merge-base HEAD "$main_ref" || true)"
fi
if [ -z "$base" ] || [ "$base" = "$(git rev-parse HEAD)" ]; then
  base="$(git rev-parse -q --verify 'HEAD~1^{commit}' || true)"
fi
if [ -z "$base" ]; then
  echo "buf breaking: no earlier commit to compare with; skipped"
  exit 0
fi
if ! git cat-file -e "$base:protos" 2>/dev/null; then
  echo "buf breaking: $base has no protos/; skipped"
  exit 0
fi

against="$(mktemp -d)"
trap 'rm -rf "$against"' EXIT
git archive "$base" protos buf.yaml | tar -x -C "$against"
echo "buf breaking: protos/ against $(git rev-parse --short "$base")"
"$BUF" breaking --against "$against"

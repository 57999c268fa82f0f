#!/usr/bin/env bash
# buf lint, buf format and buf breaking on proto/, with buf from the npm
# package @bufbuild/buf (which carries the binary).
#
# buf breaking compares proto/ with an earlier proto/ of this repository:
# $KONGTIE_BUF_AGAINST when set (any git ref), else the newest tag v*
# (the released contract), else the parent commit, HEAD~1 (the proto as
# last merged before this commit; a fresh clone has the whole history).
# Until a release is tagged, a change that lands as several commits is
# compared at its last step only.
set -euo pipefail
cd "$(dirname "$0")/.."
buf=.tools/node_modules/.bin/buf
if ! [ -x "$buf" ] || [ "$("$buf" --version)" != "1.75.0" ]; then
  npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0
fi
cd proto
echo "buf $("../$buf" --version): lint"
"../$buf" lint
echo "buf format --diff --exit-code"
"../$buf" format --diff --exit-code
against=${KONGTIE_BUF_AGAINST:-$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null || echo HEAD~1)}
# A shallow clone (CI's usual depth 1) has neither tags nor parent: that is
# no reason to skip the check silently.
if ! git rev-parse --verify --quiet "$against^{commit}" >/dev/null \
  && [ "$(git rev-parse --is-shallow-repository)" = true ]; then
  echo "buf breaking: a shallow clone; fetching the history to compare with"
  git fetch --quiet --unshallow --tags 2>/dev/null || git fetch --quiet --deepen=1 2>/dev/null || true
  [ -z "${KONGTIE_BUF_AGAINST:-}" ] && against=$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null || echo HEAD~1)
fi
if ! git rev-parse --verify --quiet "$against^{commit}" >/dev/null \
  && [ "$(git rev-parse --is-shallow-repository)" = true ]; then
  echo "buf breaking: $against is not in this shallow clone: fetch the history (git fetch --unshallow --tags) or set KONGTIE_BUF_AGAINST" >&2
  exit 1
fi
if git rev-parse --verify --quiet "$against^{commit}" >/dev/null && git cat-file -e "$against:proto" 2>/dev/null; then
  base=$(mktemp -d)
  trap 'rm -rf "$base"' EXIT
  git -C .. archive "$against" proto | tar -x -C "$base"
  echo "buf breaking --against $against ($(git rev-parse --short "$against"))"
  "../$buf" breaking --against "$base/proto"
else
  echo "buf breaking: skipped, $against has no proto/"
fi
echo "buf: OK"

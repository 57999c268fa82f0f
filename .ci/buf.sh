#!/usr/bin/env bash
# buf lint and buf format on proto/, with buf from the npm package
# @bufbuild/buf (which carries the binary).
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
echo "buf: OK"

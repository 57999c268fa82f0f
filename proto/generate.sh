#!/usr/bin/env bash
# Generates the kongtie.v1 message and client code of every language into
# gen/<language> with proto/buf.gen.yaml, from local plugins only. buf and
# protoc-gen-es come from npm (installed into .tools when missing); the
# others must be on PATH, and the script names any that is not:
#   Go      protoc-gen-go, protoc-gen-go-grpc  (Debian: protoc-gen-go protoc-gen-go-grpc)
#   Java    protoc, grpc_java_plugin           (Debian: protobuf-compiler protobuf-compiler-grpc-java-plugin)
#   Python  python3 with grpcio-tools          (PyPI: examples/python/requirements.txt)
#           grpc_python_plugin                 (Debian: protobuf-compiler-grpc)
#   PHP     protoc, grpc_php_plugin            (Debian: protobuf-compiler protobuf-compiler-grpc)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools/node_modules/.bin"
if ! [ -x "$tools/buf" ] || [ "$("$tools/buf" --version)" != "1.75.0" ] || ! [ -x "$tools/protoc-gen-es" ]; then
  npm install --silent --no-audit --no-fund --prefix "$root/.tools" @bufbuild/buf@1.75.0 @bufbuild/protoc-gen-es@2.17.0
fi
export PATH="$tools:$PATH"

missing=0
for tool in protoc protoc-gen-go protoc-gen-go-grpc grpc_java_plugin grpc_python_plugin grpc_php_plugin; do
  command -v "$tool" >/dev/null || { echo "generate: $tool is not on PATH" >&2; missing=1; }
done
python3 -c 'import grpc_tools' 2>/dev/null \
  || { echo "generate: python3 ($(command -v python3)) has no grpc_tools: pip install -r examples/python/requirements.txt" >&2; missing=1; }
[ "$missing" = 0 ] || { echo "generate: install what is missing (see the top of $0)" >&2; exit 1; }

cd "$root/proto"
buf generate
for dir in "$root"/gen/*/; do
  echo "generated: gen/$(basename "$dir") ($(find "$dir" -type f | wc -l) files)"
done

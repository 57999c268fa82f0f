#!/usr/bin/env bash
# Generates the kongtie.v1 message and client code into gen/<language> with
# proto/buf.gen.yaml, from local plugins only: every language, or those
# named (`bash proto/generate.sh python java`: go, java, python, es, php).
# buf and protoc-gen-es come from npm (installed into .tools when missing);
# the others must be on PATH, and the script names any that is not:
#   go      protoc-gen-go, protoc-gen-go-grpc  (Debian: protoc-gen-go protoc-gen-go-grpc)
#   java    protoc, grpc_java_plugin           (Debian: protobuf-compiler protobuf-compiler-grpc-java-plugin)
#   python  python3 with grpcio-tools          (PyPI: examples/python/requirements.txt)
#   es      node and npm
#   php     protoc, grpc_php_plugin            (Debian: protobuf-compiler protobuf-compiler-grpc)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
all=(go java python es php)
langs=("$@")
[ "${#langs[@]}" -gt 0 ] || langs=("${all[@]}")

missing=0
need() { command -v "$1" >/dev/null || { echo "generate: $1 is not on PATH" >&2; missing=1; }; }
for lang in "${langs[@]}"; do
  case "$lang" in
    go) need protoc-gen-go; need protoc-gen-go-grpc ;;
    java) need protoc; need grpc_java_plugin ;;
    python)
      python3 -c 'import grpc_tools' 2>/dev/null || {
        echo "generate: python3 ($(command -v python3)) has no grpc_tools: pip install -r examples/python/requirements.txt" >&2
        missing=1
      } ;;
    es) need node; need npm ;;
    php) need protoc; need grpc_php_plugin ;;
    *) echo "generate: no language $lang (one of: ${all[*]})" >&2; exit 2 ;;
  esac
done
[ "$missing" = 0 ] || { echo "generate: install what is missing (see the top of $0)" >&2; exit 1; }

tools="$root/.tools/node_modules/.bin"
if ! [ -x "$tools/buf" ] || [ "$("$tools/buf" --version)" != "1.75.0" ] || ! [ -x "$tools/protoc-gen-es" ]; then
  npm install --silent --no-audit --no-fund --prefix "$root/.tools" @bufbuild/buf@1.75.0 @bufbuild/protoc-gen-es@2.17.0
fi
export PATH="$tools:$PATH"

cd "$root/proto"
template=buf.gen.yaml
if [ "${#langs[@]}" -lt "${#all[@]}" ]; then
  # The template's plugins whose `out` is one of the languages asked for.
  template=$(mktemp "$root/proto/.buf.gen.XXXXXX.yaml")
  trap 'rm -f "$template"' EXIT
  awk -v want=" ${langs[*]} " '
    /^plugins:/ { print; inside = 1; next }
    !inside { print; next }
    /^  #/ { next }
    /^  - / { flush(); block = $0 "\n"; next }
    { block = block $0 "\n" }
    END { flush() }
    function flush(  lang) {
      if (block == "") return
      if (match(block, /out: \.\.\/gen\/[a-z]+/)) {
        lang = substr(block, RSTART + 12, RLENGTH - 12)
        if (index(want, " " lang " ")) printf "%s", block
      }
      block = ""
    }
  ' buf.gen.yaml >"$template"
fi
buf generate --template "$template"
for lang in "${langs[@]}"; do
  echo "generated: gen/$lang ($(find "$root/gen/$lang" -type f | wc -l) files)"
done

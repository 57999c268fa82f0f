#!/usr/bin/env bash
# Runs the Python, Node, Java, Go and grpcurl examples (gRPC) and the
# Connect protocol's Node and PHP examples against a live gateway (`serve
# --sandbox` on free ports), and the two-replica walk-through on a fresh
# PostgreSQL database, failing on any wrong answer. The Python, Java and Go
# examples use the code proto/buf.gen.yaml generates into gen/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

echo "== build"
cargo build --quiet
bash .ci/install-grpcurl.sh >/dev/null

echo "== example dependencies (PyPI, npm, Debian's php-cli and php-curl, Java, Go, protoc plugins)"
if ! command -v php >/dev/null || ! php -m | grep -qx curl; then
  apt-get install -y -qq php-cli php-curl >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq php-cli php-curl >/dev/null; }
fi
php --version | head -1
[ -x .tools/venv/bin/python ] || python3 -m venv .tools/venv
.tools/venv/bin/pip install --quiet --disable-pip-version-check -r examples/python/requirements.txt
bash .ci/install-java-go.sh
echo "== generated code (proto/buf.gen.yaml into gen/; gen/go as committed)"
bash .ci/generate.sh
(cd examples/node && npm ci --silent --no-audit --no-fund)
(cd examples/connect-node && npm ci --silent --no-audit --no-fund && npm run --silent generate)

echo "== start the gateway with its sandbox on free ports"
work=$(mktemp -d)
log="$work/gateway.log"
./target/debug/kongtie-gateway serve --sandbox \
  --grpc-addr 127.0.0.1:0 --notify-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
  --sandbox-addr 127.0.0.1:0 --data-dir "$work/data" >"$log" 2>&1 &
gateway=$!
cleanup() {
  kill "$gateway" 2>/dev/null || true
  wait "$gateway" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
addr_of() { grep -m1 "$1" "$log" | sed -E 's/.*addr=([^ ]+).*/\1/'; }
for _ in $(seq 1 100); do
  grep -q "admin listener listening" "$log" && break
  sleep 0.1
done
GRPC=$(addr_of "gRPC listening")
SANDBOX=$(addr_of "sandbox upstream listening")
[ -n "$GRPC" ] && [ -n "$SANDBOX" ] || { cat "$log"; echo "the gateway did not start" >&2; exit 1; }
echo "gRPC on $GRPC, sandbox on $SANDBOX"

status=0
echo "== Python example"
.tools/venv/bin/python examples/python/client.py --grpc "$GRPC" --sandbox "$SANDBOX" || status=1
echo "== Node example"
node examples/node/client.js --grpc "$GRPC" --sandbox "$SANDBOX" || status=1
echo "== Java example (grpc-java from Debian's packages)"
bash examples/java/run.sh --grpc "$GRPC" --sandbox "$SANDBOX" || status=1
echo "== Go example (grpc-go from Debian's packages)"
bash examples/go/run.sh --grpc "$GRPC" --sandbox "$SANDBOX" || status=1
echo "== Connect protocol: Node (@connectrpc/connect-node, HTTP/1.1)"
(cd examples/connect-node && node client.js --gateway "$GRPC" --sandbox "$SANDBOX") || status=1
echo "== Connect protocol: PHP (php-cli, curl extension)"
php examples/php/client.php --gateway "$GRPC" --sandbox "$SANDBOX" || status=1
echo "== grpcurl example"
GRPC=$GRPC SANDBOX=$SANDBOX GRPCURL=.tools/bin/grpcurl bash examples/grpcurl.sh || status=1
echo "== two replicas on PostgreSQL (the README's walk-through)"
BIN=target/debug/kongtie-gateway GRPCURL=.tools/bin/grpcurl bash examples/replicas.sh || status=1

if [ "$status" -ne 0 ]; then
  echo "== gateway log"; cat "$log"
  echo "examples: FAILED" >&2
  exit 1
fi
echo "examples: all OK"

#!/usr/bin/env bash
# The README's two-replica walk-through as a script: two gateways on one
# fresh PostgreSQL database, the sandbox paying through replica A, and a
# subscriber on replica B that must receive the notification.
#
#   bash examples/replicas.sh
#
# PostgreSQL: KONGTIE_TEST_DATABASE_URL (default: the local server, user
# postgres), where this user may CREATE DATABASE; psql must be installed.
# BIN names the gateway binary (default: the release build if there is one,
# as the README builds, else the debug build, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
# grpcurl: $GRPCURL, or on PATH, or .tools/bin/grpcurl, installed there as the
# walk-through does when missing.
if [ -z "${GRPCURL:-}" ]; then
  GRPCURL=$(command -v grpcurl || true)
  if [ -z "$GRPCURL" ]; then
    GRPCURL=.tools/bin/grpcurl
    [ -x "$GRPCURL" ] || bash .ci/install-grpcurl.sh >/dev/null
  fi
fi
if [ -z "${BIN:-}" ]; then
  if [ -x target/release/kongtie-gateway ]; then
    BIN=target/release/kongtie-gateway
  else
    [ -x target/debug/kongtie-gateway ] || cargo build --quiet
    BIN=target/debug/kongtie-gateway
  fi
fi
server=${KONGTIE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
fail() { echo "FAILED: $*" >&2; exit 1; }

db="kongtie_replicas_$$"
store="${server%/*}/$db"
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  psql "$server" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -rf "$work"
}
trap cleanup EXIT
psql "$server" -qc "CREATE DATABASE $db"

ports=(--grpc-addr 127.0.0.1:0 --notify-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0)
"$BIN" serve --sandbox --sandbox-addr 127.0.0.1:0 "${ports[@]}" \
  --data-dir "$work/a" --store "$store" >"$work/a.log" 2>&1 &
pids+=($!)
"$BIN" serve --sandbox --sandbox-addr 127.0.0.1:0 "${ports[@]}" \
  --data-dir "$work/b" --store "$store" >"$work/b.log" 2>&1 &
pids+=($!)
addr_of() { grep -m1 "$2" "$1" | sed -E 's/.*addr=([^ ]+).*/\1/'; }
for log in "$work/a.log" "$work/b.log"; do
  for _ in $(seq 1 100); do
    grep -q "admin listener listening" "$log" && break
    sleep 0.1
  done
  grep -q "admin listener listening" "$log" || { cat "$log"; fail "a replica did not start"; }
done
A=$(addr_of "$work/a.log" "gRPC listening")
B=$(addr_of "$work/b.log" "gRPC listening")
SANDBOX=$(addr_of "$work/a.log" "sandbox upstream listening")
echo "replica A on $A (with the sandbox on $SANDBOX), replica B on $B"

echo "== subscribe on B"
timeout 30 "$GRPCURL" -plaintext -d '{"after_sequence": 0}' "$B" \
  kongtie.v1.Payment/SubscribeNotifications >"$work/sub.json" 2>&1 &
pids+=($!)
sleep 0.5

echo "== an order through A, paid"
"$GRPCURL" -plaintext -max-time 10 \
  -d '{"out_trade_id": "R1001", "amount_fen": 20, "openid": "oeQDZtzvDoD-OmTmyJH6rGAX8odc"}' \
  "$A" kongtie.v1.Payment/CreateJsapiOrder >/dev/null
curl -sf -X POST "http://$SANDBOX/sandbox/orders/R1001/pay" >/dev/null

for _ in $(seq 1 100); do
  grep -q '"outTradeId": "R1001"' "$work/sub.json" && break
  sleep 0.1
done
cat "$work/sub.json"
grep -q '"outTradeId": "R1001"' "$work/sub.json" || fail "B's subscriber did not get R1001"
grep -q '"sequence": "1"' "$work/sub.json" || fail "R1001 is not sequence 1"
echo "replicas example: OK"

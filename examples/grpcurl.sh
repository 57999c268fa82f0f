#!/usr/bin/env bash
# The README's grpcurl walk-through as a script, checking every answer.
# Against `kongtie-gateway serve --sandbox`:
#
#   GRPC=127.0.0.1:50051 SANDBOX=127.0.0.1:8090 bash examples/grpcurl.sh
#
# GRPCURL names the grpcurl binary (default: grpcurl on PATH, else
# .tools/bin/grpcurl from .ci/install-grpcurl.sh); KONGTIE_API_KEY, if set,
# is sent as a Bearer key.
set -euo pipefail
cd "$(dirname "$0")/.."
GRPC=${GRPC:-127.0.0.1:50051}
SANDBOX=${SANDBOX:-127.0.0.1:8090}
GRPCURL=${GRPCURL:-$(command -v grpcurl || echo .tools/bin/grpcurl)}
auth=()
if [ -n "${KONGTIE_API_KEY:-}" ]; then auth=(-H "authorization: Bearer $KONGTIE_API_KEY"); fi

call() { "$GRPCURL" -plaintext -max-time 10 "${auth[@]}" "$@"; }
fail() { echo "FAILED: $*" >&2; exit 1; }
# json EXPR: evaluates a Python expression over the JSON on stdin (as `d`).
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

echo "== services (reflection)"
services=$(call "$GRPC" list)
echo "$services"
for s in kongtie.v1.Auth kongtie.v1.Ticket kongtie.v1.Payment grpc.health.v1.Health; do
  grep -qx "$s" <<<"$services" || fail "$s is not listed"
done

echo "== access token and jsapi_ticket"
[ "$(call "$GRPC" kongtie.v1.Auth/GetAccessToken | json 'len(d["accessToken"]) > 0')" = True ] || fail "no access token"
[ "$(call "$GRPC" kongtie.v1.Ticket/GetJsApiTicket | json 'len(d["ticket"]) > 0')" = True ] || fail "no ticket"

echo "== wx.config"
call -d '{"url": "https://shop.example.com/pay?order=1#top"}' "$GRPC" kongtie.v1.Ticket/SignJsSdkConfig \
  | json 'len(d["signature"]) == 40 or sys.exit("bad signature")'

echo "== authorize URL"
call -d '{"redirect_uri": "https://shop.example.com/cb", "scope": "SCOPE_BASE", "state": "s1"}' \
  "$GRPC" kongtie.v1.Auth/BuildAuthorizeUrl | json 'd["url"].endswith("#wechat_redirect") or sys.exit("bad url")'

echo "== OAuth code exchange"
CODE=$(curl -s -X POST "$SANDBOX/sandbox/oauth/codes" | json 'd["code"]')
call -d "{\"code\": \"$CODE\"}" "$GRPC" kongtie.v1.Auth/ExchangeOAuthCode | json 'd["openid"]'

echo "== order"
ORDER="GC$(date +%s%N | cut -c4-17)"
call -d "{\"out_trade_id\": \"$ORDER\", \"amount_fen\": 20, \"openid\": \"oeQDZtzvDoD-OmTmyJH6rGAX8odc\"}" \
  "$GRPC" kongtie.v1.Payment/CreateJsapiOrder | json 'd["payParams"]["package"]'

echo "== subscribe, pay, receive"
events=$(mktemp)
trap 'rm -f "$events"' EXIT
# A consumer sees every event (its acknowledgement covers all before it):
# other orders' events are skipped below, not filtered away.
"$GRPCURL" -plaintext -max-time 8 "${auth[@]}" -d "{\"consumer\": \"grpcurl-example\"}" \
  "$GRPC" kongtie.v1.Payment/SubscribeNotifications >"$events" 2>&1 &
subscriber=$!
sleep 0.5
curl -s -X POST "$SANDBOX/sandbox/orders/$ORDER/pay"; echo
for _ in $(seq 1 50); do
  grep -q "\"outTradeId\": \"$ORDER\"" "$events" && break
  sleep 0.1
done
kill "$subscriber" 2>/dev/null || true
wait "$subscriber" 2>/dev/null || true
cat "$events"
# Our order's event among the stream's (grpcurl prints one JSON object each):
# paid, for our order and amount. Its sequence is what we acknowledge.
SEQ=$(python3 - "$events" "$ORDER" <<'PY'
import json, sys
text, order = open(sys.argv[1]).read(), sys.argv[2]
decoder, i, ours = json.JSONDecoder(), 0, None
while (i := text.find("{", i)) != -1:
    try:
        event, i = decoder.raw_decode(text, i)
    except ValueError:
        break
    if event.get("outTradeId") == order:
        ours = event
        break
if ours and ours.get("paid") and ours.get("orderCheck") == "ORDER_CHECK_MATCHED":
    print(ours["sequence"])
PY
)
[ -n "$SEQ" ] || fail "the subscriber did not receive $ORDER paid and matching its order"
call -d "{\"consumer\": \"grpcurl-example\", \"sequence\": $SEQ}" "$GRPC" kongtie.v1.Payment/AckNotifications \
  | json 'int(d["ackedSequence"])'

echo "== a work queue: created once, fetch, nak, park, re-drive, ack"
# Starting just before our event; one delivery allowed, so a nak parks it.
call -d "{\"name\": \"grpcurl-worker\", \"deliver_policy\": \"DELIVER_POLICY_AFTER_SEQUENCE\",
          \"after_sequence\": $((SEQ - 1)), \"ack_wait\": \"30s\", \"max_deliver\": 1}" \
  "$GRPC" kongtie.v1.Payment/CreateConsumer | json 'd["consumer"]["kind"]'
fetch_one() {
  call -d '{"consumer": "grpcurl-worker", "max_events": 1, "wait": "5s"}' "$GRPC" kongtie.v1.Payment/FetchNotifications
}
fetch_one | json 'd["events"][0]["notification"]["sequence"] == "'"$SEQ"'" and d["events"][0]["deliveryCount"] == 1 or sys.exit("not our event, first delivery")'
call -d "{\"consumer\": \"grpcurl-worker\", \"sequences\": [$SEQ], \"delivery_counts\": [1]}" \
  "$GRPC" kongtie.v1.Payment/NakNotifications | json 'd["nakked"] == 1 or sys.exit("not handed back")'
call -d '{"name": "grpcurl-worker"}' "$GRPC" kongtie.v1.Payment/GetConsumer \
  | json 'd["consumer"]["parkedSequences"] == ["'"$SEQ"'"] or sys.exit("not parked")'
call -d '{"consumer": "grpcurl-worker"}' "$GRPC" kongtie.v1.Payment/RedriveNotifications \
  | json 'd["redriven"] == 1 or sys.exit("not re-driven")'
fetch_one | json 'd["events"][0]["deliveryCount"] == 2 or sys.exit("not delivered again")'
call -d "{\"consumer\": \"grpcurl-worker\", \"sequences\": [$SEQ]}" "$GRPC" kongtie.v1.Payment/AckNotifications \
  | json 'd["newlyAcked"] == 1 or sys.exit("not acknowledged")'
call "$GRPC" kongtie.v1.Payment/ListConsumers | json '[c["name"] for c in d["consumers"]]'
call -d '{"name": "grpcurl-worker"}' "$GRPC" kongtie.v1.Payment/DeleteConsumer >/dev/null

echo "== bad input names every bad field"
if out=$(call -d '{"out_trade_id": "A-1", "amount_fen": 0, "openid": "oUser"}' "$GRPC" kongtie.v1.Payment/CreateJsapiOrder 2>&1); then
  fail "bad input was accepted"
fi
echo "$out"
grep -q '"field":"out_trade_id"' <<<"$out" || fail "no out_trade_id violation"
grep -q '"field":"amount_fen"' <<<"$out" || fail "no amount_fen violation"

echo "== health"
call "$GRPC" grpc.health.v1.Health/Check | json 'd["status"] == "SERVING" or sys.exit("not serving")'

echo "grpcurl example: OK"

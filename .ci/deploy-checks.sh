#!/usr/bin/env bash
# Checks the deployment files of deploy/ (README "Running in production",
# "Deploying"), each with a real tool, failing loudly:
#   - systemd: `systemd-analyze verify` of the unit (any warning fails) and
#     `systemd-analyze security` (exposure at most 2.0), in a scratch root
#     holding the binary and the env file where the unit expects them;
#   - Kubernetes: `kubectl kustomize` renders deploy/kubernetes/, and
#     kubernetes-validate (PyPI; the API's schemas, offline) validates each
#     object strictly; the Deployment's promises are checked by name;
#   - Prometheus: `promtool check rules`, `promtool test rules` (every alert
#     has a test that fires it), `promtool check config` of the example;
#     every metric the alerts and the Grafana dashboard use is served by a
#     live gateway's /metrics; and a real Prometheus scraping that gateway
#     fires KongtieConsumerStuck (with short windows) on a consumer that
#     does not take its events, and resolves it once the consumer catches up.
# Costs about 35 s (the live alert about 25 s of it) once the tools are installed.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
echo "== deployment files: systemd, Kubernetes, Prometheus alerts and dashboard (.ci/deploy-checks.sh)"
root=$PWD
fail() { echo "deploy-checks: FAILED: $*" >&2; exit 1; }
step() { echo "-- $*"; }
# grep -q in a pipeline may stop reading early and fail it (SIGPIPE, pipefail).
has() { grep -e "$1" >/dev/null; }
trap 'echo "deploy-checks: FAILED: line $LINENO: $BASH_COMMAND" >&2' ERR

step "tools: systemd-analyze, promtool and prometheus (Debian), kubectl, kubernetes-validate (PyPI), grpcurl"
need=()
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v promtool >/dev/null && command -v prometheus >/dev/null || need+=(prometheus)
command -v kubectl >/dev/null || need+=(kubernetes-client)
command -v psql >/dev/null || need+=(postgresql-client)
if [ "${#need[@]}" -gt 0 ]; then
  # Without recommends: no node exporter, no service started beside ours.
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } \
    || fail "could not install ${need[*]}"
fi
venv=.tools/deploy-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
bash .ci/install-grpcurl.sh >/dev/null
grpcurl=$root/.tools/bin/grpcurl
py=$root/$venv/bin/python
if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  cargo build --release --locked --quiet
  bin=$root/target/release/kongtie-gateway
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -z "${db:-}" ] || PGOPTIONS=--client-min-messages=warning \
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# ---------------------------------------------------------------- systemd
step "systemd: systemd-analyze verify and security of deploy/systemd/kongtie-gateway.service"
unit=deploy/systemd/kongtie-gateway.service
sroot=$work/sysroot
mkdir -p "$sroot/usr/local/bin" "$sroot/etc/kongtie" "$sroot/etc/systemd/system" "$sroot/usr/lib"
cp -a /usr/lib/systemd "$sroot/usr/lib/systemd"
ln -s usr/lib "$sroot/lib"
install -m 0755 "$bin" "$sroot/usr/local/bin/kongtie-gateway"
install -m 0640 deploy/kongtie-gateway.env.example "$sroot/etc/kongtie/kongtie-gateway.env"
install -m 0644 "$unit" "$sroot/etc/systemd/system/kongtie-gateway.service"
grep -q '^ExecStart=/usr/local/bin/kongtie-gateway serve --data-dir ${STATE_DIRECTORY}$' "$unit" || fail "the unit's ExecStart moved: update this check"
grep -q '^EnvironmentFile=/etc/kongtie/kongtie-gateway.env$' "$unit" || fail "the unit's EnvironmentFile moved: update this check"
out=$(systemd-analyze verify --root="$sroot" /etc/systemd/system/kongtie-gateway.service 2>&1) \
  || { echo "$out"; fail "systemd-analyze verify"; }
[ -z "$out" ] || { echo "$out"; fail "systemd-analyze verify printed warnings"; }
for key in DynamicUser=yes StateDirectory=kongtie-gateway ProtectSystem=strict NoNewPrivileges=yes \
           Restart=on-failure EnvironmentFile=/etc/kongtie/kongtie-gateway.env; do
  grep -qx "$key" "$unit" || fail "the unit lacks $key"
done
systemd-analyze security --offline=yes --root="$sroot" --threshold=20 \
    /etc/systemd/system/kongtie-gateway.service | tail -n1 \
  || fail "systemd-analyze security: exposure above 2.0"
if [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; then
  echo "PID 1 is systemd, but this check does not install units on the machine it runs on"
else
  echo "PID 1 is $(ps -p 1 -o comm= 2>/dev/null || echo unknown), not systemd: the unit is verified, not started"
fi

# ------------------------------------------------------------- Kubernetes
step "Kubernetes: kubectl kustomize deploy/kubernetes, kubernetes-validate --strict"
kubectl kustomize deploy/kubernetes >"$work/rendered.yaml" 2>"$work/kustomize.err" \
  || { cat "$work/kustomize.err"; fail "kubectl kustomize"; }
objects=()
for f in deploy/kubernetes/*.yaml; do
  [ "$f" = deploy/kubernetes/kustomization.yaml ] || objects+=("$f")
done
"$venv/bin/kubernetes-validate" --strict --quiet "${objects[@]}" "$work/rendered.yaml" \
  || fail "kubernetes-validate"
"$py" - "$work/rendered.yaml" <<'EOF' || fail "the Kubernetes manifests' promises"
import sys, yaml
objs = {d["kind"]: d for d in yaml.safe_load_all(open(sys.argv[1])) if d}
def need(cond, what):
    if not cond:
        sys.exit(f"deploy/kubernetes: {what}")
need(set(objs) >= {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret"}, f"objects are {sorted(objs)}")
dep = objs["Deployment"]
pod = dep["spec"]["template"]
labels = pod["metadata"]["labels"]
need(dep["spec"]["replicas"] == 2, "replicas is not 2")
for sel in (dep["spec"]["selector"]["matchLabels"], objs["Service"]["spec"]["selector"],
            objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
    need(all(labels.get(k) == v for k, v in sel.items()), f"selector {sel} does not select the pods {labels}")
(c,) = pod["spec"]["containers"]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
need(ports.get("admin") == 9090 and ports.get("grpc") == 50051, f"ports {ports}")
need(c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}, "readiness is not /readyz on the admin port")
need(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}, "liveness is not /healthz on the admin port")
secret = objs["Secret"]["metadata"]["name"]
need({"secretRef": {"name": secret}} in c["envFrom"], "the Secret is not in envFrom")
need(objs["Secret"]["stringData"]["KONGTIE_STORE"].startswith("postgres://"), "the Secret's KONGTIE_STORE is not a PostgreSQL URL")
need("KONGTIE_STORE" not in objs["ConfigMap"]["data"], "the database URL is in the ConfigMap")
for k in ("requests", "limits"):
    need({"cpu", "memory"} <= set(c["resources"].get(k, {})), f"resources.{k}")
sc, psc = c["securityContext"], pod["spec"]["securityContext"]
need(psc["runAsNonRoot"] and psc["runAsUser"] == 65532, "the pod is not non-root 65532")
need(sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"],
     "the container's root file system is writable, or it may gain privileges")
grace = int(objs["ConfigMap"]["data"]["KONGTIE_SHUTDOWN_GRACE_SECS"]) + c["lifecycle"]["preStop"]["sleep"]["seconds"]
need(pod["spec"]["terminationGracePeriodSeconds"] > grace, "terminationGracePeriodSeconds leaves no room for the grace")
need(objs["PodDisruptionBudget"]["spec"]["minAvailable"] == 1, "the PodDisruptionBudget")
print("2 replicas on PostgreSQL (URL from the Secret), probes on the admin port, non-root, read-only root,"
      " requests and limits, PodDisruptionBudget minAvailable 1")
EOF

# ------------------------------------------------------------- Prometheus
step "Prometheus: promtool check rules / test rules / check config"
promtool check rules deploy/prometheus/alerts.yml || fail "promtool check rules"
(cd deploy/prometheus && promtool test rules alerts.test.yml) || fail "promtool test rules"
promtool check config --syntax-only deploy/prometheus/prometheus.example.yml >/dev/null \
  || fail "promtool check config deploy/prometheus/prometheus.example.yml"
"$py" - <<'EOF' || fail "an alert without a test that fires it, or a runbook entry"
import re, yaml
rules = [r["alert"] for g in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"] for r in g["rules"]]
tests = yaml.safe_load(open("deploy/prometheus/alerts.test.yml"))["tests"]
fired = {t["alertname"] for x in tests for t in x["alert_rule_test"] if t.get("exp_alerts")}
missing = [r for r in rules if r not in fired]
runbook = open("docs/runbook.md").read()
headings = {h.strip() for h in re.findall(r"^### (.+)$", runbook, flags=re.M)}
no_runbook = [r for r in rules if r not in headings]
for r in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"][0]["rules"]:
    if r["annotations"].get("runbook") != f"docs/runbook.md#{r['alert'].lower()}":
        raise SystemExit(f"{r['alert']}: its runbook annotation is not docs/runbook.md#{r['alert'].lower()}")
if missing or no_runbook:
    raise SystemExit(f"no firing test: {missing}; no runbook section: {no_runbook}")
print(f"{len(rules)} alerts, each fired by a unit test and with a runbook section")
EOF

step "a live gateway on PostgreSQL with its sandbox, and traffic that makes every metric appear"
db=kongtie_deploy_checks
PGOPTIONS=--client-min-messages=warning psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null \
  || fail "PostgreSQL on 127.0.0.1:5432 (run .ci/postgres.sh)"
log=$work/gateway.log
"$bin" serve --sandbox --store "postgres://postgres@127.0.0.1:5432/$db" \
  --grpc-addr 127.0.0.1:0 --notify-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --sandbox-addr 127.0.0.1:0 \
  --data-dir "$work/data" >"$log" 2>&1 &
pids+=($!)
addr_of() { grep -m1 "$1" "$log" | sed -E 's/.*addr=([^ ]+).*/\1/'; }
for _ in $(seq 1 150); do grep -q "admin listener listening" "$log" && break; sleep 0.2; done
GRPC=$(addr_of "gRPC listening"); ADMIN=$(addr_of "admin listener listening")
SANDBOX=$(addr_of "sandbox upstream listening"); NOTIFY=$(addr_of "notify listener listening")
[ -n "$GRPC" ] && [ -n "$ADMIN" ] && [ -n "$SANDBOX" ] && [ -n "$NOTIFY" ] \
  || { cat "$log"; fail "the gateway did not start"; }
grpc() { "$grpcurl" -plaintext -max-time 10 "$@"; }
call() { local m=$1; shift; grpc -d "$@" "$GRPC" "kongtie.v1.Payment/$m"; }

# Waits until CMD succeeds, up to SECS seconds.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "$what: not within ${secs}s"
    sleep 0.5
  done
}

step "a real Prometheus scraping it every second, with alerts.yml (KongtieConsumerStuck's windows made seconds)"
prom_port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PROM=127.0.0.1:$prom_port
"$py" - "$work/rules.yml" <<'EOF'
import sys, yaml
doc = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
for r in doc["groups"][0]["rules"]:
    if r["alert"] == "KongtieConsumerStuck":
        assert "[10m]" in r["expr"] and r["for"] == "10m", r
        r["expr"] = r["expr"].replace("[10m]", "[4s]")
        r["for"] = "3s"
yaml.safe_dump(doc, open(sys.argv[1], "w"), sort_keys=False)
EOF
cat >"$work/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: [$work/rules.yml]
scrape_configs:
  - job_name: kongtie-gateway
    static_configs: [{targets: ['$ADMIN']}]
EOF
promtool check config "$work/prometheus.yml" >/dev/null || fail "the test's Prometheus configuration"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="$PROM" --log.level=warn >"$work/prometheus.log" 2>&1 &
pids+=($!)
prometheus --version 2>&1 | head -n1
query() { curl -sf --max-time 5 "http://$PROM/api/v1/query" --data-urlencode "query=$1"; }
has_result() { query "$1" | "$py" -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["data"]["result"] else 1)'; }
alert_state() {  # the state of KongtieConsumerStuck for consumer "stuck", or "none"
  curl -sf --max-time 5 "http://$PROM/api/v1/alerts" | "$py" -c '
import json, sys
a = [x for x in json.load(sys.stdin)["data"]["alerts"]
     if x["labels"]["alertname"] == "KongtieConsumerStuck" and x["labels"].get("consumer") == "stuck"]
print(a[0]["state"] if a else "none")'
}
wait_for 30 "Prometheus scraping the gateway (up == 1)" has_result 'up{job="kongtie-gateway"} == 1'

# A work queue nobody fetches from: the alert's consumer.
call CreateConsumer '{"name": "stuck", "ack_wait": "30s"}' >/dev/null || fail "CreateConsumer stuck"
wait_for 30 "the consumer's lag, 0, scraped" has_result 'kongtie_consumer_lag{consumer="stuck"} == 0'
sleep 5 # longer than the shortened rule's window and its for: nothing may be pending yet
[ "$(alert_state)" = none ] || fail "KongtieConsumerStuck is $(alert_state) while the consumer has nothing to take"

# Traffic for every metric family (empty ones are not exported at all).
grpc "$GRPC" kongtie.v1.Auth/GetAccessToken >/dev/null || fail "GetAccessToken"
call CreateConsumer '{"name": "wq", "ack_wait": "1s", "max_deliver": 2}' >/dev/null || fail "CreateConsumer wq"
call CreateJsapiOrder '{"out_trade_id": "DC1", "amount_fen": 20, "openid": "oeQDZtzvDoD-OmTmyJH6rGAX8odc"}' >/dev/null \
  || fail "CreateJsapiOrder"
curl -sf -X POST "http://$SANDBOX/sandbox/orders/DC1/pay" >/dev/null || fail "the sandbox did not pay DC1"
wait_for 15 "the notification of DC1 stored" \
  bash -c "'$grpcurl' -plaintext -d '{\"out_trade_id\": \"DC1\"}' $GRPC kongtie.v1.Payment/ListNotifications | grep DC1"
curl -s -o /dev/null -X POST --data 'not a notification' "http://$NOTIFY/kongtie/payment-notify"
fetch_wq() { call FetchNotifications '{"consumer": "wq", "max_events": 10, "wait": "3s"}'; }
fetch_wq | has '"deliveryCount": 1' || fail "wq's first delivery"
call NakNotifications '{"consumer": "wq", "sequences": [1]}' >/dev/null || fail "NakNotifications"
fetch_wq | has '"deliveryCount": 2' || fail "wq's redelivery"
sleep 1.5 # its lease (ack_wait 1 s) runs out with max_deliver used up: the next fetch parks it
fetch_wq >/dev/null
wait_for 10 "an event parked (kongtie_consumer_parks_total)" \
  bash -c "curl -s http://$ADMIN/metrics | grep '^kongtie_consumer_parks_total{consumer=\"wq\"} 1'"

step "KongtieConsumerStuck fires in Prometheus for the consumer that does not take its event"
deadline=$((SECONDS + 60))
until [ "$(alert_state)" = firing ]; do
  [ "$SECONDS" -lt "$deadline" ] || { tail "$work/prometheus.log"; fail "KongtieConsumerStuck not firing within 60s (state: $(alert_state))"; }
  sleep 1
done
echo "firing after the notification of DC1 was stored and 'stuck' did not fetch it"
call FetchNotifications '{"consumer": "stuck", "max_events": 10, "wait": "1s"}' | has '"outTradeId": "DC1"' \
  || fail "stuck's fetch"
call AckNotifications '{"consumer": "stuck", "sequences": [1]}' | has '"newlyAcked": 1' || fail "stuck's ack"
deadline=$((SECONDS + 60))
until [ "$(alert_state)" = none ]; do
  [ "$SECONDS" -lt "$deadline" ] || fail "KongtieConsumerStuck still $(alert_state) 60s after the consumer caught up"
  sleep 1
done
echo "resolved once 'stuck' fetched and acknowledged it"

step "every metric the alerts and the dashboard use is in the live /metrics"
curl -sf "http://$ADMIN/metrics" >"$work/metrics.txt" || fail "/metrics"
"$py" - "$work/metrics.txt" <<'EOF' || fail "metric names"
import json, re, sys, yaml
live = {l.split("{")[0].split(" ")[0] for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")}
name = re.compile(r"\b((?:kongtie|grpc_server)_[a-z_]+)\b")
used = {}
for g in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"]:
    for r in g["rules"]:
        for n in name.findall(r["expr"]):
            used.setdefault(n, set()).add(f"alerts.yml {r['alert']}")
dash = json.load(open("deploy/grafana/kongtie-gateway.json"))
ids = set()
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
for p in panels(dash["panels"]):
    if p["id"] in ids:
        sys.exit(f"dashboard: panel id {p['id']} twice")
    ids.add(p["id"])
    for t in p.get("targets", []):
        for n in name.findall(t["expr"]):
            used.setdefault(n, set()).add(f"dashboard {p['title']!r}")
for v in dash["templating"]["list"]:
    for n in name.findall(v.get("definition", "")):
        used.setdefault(n, set()).add(f"dashboard variable {v['name']}")
missing = {n: sorted(w) for n, w in used.items() if n not in live}
if missing:
    for n, w in sorted(missing.items()):
        print(f"not in /metrics: {n} (used by {', '.join(w)})")
    sys.exit(1)
unused = sorted({n for n in live} - set(used) - {n for n in live if n.endswith(("_sum", "_count")) and n.rsplit("_", 1)[0] + "_bucket" in used})
print(f"{len(used)} metric names used by the alerts and the dashboard, all in the live /metrics")
if unused:
    print(f"(served but neither alerted on nor charted: {', '.join(unused)})")
EOF

echo "deploy-checks: all OK"

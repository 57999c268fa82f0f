#!/usr/bin/env bash
# Builds the container image from the repository's Dockerfile with podman
# and runs it as README "Running in production" ("Deploying") says, with the
# README's own `docker run` commands (docker is podman here):
#   - `serve --sandbox` with its data on a volume: /readyz, gRPC health and
#     an authenticated call from the host through the published ports;
#   - an order paid by the sandbox, its notification stored, and still there
#     after the container is started again, and in a new container on the
#     same volume;
#   - the process runs as uid 65532, not root;
#   - `podman stop` (SIGTERM) ends it within KONGTIE_SHUTDOWN_GRACE_SECS:
#     exit code 0 and the "stopped" log line;
#   - the production command with the example env file as it is exits 1
#     naming the placeholder to replace, and starts once they are replaced;
#   - the Kubernetes Deployment's pod (deploy/kubernetes/) as podman runs
#     it: its env, user, read-only root and mounts, twice on one PostgreSQL;
#   - the systemd unit started by systemd (PID 1 of a container): dynamic
#     user, sandboxing in force, Restart= after a SIGKILL, a clean stop.
# Registry images cannot be pulled here, so the runtime stage's base is a
# Debian 12 root file system made by debootstrap from the machine's Debian
# mirror, and the build stage is replaced by the release binary built on
# this host (both are documented build inputs of the Dockerfile); the
# runtime stage, the image users run, is the same.
# Costs about 2 min on a fresh machine (debootstrap about 70 s), 40 s after.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
echo "== the container image with podman (.ci/image.sh)"
root=$PWD
export CONTAINERS_CONF="$root/.ci/containers.conf"
fail() { echo "image: FAILED: $*" >&2; exit 1; }
step() { echo "-- $*"; }
# grep -q in a pipeline may stop reading early and fail it (SIGPIPE, pipefail).
has() { grep -e "$1" >/dev/null; }
trap 'echo "image: FAILED: line $LINENO: $BASH_COMMAND" >&2' ERR

step "tools: podman, runc, debootstrap, psql (Debian), grpcurl"
need=()
for pair in podman:podman runc:runc debootstrap:debootstrap psql:postgresql-client; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get install -y -qq "${need[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; } \
    || fail "could not install ${need[*]}"
fi
podman --version
bash .ci/install-grpcurl.sh >/dev/null
grpcurl=$root/.tools/bin/grpcurl
docker() { podman "$@"; }

# The test uses the README's names, a container `kongtie` and a volume
# `kongtie-data`, which are also what a user of the README has made for
# their own gateway: on a machine that holds them, stop rather than delete.
if [ -z "${KONGTIE_CI_REPLACE:-}" ] \
  && { podman container exists kongtie || podman volume exists kongtie-data; }; then
  fail "a container 'kongtie' or a volume 'kongtie-data' exists (yours?): remove them, or set KONGTIE_CI_REPLACE=1 to let this test do it"
fi

if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  step "the release binary (cargo build --release --locked; a no-op after the README's run)"
  cargo build --release --locked --quiet
  bin=$root/target/release/kongtie-gateway
fi

# Debian 12 minbase, plus systemd: the same base also boots systemd as PID 1
# for the unit's test below (one debootstrap instead of two; the gateway's
# runtime stage uses nothing of it but the C library).
base=localhost/kongtie-ci-base:bookworm-systemd
if ! podman image exists "$base"; then
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
  [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  [ -n "$mirror" ] || fail "no Debian mirror found in /etc/apt/sources.list.d/debian.sources or sources.list"
  step "a Debian 12 base image by debootstrap from $mirror"
  rootfs=$(mktemp -d /var/tmp/kongtie-rootfs.XXXXXX)
  debootstrap --variant=minbase --include=systemd,systemd-sysv bookworm "$rootfs" "$mirror" >/dev/null \
    || fail "debootstrap failed"
  tar -C "$rootfs" -c . | podman import --quiet - "$base" >/dev/null
  rm -rf "$rootfs"
fi

# The README's names: a container `kongtie`, a volume `kongtie-data`.
# And the test's own: the Kubernetes pod's two replicas, the systemd host.
remove() {
  podman rm --force --ignore -t 0 kongtie kongtie-pod-a kongtie-pod-b kongtie-systemd >/dev/null 2>&1 || true
  podman volume rm -f kongtie-data >/dev/null 2>&1 || true
}
remove
work=$(mktemp -d)
trap 'remove; rm -rf "$work"' EXIT

step "podman build (Dockerfile; build stage = this host's release binary, runtime base = $base)"
mkdir -p "$work/binary/out/data"
cp "$bin" "$work/binary/out/kongtie-gateway"
strip "$work/binary/out/kongtie-gateway" 2>/dev/null || true
podman build --quiet --build-context build="$work/binary" \
  --build-arg RUNTIME_IMAGE="$base" --target runtime -t kongtie-gateway . >/dev/null \
  || fail "podman build"
podman image inspect -f 'user={{.Config.User}} volumes={{.Config.Volumes}} stop={{.Config.StopSignal}}' kongtie-gateway

# The README's `docker run` commands, continuation lines joined.
readme_run() {
  python3 - "$1" <<'EOF'
import re, sys
text = open("README.md").read()
section = text.split("## Running in production", 1)[1].split("\n## ", 1)[0]
cmds = re.findall(r"^[ \t]*(docker run .*?)(?<!\\)$", section, flags=re.M | re.S)
hits = [c for c in cmds if sys.argv[1] in c]
if len(hits) != 1:
    sys.exit(f"expected one `docker run` command with {sys.argv[1]!r} in README, found {len(hits)}")
print(hits[0])
EOF
}
try_cmd=$(readme_run 'serve --sandbox') || fail "README: the sandbox docker run command"
prod_cmd=$(readme_run '--env-file') || fail "README: the production docker run command"
key=$(sed -nE 's/.*KONGTIE_API_KEYS=([^ ]+).*/\1/p' <<<"$try_cmd")
[ -n "$key" ] || fail "the README's sandbox command sets no KONGTIE_API_KEYS"

# The host ports the README's commands publish: -p [127.0.0.1:]HOST:CONTAINER.
host_port() {  # command, container port
  sed -nE "s/.*-p (127\.0\.0\.1:)?([0-9]+):$2( .*|$)/\2/p" <<<"$1" | head -n1
}
GRPC=127.0.0.1:$(host_port "$try_cmd" 50051)
ADMIN=127.0.0.1:$(host_port "$try_cmd" 9090)
SANDBOX=127.0.0.1:$(host_port "$try_cmd" 8090)
[ "$GRPC:$ADMIN" = "127.0.0.1:$(host_port "$prod_cmd" 50051):127.0.0.1:$(host_port "$prod_cmd" 9090)" ] \
  || fail "the README's two docker run commands publish gRPC and admin on different host ports"
for addr in "$GRPC" "$ADMIN" "$SANDBOX" "127.0.0.1:$(host_port "$prod_cmd" 8080)"; do
  [ "${addr#127.0.0.1:}" ] || fail "a port the README's commands should publish is missing"
  if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then
    fail "$addr is taken on this machine; the README's commands publish it (stop what serves it)"
  fi
done

# Waits until CMD succeeds, up to SECS seconds.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { podman logs kongtie 2>&1 | tail -20; fail "$what: not within ${secs}s"; }
    sleep 0.2
  done
}
ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' "$ADMIN/readyz")" = 200 ]; }
grpc() { "$grpcurl" -plaintext -max-time 10 -H "authorization: Bearer $key" "$@"; }
stored() { grpc -d '{"out_trade_id": "IMG1"}' "$GRPC" kongtie.v1.Payment/ListNotifications | has '"outTradeId": "IMG1"'; }

# Stops the container with SIGTERM and checks it ended cleanly, in time.
graceful_stop() {
  local grace=10 start=$SECONDS
  podman stop -t 30 kongtie >/dev/null
  local took=$((SECONDS - start)) code
  code=$(podman inspect -f '{{.State.ExitCode}}' kongtie)
  [ "$code" = 0 ] || { podman logs kongtie 2>&1 | tail; fail "exit code $code after SIGTERM (137: killed)"; }
  [ "$took" -le "$grace" ] || fail "SIGTERM took ${took}s, more than the ${grace}s grace"
  local logs
  logs=$(podman logs kongtie 2>&1)
  grep -q '"shutdown signal received"' <<<"$logs" || fail "no 'shutdown signal received' line"
  tail -n1 <<<"$logs" | has '"message":"stopped"' || fail "the last log line is not 'stopped'"
  echo "stopped by SIGTERM in ${took}s, exit code 0, last line 'stopped'"
}

step "the README's sandbox command: $try_cmd"
(cd "$work" && eval "$try_cmd") >/dev/null || fail "docker run (sandbox)"
wait_for 30 "/readyz 200" ready
"$grpcurl" -plaintext "$GRPC" grpc.health.v1.Health/Check | has '"status": "SERVING"' \
  || fail "gRPC health is not SERVING"
grpc "$GRPC" kongtie.v1.Auth/GetAccessToken | has '"accessToken"' || fail "GetAccessToken"
echo "ready; health SERVING; GetAccessToken answered through the published port"

pid=$(podman inspect -f '{{.State.Pid}}' kongtie)
uid=$(awk '/^Uid:/ {print $2 "," $3}' "/proc/$pid/status")
[ "$uid" = "65532,65532" ] || fail "the gateway runs as uid $uid, not 65532"
echo "the gateway process (host pid $pid) runs as uid 65532"

grpc -d '{"out_trade_id": "IMG1", "amount_fen": 20, "openid": "oeQDZtzvDoD-OmTmyJH6rGAX8odc"}' \
  "$GRPC" kongtie.v1.Payment/CreateJsapiOrder | has '"payParams"' || fail "CreateJsapiOrder"
curl -sf -X POST "$SANDBOX/sandbox/orders/IMG1/pay" >/dev/null || fail "the sandbox did not pay IMG1"
wait_for 15 "the notification of IMG1 stored" stored
echo "order IMG1 paid by the sandbox; its notification is stored"

graceful_stop

step "the same container started again keeps the notification"
podman start kongtie >/dev/null || fail "podman start"
wait_for 30 "/readyz 200 after podman start" ready
stored || fail "the notification of IMG1 is gone after podman start"
echo "IMG1's notification is still there"
graceful_stop
podman rm kongtie >/dev/null

step "a new container on the same volume keeps it too"
(cd "$work" && eval "$try_cmd") >/dev/null || fail "docker run (sandbox, again)"
wait_for 30 "/readyz 200 after the restart" ready
stored || fail "the notification of IMG1 is gone after the restart"
grpc -d '{"out_trade_id": "IMG1"}' "$GRPC" kongtie.v1.Payment/GetOrder | has ORDER_STATE_PAID \
  || fail "order IMG1 is not PAID after the restart"
echo "IMG1's notification and PAID order are still there"
graceful_stop
podman rm kongtie >/dev/null
podman volume rm kongtie-data >/dev/null

step "the README's production command, example env file as it is: refused, naming what to fill in"
cp deploy/kongtie-gateway.env.example "$work/kongtie-gateway.env"
(cd "$work" && eval "$prod_cmd") >/dev/null || fail "docker run (production)"
code=$(podman wait kongtie)
[ "$code" = 1 ] || fail "with the placeholders it exited $code, not 1"
refusal=$(podman logs kongtie 2>&1)
grep -q "still holds the example file's placeholder" <<<"$refusal" \
  || { echo "$refusal"; fail "the refusal does not name the placeholder"; }
grep -m1 placeholder <<<"$refusal" | cut -c1-160
podman rm kongtie >/dev/null

step "the same command once every change-me value is replaced"
# Kongtie's URLs go to a closed loopback port: nothing leaves this machine.
sed -i -E 's/=change-me[^,]*(,change-me[^,]*)*$/=ci-'"$RANDOM"'-filled/;
  s#^KONGTIE_KTAPI_URL=.*#KONGTIE_KTAPI_URL=http://127.0.0.1:9/ktapi#;
  s#^KONGTIE_PAY_URL=.*#KONGTIE_PAY_URL=http://127.0.0.1:9/ParTrade.ashx#' "$work/kongtie-gateway.env"
! grep -q change-me "$work/kongtie-gateway.env" || fail "change-me values left in the test's env file"
(cd "$work" && eval "$prod_cmd") >/dev/null || fail "docker run (production, filled in)"
wait_for 30 "/readyz 200 with the filled-in env file" ready
"$grpcurl" -plaintext "$GRPC" grpc.health.v1.Health/Check | has '"status": "SERVING"' \
  || fail "gRPC health is not SERVING (production)"
echo "starts and is ready with the example env file once its placeholders are replaced"
graceful_stop

podman rm kongtie >/dev/null

step "the Kubernetes Deployment's pod (deploy/kubernetes/), twice (replicas: 2), on one PostgreSQL database"
# Its image, arguments, ConfigMap and Secret (placeholders replaced, the
# database the local one), user, read-only root, dropped capabilities,
# emptyDir mounts and memory limit, as podman flags; host networking, each
# replica on loopback ports of its own. Then the probes' paths on the admin
# port, and a consumer created on one replica seen by the other.
venv=.tools/deploy-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check pyyaml
db=kongtie_image_pods
export PGOPTIONS=--client-min-messages=warning
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null \
  || fail "PostgreSQL on 127.0.0.1:5432 (run .ci/postgres.sh)"
"$venv/bin/python" - "$work" "postgres://postgres@127.0.0.1:5432/$db" <<'PY'
import sys, yaml
work, store = sys.argv[1], sys.argv[2]
docs = {}
for f in ("configmap", "secret.example", "deployment"):
    d = yaml.safe_load(open(f"deploy/kubernetes/{f}.yaml"))
    docs[d["kind"]] = d
pod = docs["Deployment"]["spec"]["template"]["spec"]
(c,) = pod["containers"]
env = dict(docs["ConfigMap"]["data"])
env.update(docs["Secret"]["stringData"])
for k, v in env.items():
    if "change-me" in v:
        env[k] = ",".join(f"ci-{k.lower()}-{i}" for i, _ in enumerate(v.split(",")))
env["KONGTIE_STORE"] = store
# Kongtie's URLs to a closed loopback port: nothing leaves the machine.
env["KONGTIE_KTAPI_URL"] = "http://127.0.0.1:9/ktapi"
env["KONGTIE_PAY_URL"] = "http://127.0.0.1:9/ParTrade.ashx"
with open(f"{work}/pod.env", "w") as out:
    out.writelines(f"{k}={v}\n" for k, v in env.items())
open(f"{work}/pod.key", "w").write(env["KONGTIE_API_KEYS"].split(",")[0])
psc, sc = pod["securityContext"], c["securityContext"]
flags = [f"--user={psc['runAsUser']}:{psc['runAsGroup']}"]
if sc.get("readOnlyRootFilesystem"):
    flags.append("--read-only")
flags += [f"--cap-drop={cap}" for cap in sc["capabilities"]["drop"]]
if sc.get("allowPrivilegeEscalation") is False:
    flags.append("--security-opt=no-new-privileges")
vols = {v["name"]: v for v in pod["volumes"]}
for m in c["volumeMounts"]:
    assert "emptyDir" in vols[m["name"]], m
    flags.append(f"--tmpfs={m['mountPath']}:rw,mode=1777")
flags.append(f"--memory={c['resources']['limits']['memory'].replace('Mi', 'm')}")
open(f"{work}/pod.flags", "w").write("\n".join(flags) + "\n")
open(f"{work}/pod.image", "w").write(c["image"] + "\n")
open(f"{work}/pod.args", "w").write("\n".join(c.get("args", [])) + "\n")
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
with open(f"{work}/pod.probes", "w") as out:
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert ports[get["port"]] == 9090, get
        out.write(get["path"] + "\n")
PY
[ -s "$work/pod.flags" ] || fail "could not read deploy/kubernetes/"
pod_image=$(cat "$work/pod.image")
podman tag kongtie-gateway "$pod_image"
mapfile -t pod_flags <"$work/pod.flags"
mapfile -t pod_args <"$work/pod.args"
pod_key=$(cat "$work/pod.key")
echo "podman run ${pod_flags[*]} $pod_image ${pod_args[*]}"
# Free loopback ports: gRPC, notify and admin of each replica.
read -r -a ports <<<"$("$venv/bin/python" -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')"
replica() {  # name, index
  local first=$(($2 * 3))
  podman run -d --name "$1" --network host --env-file "$work/pod.env" \
    -e KONGTIE_GRPC_ADDR="127.0.0.1:${ports[first]}" -e KONGTIE_NOTIFY_ADDR="127.0.0.1:${ports[first + 1]}" \
    -e KONGTIE_ADMIN_ADDR="127.0.0.1:${ports[first + 2]}" \
    "${pod_flags[@]}" "$pod_image" "${pod_args[@]}" >/dev/null
}
replica kongtie-pod-a 0 || fail "podman run (pod a)"
replica kongtie-pod-b 1 || fail "podman run (pod b)"
probe_ok() { [ "$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$1$2")" = 200 ]; }
for port in "${ports[2]}" "${ports[5]}"; do
  while read -r path; do
    deadline=$((SECONDS + 60))
    until probe_ok "$port" "$path"; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        podman logs kongtie-pod-a 2>&1 | tail; podman logs kongtie-pod-b 2>&1 | tail
        fail "probe $path on admin port $port not 200 within 60s"
      fi
      sleep 0.3
    done
  done <"$work/pod.probes"
done
echo "both replicas answer their probes ($(tr '\n' ' ' <"$work/pod.probes")) as uid 65532 on a read-only root"
pod_grpc() { "$grpcurl" -plaintext -max-time 10 -H "authorization: Bearer $pod_key" "$@"; }
pod_grpc -d '{"name": "k8s-shared", "ack_wait": "30s"}' "127.0.0.1:${ports[0]}" kongtie.v1.Payment/CreateConsumer >/dev/null \
  || fail "CreateConsumer on replica a"
pod_grpc -d '{"name": "k8s-shared"}' "127.0.0.1:${ports[3]}" kongtie.v1.Payment/GetConsumer | has '"name": "k8s-shared"' \
  || fail "replica b does not see the consumer created on replica a"
echo "a consumer created on replica a is seen by replica b: one PostgreSQL database"
for name in kongtie-pod-a kongtie-pod-b; do
  podman stop -t 30 "$name" >/dev/null
  code=$(podman inspect -f '{{.State.ExitCode}}' "$name")
  [ "$code" = 0 ] || { podman logs "$name" 2>&1 | tail; fail "$name exited $code after SIGTERM"; }
done
podman rm kongtie-pod-a kongtie-pod-b >/dev/null
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" >/dev/null || true

step "the systemd unit (deploy/systemd/), started by systemd: PID 1 of a privileged container on the base image"
# This machine's own PID 1 is not systemd; a container's can be. Privileged,
# as a host's systemd is: the unit's sandboxing needs mount namespaces.
sd_admin=127.0.0.1:$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
podman run -d --name kongtie-systemd --privileged --systemd=always -p "$sd_admin:9090" "$base" /lib/systemd/systemd >/dev/null \
  || fail "podman run systemd"
sd() { podman exec kongtie-systemd "$@"; }
booted() { case "$(sd systemctl is-system-running 2>/dev/null)" in running|degraded) return 0;; *) return 1;; esac; }
wait_for 60 "systemd booted in the container" booted
sd mkdir -p /etc/kongtie
podman cp "$bin" kongtie-systemd:/usr/local/bin/kongtie-gateway
# The production env file with its placeholders replaced (above); its
# KONGTIE_DATA_DIR=/data is overridden by the unit's state directory.
podman cp "$work/kongtie-gateway.env" kongtie-systemd:/etc/kongtie/kongtie-gateway.env
podman cp deploy/systemd/kongtie-gateway.service kongtie-systemd:/etc/systemd/system/kongtie-gateway.service
sd systemctl daemon-reload
sd systemctl start kongtie-gateway || { sd journalctl -u kongtie-gateway --no-pager | tail; fail "systemctl start"; }
sd_ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' "$sd_admin/readyz")" = 200 ]; }
wait_for 30 "/readyz 200 under systemd" sd_ready
main_pid() { sd systemctl show -p MainPID --value kongtie-gateway; }
pid=$(main_pid)
status=$(sd cat "/proc/$pid/status")
sd_uid=$(sd systemctl show -p UID --value kongtie-gateway)
[ -n "$sd_uid" ] && [ "$sd_uid" != 0 ] && [ "$sd_uid" != "[not set]" ] || fail "the service's dynamic user is '$sd_uid'"
grep -Eq "^Uid:\s+$sd_uid\s" <<<"$status" || fail "the gateway does not run as the dynamic user $sd_uid"
grep -Eq '^NoNewPrivs:\s+1$' <<<"$status" || fail "NoNewPrivileges is not in force"
grep -Eq '^CapEff:\s+0+$' <<<"$status" || fail "the gateway holds capabilities"
grep -Eq '^Seccomp:\s+2$' <<<"$status" || fail "no system-call filter"
# In the service's mount namespace: its state directory is writable (the
# control), /usr and /etc are not.
sd nsenter -t "$pid" -m touch /var/lib/kongtie-gateway/written || fail "nsenter into the service's mounts"
sd rm /var/lib/private/kongtie-gateway/written
for dir in /usr/local/bin /etc/kongtie; do
  if sd nsenter -t "$pid" -m touch "$dir/written" 2>/dev/null; then
    fail "ProtectSystem=strict: the service's view of $dir is writable"
  fi
done
sd test -s /var/lib/private/kongtie-gateway/notifications.db || fail "the store is not in the state directory"
[ "$(sd stat -c %u /var/lib/private/kongtie-gateway)" = "$sd_uid" ] || fail "the state directory is not the dynamic user's"
echo "running as dynamic user $sd_uid, no capabilities, no new privileges, seccomp, read-only /usr and /etc, store in /var/lib/kongtie-gateway"
sd sh -c "kill -KILL $pid"
restarted() { [ "$(sd systemctl show -p NRestarts --value kongtie-gateway)" = 1 ] && sd_ready; }
wait_for 30 "Restart=on-failure after a SIGKILL" restarted
echo "SIGKILLed, restarted by systemd and ready again"
sd systemctl stop kongtie-gateway
[ "$(sd systemctl show -p Result --value kongtie-gateway)" = success ] \
  && [ "$(sd systemctl show -p ExecMainStatus --value kongtie-gateway)" = 0 ] \
  || { sd journalctl -u kongtie-gateway --no-pager | tail; fail "systemctl stop did not end it cleanly"; }
sd journalctl -u kongtie-gateway --no-pager -o cat | grep -F '"message":"stopped"' >/dev/null \
  || fail "no 'stopped' line in the journal"
echo "systemctl stop: exit status 0, result success, 'stopped' in the journal"
podman rm -f -t 0 kongtie-systemd >/dev/null

echo "image: all OK"

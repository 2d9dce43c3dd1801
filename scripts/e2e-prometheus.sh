#!/usr/bin/env bash
# `make e2e-prometheus` (also the last part of `make e2e`): a real Prometheus (Debian's
# package) on 127.0.0.1:$WALLET_PROMETHEUS_PORT (default 19390, data in .data/prometheus)
# scrapes a 3-node local cluster (scripts/cluster.sh, release build) while a short load loop
# (tests/e2e/load.py) runs; then tests/e2e/prom_queries.py checks that every Grafana panel
# query returns data, that the prometheus-adapter rule gives one plausible series per pod,
# and that the KEDA query (from the chart's render) returns a number.
# The scrape adds the labels the chart's ServiceMonitor and Kubernetes would give
# (namespace, pod, job): the queries select on them. The cluster's ports are
# WALLET_E2E_CLUSTER_PORT_BASE (default 26080) + I (public), + 100 + I (internal),
# + 1010 + I (admin), so they meet neither `make up`'s nor `make e2e`'s pods. They stay below
# the kernel's ephemeral range (32768-60999): a node once failed to bind 38182, which a
# client connection to Prometheus had as its source port.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"
export PATH="$DATA_DIR/bin:$PATH"

PROM_PORT="${WALLET_PROMETHEUS_PORT:-19390}"
PROM="http://127.0.0.1:$PROM_PORT"
PROM_DIR="$DATA_DIR/prometheus"
NODES=3
SCRAPE_INTERVAL=2
LOAD_SECONDS="${WALLET_E2E_LOAD_SECONDS:-40}"
NAMESPACE=wallet
BASE="${WALLET_E2E_CLUSTER_PORT_BASE:-26080}"
export WALLET_PUBLIC_PORT_BASE=$BASE WALLET_INTERNAL_PORT_BASE=$((BASE + 100)) WALLET_ADMIN_PORT_BASE=$((BASE + 1010))
export PROFILE=release
# A short request deadline, under the lease TTL, so that a node paused for a few seconds
# makes the others answer 503 (deadline passed): the 5xx panels then have data too.
export WALLET_REQUEST_DEADLINE_MS=1500
PY="$DATA_DIR/venv-e2e/bin/python"


started_stack=0
prom_pid=""
cleanup() {
  local status=$?
  set +e
  [ -n "${paused_pid:-}" ] && kill -CONT "$paused_pid" 2>/dev/null
  scripts/cluster.sh stop >/dev/null 2>&1
  if [ -n "$prom_pid" ] && kill -0 "$prom_pid" 2>/dev/null; then
    log "stopping Prometheus"
    kill "$prom_pid"; wait "$prom_pid" 2>/dev/null
  fi
  [ "$started_stack" = 1 ] && scripts/stack.sh down
  exit "$status"
}
trap cleanup EXIT

step "installing what is missing (scripts/deps.sh --e2e) and the release build"
scripts/deps.sh --e2e
command -v prometheus >/dev/null || fail "no prometheus binary after deps.sh --e2e"
stack_running || started_stack=1
scripts/stack.sh up
nice -n 19 cargo build --release --locked -p wallet -p wallet-migrator --bins

step "Prometheus on $PROM, scraping the nodes' admin ports every ${SCRAPE_INTERVAL}s"
if curl -fsS -m 2 "$PROM/-/ready" >/dev/null 2>&1; then
  fail "something already answers on $PROM (an earlier run?); stop it or set WALLET_PROMETHEUS_PORT"
fi
rm -rf "$PROM_DIR"; mkdir -p "$PROM_DIR/data"
{
  printf 'global:\n  scrape_interval: %ss\n  scrape_timeout: %ss\n' "$SCRAPE_INTERVAL" "$SCRAPE_INTERVAL"
  printf 'scrape_configs:\n  - job_name: wallet-headless\n    static_configs:\n'
  for i in $(seq 0 $((NODES - 1))); do
    # namespace and pod as Kubernetes service discovery would set them; the pod name has
    # the Deployment's shape <fullname>-<hash>-<5 characters>, which the KEDA query matches.
    printf '      - targets: ["127.0.0.1:%s"]\n        labels: {namespace: %s, pod: wallet-local-node%s}\n' \
      "$((WALLET_ADMIN_PORT_BASE + i))" "$NAMESPACE" "$i"
  done
} > "$PROM_DIR/prometheus.yml"
sed 's/^/  /' "$PROM_DIR/prometheus.yml"
echo "  (labels added by the scrape: namespace=$NAMESPACE, pod=wallet-local-node<i>, job=wallet-headless, as the ServiceMonitor would)"
prometheus --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --storage.tsdb.retention.time=1d \
  >"$PROM_DIR/prometheus.log" 2>&1 &
prom_pid=$!
for _ in $(seq 1 100); do curl -fsS -m 1 "$PROM/-/ready" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS -m 1 "$PROM/-/ready" >/dev/null 2>&1 || { tail -n 20 "$PROM_DIR/prometheus.log" >&2; fail "Prometheus did not start"; }

step "a $NODES-node cluster (release build) on ports $BASE.., admin $WALLET_ADMIN_PORT_BASE.."
scripts/cluster.sh up "$NODES" >/dev/null
urls=(); pods=()
for i in $(seq 0 $((NODES - 1))); do
  urls+=("http://127.0.0.1:$((WALLET_PUBLIC_PORT_BASE + i))")
  pods+=(--pod "wallet-local-node$i=http://127.0.0.1:$((WALLET_PUBLIC_PORT_BASE + i))")
done
up=0
for _ in $(seq 1 50); do
  up=$(curl -fsS "$PROM/api/v1/query?query=sum(up%7Bjob%3D%22wallet-headless%22%7D)" \
    | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(int(float(r[0]["value"][1])) if r else 0)')
  [ "$up" = "$NODES" ] && break
  sleep 0.5
done
[ "$up" = "$NODES" ] || fail "Prometheus sees $up of $NODES targets up"
echo "  Prometheus scrapes all $NODES nodes"

step "load for ${LOAD_SECONDS}s (tests/e2e/load.py); node-2 paused for 4 s in the middle (deadline 503s)"
# Each pod's own counters around the load, to hold the adapter's per-pod answer against.
snapshot() {
  mkdir -p "$PROM_DIR/metrics/$1"
  for i in $(seq 0 $((NODES - 1))); do
    curl -fsS "http://127.0.0.1:$((WALLET_ADMIN_PORT_BASE + i))/metrics" > "$PROM_DIR/metrics/$1/wallet-local-node$i.txt"
  done
}
snapshot before
"$PY" tests/e2e/load.py "$DATA_DIR/dev-token" "$LOAD_SECONDS" "${urls[@]}" > "$PROM_DIR/load.json" &
load_pid=$!
sleep "$((LOAD_SECONDS / 2))"
paused_pid=$(cat "$DATA_DIR/run/node-2.pid")
kill -STOP "$paused_pid"; sleep 4; kill -CONT "$paused_pid"; paused_pid=""
wait "$load_pid" || fail "the load loop failed"
at=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["ended"])' "$PROM_DIR/load.json")
echo "  answers by status: $("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["statuses"])' "$PROM_DIR/load.json")"
# Two more scrapes, so the last requests are in Prometheus before the queries at $at.
sleep "$((2 * SCRAPE_INTERVAL + 1))"
snapshot after
at=$("$PY" -c "print($at + $SCRAPE_INTERVAL)")

step "the chart's queries against Prometheus (tests/e2e/prom_queries.py)"
# The e2e values (a key source for auth), with autoscaling through KEDA switched on.
helm template wallet charts/wallet -n "$NAMESPACE" -f tests/e2e/values.yaml \
  --set autoscaling.enabled=true --set autoscaling.keda.enabled=true \
  --set "autoscaling.keda.prometheusServerAddress=$PROM" --show-only templates/keda-scaledobject.yaml \
  > "$PROM_DIR/keda-render.yaml"
"$PY" tests/e2e/prom_queries.py --prometheus "$PROM" --dashboard charts/wallet/dashboards/wallet.json \
  --adapter-values charts/wallet/prometheus-adapter-values.yaml --keda-render "$PROM_DIR/keda-render.yaml" \
  --namespace "$NAMESPACE" --scrape-interval "$SCRAPE_INTERVAL" --load "$PROM_DIR/load.json" --at "$at" --metrics-dir "$PROM_DIR/metrics" "${pods[@]}"

step "e2e-prometheus passed in $SECONDS s"

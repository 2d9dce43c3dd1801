#!/usr/bin/env bash
# A flame graph of one release node under one bench scenario: a fresh 1-node cluster, the
# scenario through wallet-bench, `perf record` of the node for part of it, and inferno's
# collapse + flamegraph into an SVG.
#   flamegraph.sh SCENARIO [OUT.svg]      e.g. flamegraph.sh multi-uniform docs/flamegraphs/multi-uniform.svg
# Environment (defaults): FLAME_DURATION=40s (the scenario), FLAME_RECORD=15 (seconds recorded,
# starting 10 s in), FLAME_FREQUENCY=199 (samples per second), FLAME_ARGS (more wallet-bench flags).
# The node runs without the per-tenant rate limits (WALLET_RATE_LIMIT_READ/_WRITE=0 unless
# set): the bench is one tenant, and one node's 20,000/s default would cap what it profiles.
# Needs perf (Debian: linux-perf) and inferno (`cargo install inferno`, installed if missing).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

SCENARIO="${1:?usage: $0 SCENARIO [OUT.svg]}"
OUT="${2:-target/bench/flamegraph-$SCENARIO.svg}"
DURATION="${FLAME_DURATION:-40s}"
RECORD="${FLAME_RECORD:-15}"
FREQUENCY="${FLAME_FREQUENCY:-199}"
read -r -a EXTRA <<<"${FLAME_ARGS:-}"
WORK="$DATA_DIR/flamegraph"
export WALLET_LOCAL_NATS="${WALLET_LOCAL_NATS:-0}"
export WALLET_RATE_LIMIT_READ="${WALLET_RATE_LIMIT_READ:-0}" WALLET_RATE_LIMIT_WRITE="${WALLET_RATE_LIMIT_WRITE:-0}"

command -v perf >/dev/null || fail "perf not found (apt-get install linux-perf)"
if ! command -v inferno-flamegraph >/dev/null; then
  log "installing inferno (cargo install inferno)"
  cargo install --locked inferno >/dev/null
fi
if ss -ltn 2>/dev/null | grep -qE "(127\.0\.0\.1|\*):(808[0-2])\b"; then
  fail "a cluster is running (ports 8080-8082): stop it first (scripts/cluster.sh down)"
fi

cargo build --release --locked -p wallet -p wallet-migrator -p wallet-bench --bins
mkdir -p "$WORK" "$(dirname "$OUT")"
trap 'scripts/cluster.sh down >/dev/null 2>&1 || true' EXIT
PROFILE=release scripts/cluster.sh up 1
pid=$(cat "$DATA_DIR/run/node-0.pid")

log "$SCENARIO for $DURATION on node-0 (pid $pid); recording $RECORD s from 10 s in"
WALLET_BENCH_URLS=http://127.0.0.1:8080 WALLET_BENCH_ADMIN_URLS=http://127.0.0.1:9090 \
  scripts/bench.sh run "$SCENARIO" --multi-duration "$DURATION" --saturate-duration "$DURATION" \
  --constant-duration "$DURATION" --reads-duration "$DURATION" --out "$WORK/bench" "${EXTRA[@]}" &
bench=$!
sleep 10
perf record -F "$FREQUENCY" --call-graph dwarf,16384 -o "$WORK/perf.data" -p "$pid" -- sleep "$RECORD" 2>"$WORK/perf-record.log"
wait "$bench"

perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf >"$WORK/$SCENARIO.folded"
inferno-flamegraph --title "wallet node, $SCENARIO ($(git rev-parse --short HEAD))" \
  --width 1600 --minwidth 1 <"$WORK/$SCENARIO.folded" >"$OUT"
log "flame graph: $OUT (folded stacks: $WORK/$SCENARIO.folded; bench: $WORK/bench/report.md)"

#!/usr/bin/env bash
# Load and correctness bench (tests/bench, binary wallet-bench).
#   bench.sh all            release build, 3-node cluster, every scenario but soak (incl. many-wallets
#                           and slow-connections: up to 5 + 1 min more)
#   bench.sh soak           release build, 30 min at 1000 RPS with node RSS sampled every 10 s
#   bench.sh smoke          debug build, short constant + failover with the consistency check;
#                           fails on any inconsistency or on any 5xx/unanswered request outside failover
#   bench.sh run ARGS...    release build, `wallet-bench run ARGS...` (e.g. `run spike --spike-phase 5s`)
# With WALLET_BENCH_URLS set, the cluster at those URLs is used and not started or stopped.
# Results: target/bench/ (smoke: target/bench/smoke/): results.json, report.md, *.svg.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

MODE="${1:-}"; [ $# -gt 0 ] && shift
NODES="${WALLET_BENCH_NODES:-3}"
STARTED_NODES=0
STARTED_STACK=0

stack_running() {
  PGPASSWORD=wallet psql -h 127.0.0.1 -p "$PG_PORT" -U wallet -d postgres -Atqc 'select 1' >/dev/null 2>&1
}

# How many of nodes 0..NODES-1 have a live process behind their pid file.
nodes_running() {
  local i n=0 f
  for i in $(seq 0 $((NODES - 1))); do
    f="$DATA_DIR/run/node-$i.pid"
    [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && n=$((n + 1))
  done
  echo "$n"
}

cleanup() {
  [ "$STARTED_NODES" = 1 ] || return 0
  if [ "$STARTED_STACK" = 1 ]; then
    scripts/cluster.sh down || true
  else
    # PostgreSQL and Redis were up before the bench (someone else's): stop only our nodes.
    for i in $(seq 0 $((NODES - 1))); do scripts/cluster.sh stop-node "$i" || true; done
  fi
}

ensure_cluster() {
  export PROFILE="$1"
  if [ -n "${WALLET_BENCH_URLS:-}" ]; then
    log "using the running cluster at $WALLET_BENCH_URLS"
    return 0
  fi
  local running; running=$(nodes_running)
  if [ "$running" = "$NODES" ]; then
    # The failover scenario restarts a node with cluster.sh: keep the build the nodes run.
    local exe; exe=$(readlink "/proc/$(cat "$DATA_DIR/run/node-0.pid")/exe" || true)
    case "$exe" in
      */target/release/wallet) export PROFILE=release ;;
      */target/debug/wallet) export PROFILE=debug ;;
    esac
    log "all $NODES nodes are already running ($PROFILE build): benchmarking them as they are, leaving them up"
    return 0
  elif [ "$running" != 0 ]; then
    echo "only $running of $NODES nodes are running (.data/run/node-*.pid); stop them (make down) or start the rest first" >&2
    exit 1
  fi
  stack_running || STARTED_STACK=1
  STARTED_NODES=1
  trap cleanup EXIT
  scripts/cluster.sh up "$NODES"
}

# Only the generator: `cluster.sh up` builds the node and the migrator itself when it starts them.
build_bench() {
  if [ "$1" = release ]; then cargo build --release -p wallet-bench
  else cargo build -p wallet-bench; fi
}

# Its SQL (seeding, the check, deleting what many-wallets seeded) runs as the owner of the
# tables; the nodes it restarts keep the app login of DATABASE_URL.
DB_ARGS=(--database-url "$DATABASE_OWNER_URL")

case "$MODE" in
  all)
    build_bench release
    ensure_cluster release
    target/release/wallet-bench run all "${DB_ARGS[@]}" "$@"
    ;;
  soak)
    build_bench release
    ensure_cluster release
    target/release/wallet-bench run soak "${DB_ARGS[@]}" "$@"
    ;;
  smoke)
    build_bench debug
    ensure_cluster debug
    target/debug/wallet-bench run constant failover --strict "${DB_ARGS[@]}" --out target/bench/smoke \
      --constant-rps 200 --constant-duration 5s \
      --failover-rps 200 --failover-duration 10s --failover-kill-at 3s --failover-restart-after 2s "$@"
    ;;
  run)
    build_bench release
    ensure_cluster release
    target/release/wallet-bench run "${DB_ARGS[@]}" "$@"
    ;;
  *)
    echo "usage: $0 all | soak | smoke | run SCENARIO... [FLAGS]" >&2
    exit 2
    ;;
esac

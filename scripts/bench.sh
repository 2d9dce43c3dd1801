#!/usr/bin/env bash
# Load and correctness bench (tests/bench, binary wallet-bench).
#   bench.sh all            release build, 3-node cluster, every scenario but soak (incl. many-wallets
#                           and slow-connections: up to 5 + 1 min more)
#   bench.sh soak           release build, 30 min at 1000 RPS with node RSS sampled every 10 s
#   bench.sh smoke          debug build, short constant + failover with the consistency check;
#                           fails on any inconsistency or on any 5xx/unanswered request outside failover
#   bench.sh run ARGS...    release build, `wallet-bench run ARGS...` (e.g. `run spike --spike-phase 5s`,
#                           `run transfers holds balance-at --transfers-duration 10s`)
# With WALLET_BENCH_URLS set, the cluster at those URLs is used and not started or stopped.
# A cluster on moved ports (WALLET_PUBLIC_PORT_BASE, WALLET_ADMIN_PORT_BASE: cluster.sh) is
# started and benchmarked there. The bench mints its own token with every scope it uses
# (transfers:write, holds:write, wallets:admin too) unless WALLET_BENCH_TOKEN is set.
# Results: target/bench/ (smoke: target/bench/smoke/): results.json, report.md, *.svg.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

MODE="${1:-}"; [ $# -gt 0 ] && shift
# The figures are the ledger's (docs/performance.md): the nodes it starts publish to no NATS.
export WALLET_LOCAL_NATS="${WALLET_LOCAL_NATS:-0}"
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

# The bench's token: tenant dev, every scope the bench uses, signed with the development
# issuer's key that cluster.sh made. .data/dev-token is made once and renewed only daily,
# so it may lack scopes added since. Not for someone else's cluster (WALLET_BENCH_URLS):
# its token is theirs to give (WALLET_BENCH_TOKEN).
BENCH_SCOPES=(wallets:read wallets:create wallets:deposit wallets:withdraw wallets:admin transfers:write holds:write events:read webhooks:admin)
bench_token() {
  [ -z "${WALLET_BENCH_TOKEN:-}" ] || return 0
  [ -z "${WALLET_BENCH_URLS:-}" ] || return 0
  local key="$DATA_DIR/auth/signing-key.pem" bin="$REPO_ROOT/target/$PROFILE/wallet"
  if [ ! -f "$key" ] || [ ! -x "$bin" ]; then
    log "no development signing key or $bin: wallet-bench falls back to .data/dev-token"
    return 0
  fi
  local scopes=() scope
  for scope in "${BENCH_SCOPES[@]}"; do scopes+=(--scope "$scope"); done
  local token
  if ! token=$("$bin" token --key "$key" --issuer wallet-dev --tenant "${WALLET_BENCH_TENANT:-dev}" \
    "${scopes[@]}" --ttl 12h); then
    log "minting the bench's token failed: wallet-bench falls back to .data/dev-token"
    return 0
  fi
  export WALLET_BENCH_TOKEN="$token"
}

# Where the nodes listen when cluster.sh's port bases are moved (another checkout on the
# same machine): wallet-bench's defaults are the unmoved ports.
URL_ARGS=()
url_args() {
  [ -z "${WALLET_BENCH_URLS:-}" ] || return 0
  [ -n "${WALLET_PUBLIC_PORT_BASE:-}${WALLET_ADMIN_PORT_BASE:-}" ] || return 0
  local i public=() admin=()
  for i in $(seq 0 $((NODES - 1))); do
    public+=("http://127.0.0.1:$((${WALLET_PUBLIC_PORT_BASE:-8080} + i))")
    admin+=("http://127.0.0.1:$((${WALLET_ADMIN_PORT_BASE:-9090} + i))")
  done
  URL_ARGS=(--urls "$(IFS=,; echo "${public[*]}")")
  [ -n "${WALLET_BENCH_ADMIN_URLS:-}" ] || URL_ARGS+=(--admin-urls "$(IFS=,; echo "${admin[*]}")")
}

# Only the generator: `cluster.sh up` builds the node and the migrator itself when it starts them.
build_bench() {
  if [ "$1" = release ]; then cargo build --release -p wallet-bench
  else cargo build -p wallet-bench; fi
}

# Its SQL (seeding, the check, deleting what many-wallets seeded) runs as the owner of the
# tables; the nodes it restarts keep the app login of DATABASE_URL.
DB_ARGS=(--database-url "$DATABASE_OWNER_URL")
url_args

case "$MODE" in
  all)
    build_bench release
    ensure_cluster release
    bench_token
    target/release/wallet-bench run all "${DB_ARGS[@]}" "${URL_ARGS[@]}" "$@"
    ;;
  soak)
    build_bench release
    ensure_cluster release
    bench_token
    target/release/wallet-bench run soak "${DB_ARGS[@]}" "${URL_ARGS[@]}" "$@"
    ;;
  smoke)
    build_bench debug
    ensure_cluster debug
    bench_token
    target/debug/wallet-bench run constant failover --strict "${DB_ARGS[@]}" "${URL_ARGS[@]}" --out target/bench/smoke \
      --constant-rps 200 --constant-duration 5s \
      --failover-rps 200 --failover-duration 10s --failover-kill-at 3s --failover-restart-after 2s "$@"
    ;;
  run)
    build_bench release
    ensure_cluster release
    bench_token
    target/release/wallet-bench run "${DB_ARGS[@]}" "${URL_ARGS[@]}" "$@"
    ;;
  *)
    echo "usage: $0 all | soak | smoke | run SCENARIO... [FLAGS]" >&2
    exit 2
    ;;
esac

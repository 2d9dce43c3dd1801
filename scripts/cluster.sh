#!/usr/bin/env bash
# A local cluster of wallet nodes on loopback, sharing the local PostgreSQL and Redis.
#   cluster.sh dev [N]      foreground: Ctrl-C stops every node and the stack
#   cluster.sh up [N]       background: returns once every node answers
#   cluster.sh down         stops the nodes, PostgreSQL and Redis (data kept)
#   cluster.sh stop         stops the nodes only
#   cluster.sh start-node I / stop-node I / kill-node I
# Node I listens on 127.0.0.1:808I (public), 818I (internal), 909I (admin).
# PROFILE=release uses release binaries (the bench does).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PROFILE="${PROFILE:-debug}"
RUN_DIR="$DATA_DIR/run"
LOG_DIR="$DATA_DIR/logs"
BIN_DIR="$REPO_ROOT/target/$PROFILE"
SECRET_FILE="$DATA_DIR/internal-secret"

build() {
  local flags=(); [ "$PROFILE" = release ] && flags+=(--release)
  log "building wallet and wallet-migrator ($PROFILE)"
  (cd "$REPO_ROOT" && cargo build "${flags[@]}" -p wallet -p wallet-migrator --bins)
}

migrate() {
  log "applying migrations"
  "$BIN_DIR/wallet-migrator" apply
}

secret() {
  [ -f "$SECRET_FILE" ] || (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$SECRET_FILE")
  cat "$SECRET_FILE"
}

node_env() {
  local i=$1
  cat <<ENV
WALLET_NODE_ID=node-$i
WALLET_PUBLIC_ADDR=127.0.0.1:$((8080 + i))
WALLET_INTERNAL_ADDR=127.0.0.1:$((8180 + i))
WALLET_ADMIN_ADDR=127.0.0.1:$((9090 + i))
WALLET_INTERNAL_SECRET=$(secret)
ENV
}

start_node() {
  local i=$1
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  local pidfile="$RUN_DIR/node-$i.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then return 0; fi
  (
    set -a; eval "$(node_env "$i")"; set +a
    exec "$BIN_DIR/wallet" >>"$LOG_DIR/node-$i.log" 2>&1
  ) &
  echo $! > "$pidfile"
}

wait_ready() {
  local i=$1
  for _ in $(seq 1 150); do
    curl -fsS "http://127.0.0.1:$((9090 + i))/readyz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "node-$i did not become ready; see $LOG_DIR/node-$i.log" >&2
  return 1
}

signal_node() {
  local signal=$1 i=$2 pidfile="$RUN_DIR/node-$2.pid"
  [ -f "$pidfile" ] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$signal" "$pid"
    if [ "$signal" = TERM ]; then
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
  fi
  rm -f "$pidfile"
}

stop_nodes() {
  for pidfile in "$RUN_DIR"/node-*.pid; do
    [ -f "$pidfile" ] || continue
    local i=${pidfile##*/node-}; i=${i%.pid}
    signal_node TERM "$i"
  done
}

up() {
  local nodes=${1:-3}
  "$REPO_ROOT/scripts/stack.sh" up
  build
  migrate
  secret >/dev/null  # created once, before the nodes start in parallel
  for i in $(seq 0 $((nodes - 1))); do start_node "$i"; done
  for i in $(seq 0 $((nodes - 1))); do wait_ready "$i"; done
  echo
  for i in $(seq 0 $((nodes - 1))); do
    echo "node-$i  API http://127.0.0.1:$((8080 + i))/api/v1   Swagger UI http://127.0.0.1:$((8080 + i))/swagger-ui/   metrics http://127.0.0.1:$((9090 + i))/metrics"
  done
  echo "logs in $LOG_DIR"
}

case "${1:-}" in
  up) up "${2:-3}" ;;
  dev)
    trap 'echo; stop_nodes; "$REPO_ROOT/scripts/stack.sh" down; exit 0' INT TERM
    up "${2:-3}"
    echo "Ctrl-C stops the cluster, PostgreSQL and Redis."
    tail -n 0 -F "$LOG_DIR"/node-*.log &
    wait
    ;;
  down) stop_nodes; "$REPO_ROOT/scripts/stack.sh" down ;;
  stop) stop_nodes ;;
  start-node) start_node "$2"; wait_ready "$2" ;;
  stop-node) signal_node TERM "$2" ;;
  kill-node) signal_node KILL "$2" ;;
  *) echo "usage: $0 dev|up [N] | down | stop | start-node I | stop-node I | kill-node I" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A local cluster of wallet nodes on loopback, sharing the local PostgreSQL and Redis.
#   cluster.sh dev [N]      foreground: Ctrl-C stops every node and the stack
#   cluster.sh up [N]       background: returns once every node answers
#   cluster.sh down         stops the nodes, PostgreSQL and Redis (data kept)
#   cluster.sh stop         stops the nodes only
#   cluster.sh start-node I / stop-node I / kill-node I
#   cluster.sh issuer       makes the development issuer's key, JWKS and token only
# Node I listens on 127.0.0.1:808I (public), 818I (internal), 909I (admin); another checkout
# on the same machine moves them with WALLET_PUBLIC_PORT_BASE, WALLET_INTERNAL_PORT_BASE and
# WALLET_ADMIN_PORT_BASE (node I gets base + I).
# PROFILE=release uses release binaries (the bench does). The nodes publish their events to
# the stack's NATS (JetStream, stream WALLET_EVENTS, subjects wallet.events.>) unless
# WALLET_LOCAL_NATS=0.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PROFILE="${PROFILE:-debug}"
RUN_DIR="$DATA_DIR/run"
LOG_DIR="$DATA_DIR/logs"
BIN_DIR="$REPO_ROOT/target/$PROFILE"
SECRET_FILE="$DATA_DIR/internal-secret"
PUBLIC_PORT_BASE="${WALLET_PUBLIC_PORT_BASE:-8080}"
INTERNAL_PORT_BASE="${WALLET_INTERNAL_PORT_BASE:-8180}"
ADMIN_PORT_BASE="${WALLET_ADMIN_PORT_BASE:-9090}"

build() {
  local flags=(); [ "$PROFILE" = release ] && flags+=(--release)
  log "building wallet and wallet-migrator ($PROFILE)"
  (cd "$REPO_ROOT" && cargo build "${flags[@]}" -p wallet -p wallet-migrator --bins)
}

migrate() {
  log "applying migrations"
  # As the owner of the tables; the nodes connect as the app login (DATABASE_URL).
  DATABASE_URL="$DATABASE_OWNER_URL" "$BIN_DIR/wallet-migrator" apply
}

secret() {
  [ -f "$SECRET_FILE" ] || (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$SECRET_FILE")
  cat "$SECRET_FILE"
}

AUTH_DIR="$DATA_DIR/auth"
DEV_TOKEN="$DATA_DIR/dev-token"
DEV_SCOPES=(wallets:read wallets:create wallets:deposit wallets:withdraw wallets:admin transfers:write holds:write events:read webhooks:admin)

# The local development issuer: an ES256 key in .data/auth, its JWKS (which the nodes
# trust) and a token for tenant `dev` with every scope in .data/dev-token. Made once;
# the token is renewed when it is older than a day (it lives 30 days), or when the list
# of scopes changed (kept next to it).
dev_issuer() {
  mkdir -p "$AUTH_DIR"
  if [ ! -f "$AUTH_DIR/signing-key.pem" ]; then
    log "creating the development signing key in $AUTH_DIR"
    (umask 077; openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$AUTH_DIR/signing-key.pem" 2>/dev/null)
  fi
  if [ ! -f "$AUTH_DIR/jwks.json" ] || [ "$AUTH_DIR/signing-key.pem" -nt "$AUTH_DIR/jwks.json" ]; then
    "$BIN_DIR/wallet" jwks --key "$AUTH_DIR/signing-key.pem" > "$AUTH_DIR/jwks.json"
  fi
  if [ ! -s "$DEV_TOKEN" ] || [ -n "$(find "$DEV_TOKEN" -mmin +1440)" ] || [ "$AUTH_DIR/signing-key.pem" -nt "$DEV_TOKEN" ] \
    || [ "$(cat "$DEV_TOKEN.scopes" 2>/dev/null)" != "${DEV_SCOPES[*]}" ]; then
    local scopes=(); for scope in "${DEV_SCOPES[@]}"; do scopes+=(--scope "$scope"); done
    (umask 077; "$BIN_DIR/wallet" token --key "$AUTH_DIR/signing-key.pem" --issuer wallet-dev \
      --tenant dev "${scopes[@]}" --ttl 30d > "$DEV_TOKEN")
    echo "${DEV_SCOPES[*]}" > "$DEV_TOKEN.scopes"
  fi
}

# A local cluster's webhooks go to receivers on this machine (loopback), which a
# production node refuses.
node_env() {
  local i=$1
  cat <<ENV
WALLET_NODE_ID=node-$i
WALLET_PUBLIC_ADDR=127.0.0.1:$((PUBLIC_PORT_BASE + i))
WALLET_INTERNAL_ADDR=127.0.0.1:$((INTERNAL_PORT_BASE + i))
WALLET_ADMIN_ADDR=127.0.0.1:$((ADMIN_PORT_BASE + i))
WALLET_INTERNAL_SECRET=$(secret)
WALLET_AUTH_JWKS_FILE=$AUTH_DIR/jwks.json
WALLET_AUTH_ISSUER=wallet-dev
WALLET_WEBHOOK_ALLOW_PRIVATE=true
ENV
  if [ "${WALLET_LOCAL_NATS:-1}" != 0 ]; then echo "WALLET_EVENTS_NATS_URL=$NATS_URL"; fi
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
    curl -fsS "http://127.0.0.1:$((ADMIN_PORT_BASE + i))/readyz" >/dev/null 2>&1 && return 0
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
  dev_issuer
  for i in $(seq 0 $((nodes - 1))); do start_node "$i"; done
  for i in $(seq 0 $((nodes - 1))); do wait_ready "$i"; done
  echo
  for i in $(seq 0 $((nodes - 1))); do
    echo "node-$i  API http://127.0.0.1:$((PUBLIC_PORT_BASE + i))/api/v1   Swagger UI http://127.0.0.1:$((PUBLIC_PORT_BASE + i))/swagger-ui/   metrics http://127.0.0.1:$((ADMIN_PORT_BASE + i))/metrics"
  done
  echo "logs in $LOG_DIR"
  echo
  echo "A token for tenant dev with every scope is in $DEV_TOKEN (more: target/$PROFILE/wallet token --help):"
  echo "  curl -s -X POST -H \"Authorization: Bearer \$(cat .data/dev-token)\" http://127.0.0.1:$PUBLIC_PORT_BASE/api/v1/wallets"
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
  issuer) dev_issuer ;;
  start-node) dev_issuer; start_node "$2"; wait_ready "$2" ;;
  stop-node) signal_node TERM "$2" ;;
  kill-node) signal_node KILL "$2" ;;
  *) echo "usage: $0 dev|up [N] | down | stop | issuer | start-node I | stop-node I | kill-node I" >&2; exit 2 ;;
esac

# Shared settings for the scripts: where local state lives and which ports it uses.
# Sourced, not run. Ports are chosen not to clash with a system PostgreSQL (5432) or Redis (6379).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${WALLET_DATA_DIR:-$REPO_ROOT/.data}"
PG_PORT="${WALLET_PG_PORT:-55432}"
REDIS_PORT="${WALLET_REDIS_PORT:-56379}"
# NATS with JetStream (the outbox's sink, WALLET_EVENTS_NATS_URL), and its monitoring port
# (/healthz, /jsz).
NATS_PORT="${WALLET_NATS_PORT:-54222}"
NATS_MONITOR_PORT="${WALLET_NATS_MONITOR_PORT:-$((NATS_PORT + 4000))}"
export NATS_URL="${NATS_URL:-nats://127.0.0.1:$NATS_PORT}"
# The nodes connect as the app login, the migrator as the owner of the tables (stack.sh).
export DATABASE_URL="${DATABASE_URL:-postgres://wallet_node:wallet_node@127.0.0.1:$PG_PORT/wallet}"
export DATABASE_OWNER_URL="${DATABASE_OWNER_URL:-postgres://wallet_owner:wallet_owner@127.0.0.1:$PG_PORT/wallet}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:$REDIS_PORT}"
# TLS beside the plain ports: a local CA in the data folder, PostgreSQL with ssl=on on its
# port, Redis' TLS port with an ACL user (stack.sh); verify-full against 127.0.0.1.
REDIS_TLS_PORT="${WALLET_REDIS_TLS_PORT:-$((REDIS_PORT + 1))}"
TLS_DIR="$DATA_DIR/tls"
REDIS_TLS_USER=wallet
REDIS_TLS_PASSWORD=wallet-redis
# Admin URL used by tests to create one database per test.
export DATABASE_ADMIN_URL="${DATABASE_ADMIN_URL:-postgres://wallet:wallet@127.0.0.1:$PG_PORT/postgres}"

# Whether the local PostgreSQL and Redis both answer (so a script knows if it started them).
stack_running() {
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 \
    && PGPASSWORD=wallet psql -h 127.0.0.1 -p "$PG_PORT" -U wallet -d postgres -Atqc 'select 1' >/dev/null 2>&1
}

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
# The long scripts' headings, with the seconds since the script began, and their failures.
step() { printf '\n\033[1;32m### %s\033[0m  (%ds)\n' "$*" "$SECONDS"; }
fail() { printf '\033[1;31mFAILED: %s\033[0m\n' "$*" >&2; exit 1; }

pg_bin_dir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$dir" ] || { echo "PostgreSQL server binaries not found; run scripts/deps.sh" >&2; return 1; }
  echo "$dir"
}

# Debian installs nats-server into /usr/sbin, which not every user has on the PATH.
nats_bin() {
  command -v nats-server 2>/dev/null || { [ -x /usr/sbin/nats-server ] && echo /usr/sbin/nats-server; } \
    || { echo "nats-server not found; run scripts/deps.sh" >&2; return 1; }
}

# PostgreSQL refuses to run as root: run its tools as the 'postgres' system user then.
as_pg_user() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

#!/usr/bin/env bash
# Local PostgreSQL and Redis in the data folder: `stack.sh up|down|env`.
# Idempotent: `up` on a running stack does nothing, `down` on a stopped one neither.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_DATA="$DATA_DIR/pg"
PG_RUN="$DATA_DIR/pg-run"
REDIS_DIR="$DATA_DIR/redis"

pg_up() {
  local bin; bin=$(pg_bin_dir)
  mkdir -p "$DATA_DIR"
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    log "initialising PostgreSQL in $PG_DATA"
    mkdir -p "$PG_DATA" "$PG_RUN"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DATA" "$PG_RUN"
    local pwfile; pwfile=$(mktemp); echo wallet > "$pwfile"; chmod 644 "$pwfile"
    as_pg_user "$bin/initdb" -D "$PG_DATA" -U wallet --pwfile="$pwfile" -A scram-sha-256 -E UTF8 >/dev/null
    rm -f "$pwfile"
  fi
  mkdir -p "$PG_RUN"; [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_RUN"
  if ! as_pg_user "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    # Durable but tuned for a development machine: many connections for parallel tests.
    as_pg_user "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_RUN/postgres.log" -w -t 60 start \
      -o "-p $PG_PORT -h 127.0.0.1 -k $PG_RUN -c max_connections=400 -c shared_buffers=256MB -c fsync=on -c synchronous_commit=on" >/dev/null
  fi
  for _ in $(seq 1 50); do
    PGPASSWORD=wallet psql -h 127.0.0.1 -p "$PG_PORT" -U wallet -d postgres -Atqc 'select 1' >/dev/null 2>&1 && break
    sleep 0.2
  done
  if ! PGPASSWORD=wallet psql -h 127.0.0.1 -p "$PG_PORT" -U wallet -d postgres -Atqc "select 1 from pg_database where datname='wallet'" | grep -q 1; then
    PGPASSWORD=wallet psql -h 127.0.0.1 -p "$PG_PORT" -U wallet -d postgres -qc 'create database wallet' >/dev/null
  fi
}

pg_down() {
  local bin; bin=$(pg_bin_dir) || return 0
  [ -f "$PG_DATA/PG_VERSION" ] || return 0
  if as_pg_user "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    log "stopping PostgreSQL"
    as_pg_user "$bin/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
  fi
}

redis_up() {
  mkdir -p "$REDIS_DIR"
  if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then return 0; fi
  log "starting Redis on 127.0.0.1:$REDIS_PORT"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$REDIS_DIR" --daemonize yes \
    --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log" --save '' --appendonly no
  for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "Redis did not start; see $REDIS_DIR/redis.log" >&2; return 1
}

redis_down() {
  if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    log "stopping Redis"
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  fi
}

case "${1:-}" in
  up) "$(dirname "${BASH_SOURCE[0]}")/deps.sh" --servers-only; pg_up; redis_up ;;
  down) redis_down; pg_down ;;
  env) printf 'export DATABASE_URL=%q\nexport DATABASE_ADMIN_URL=%q\nexport REDIS_URL=%q\n' "$DATABASE_URL" "$DATABASE_ADMIN_URL" "$REDIS_URL" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac

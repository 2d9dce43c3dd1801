#!/usr/bin/env bash
# Local PostgreSQL, Redis and NATS (JetStream) in the data folder: `stack.sh up|down|env`.
# Idempotent: `up` on a running stack does nothing, `down` on a stopped one neither.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_DATA="$DATA_DIR/pg"
PG_RUN="$DATA_DIR/pg-run"
REDIS_DIR="$DATA_DIR/redis"
NATS_DIR="$DATA_DIR/nats"

# A CA, a server certificate for 127.0.0.1 and localhost, and a second CA that signed
# nothing (tests show that a wrong CA is refused). Made once.
tls_certs() {
  [ -f "$TLS_DIR/server.crt" ] && [ -f "$TLS_DIR/other-ca.crt" ] && return 0
  log "making a local CA and server certificate in $TLS_DIR"
  mkdir -p "$TLS_DIR"
  local o=(openssl)
  "${o[@]}" req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=wallet local CA" \
    -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.crt" 2>/dev/null
  "${o[@]}" req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > "$TLS_DIR/server.ext"
  "${o[@]}" x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" \
    -CAcreateserial -days 3650 -extfile "$TLS_DIR/server.ext" -out "$TLS_DIR/server.crt" 2>/dev/null
  "${o[@]}" req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=some other CA" \
    -keyout "$TLS_DIR/other-ca.key" -out "$TLS_DIR/other-ca.crt" 2>/dev/null
  chmod 600 "$TLS_DIR"/*.key
}

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
  # PostgreSQL wants its key owned by the server's user and private.
  install -m 600 "$TLS_DIR/server.key" "$PG_DATA/server.key"
  install -m 644 "$TLS_DIR/server.crt" "$PG_DATA/server.crt"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DATA/server.key" "$PG_DATA/server.crt"
  if ! as_pg_user "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT (TLS offered)"
    # Durable but tuned for a development machine: many connections for parallel tests.
    # WALLET_PG_OPTIONS adds server options, e.g. "-c shared_preload_libraries=pg_stat_statements"
    # to see where PostgreSQL's time goes under a bench (it applies when this starts the server).
    as_pg_user "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_RUN/postgres.log" -w -t 60 start \
      -o "-p $PG_PORT -h 127.0.0.1 -k $PG_RUN -c max_connections=400 -c shared_buffers=256MB -c fsync=on -c synchronous_commit=on -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key ${WALLET_PG_OPTIONS:-}" >/dev/null
  fi
  for _ in $(seq 1 50); do
    PGPASSWORD=wallet psql -h 127.0.0.1 -p "$PG_PORT" -U wallet -d postgres -Atqc 'select 1' >/dev/null 2>&1 && break
    sleep 0.2
  done
  pg_roles
}

# The superuser `wallet` is the administrator (tests create databases with it); the
# database `wallet` belongs to the login `wallet_owner`, which runs the migrations, and
# the nodes log in as `wallet_node`, a member of `wallet_app` (migrations/0003).
pg_roles() {
  local admin=(psql -h 127.0.0.1 -p "$PG_PORT" -U wallet -v ON_ERROR_STOP=1 -Atq)
  PGPASSWORD=wallet "${admin[@]}" -d postgres <<'SQL' >/dev/null
SET client_min_messages = warning;
SELECT 'CREATE ROLE wallet_app NOLOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'wallet_app') \gexec
SELECT 'CREATE ROLE wallet_owner LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'wallet_owner') \gexec
SELECT 'CREATE ROLE wallet_node LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'wallet_node') \gexec
ALTER ROLE wallet_owner PASSWORD 'wallet_owner';
ALTER ROLE wallet_node PASSWORD 'wallet_node';
GRANT wallet_app TO wallet_node;
SELECT 'CREATE DATABASE wallet OWNER wallet_owner' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'wallet') \gexec
ALTER DATABASE wallet OWNER TO wallet_owner;
SQL
  # A stack from before the owner login had its tables made by `wallet`: hand them over.
  PGPASSWORD=wallet "${admin[@]}" -d wallet <<'SQL' >/dev/null
DO $$
DECLARE t record;
BEGIN
  FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tableowner = 'wallet' LOOP
    EXECUTE format('ALTER TABLE public.%I OWNER TO wallet_owner', t.tablename);
  END LOOP;
END $$;
SQL
}

pg_down() {
  local bin; bin=$(pg_bin_dir) || return 0
  [ -f "$PG_DATA/PG_VERSION" ] || return 0
  if as_pg_user "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    log "stopping PostgreSQL"
    as_pg_user "$bin/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
  fi
}

# What a node sends, and nothing else (README, "TLS"): connection set-up, the lease and
# fence scripts, and the member entries. Tests use random key prefixes, so keys stay `~*`.
REDIS_NODE_COMMANDS='+@connection +evalsha +eval +script|load +get +set +del +exists +incr +pexpire +time +zadd +zrem +zrangebyscore +zremrangebyscore'

redis_up() {
  mkdir -p "$REDIS_DIR"
  if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then return 0; fi
  log "starting Redis on 127.0.0.1:$REDIS_PORT, TLS on $REDIS_TLS_PORT"
  # The default user stays open on the plain port for the tests; the TLS clients log in
  # as the ACL user.
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$REDIS_DIR" --daemonize yes \
    --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log" --save '' --appendonly no \
    --tls-port "$REDIS_TLS_PORT" --tls-cert-file "$TLS_DIR/server.crt" --tls-key-file "$TLS_DIR/server.key" \
    --tls-ca-cert-file "$TLS_DIR/ca.crt" --tls-auth-clients no \
    --user "$REDIS_TLS_USER" on ">$REDIS_TLS_PASSWORD" '~*' resetchannels -@all $REDIS_NODE_COMMANDS
  for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "Redis did not start; see $REDIS_DIR/redis.log" >&2; return 1
}

redis_down() {
  if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    log "stopping Redis"
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  fi
}

nats_running() { curl -fsS -m 1 "http://127.0.0.1:$NATS_MONITOR_PORT/healthz" >/dev/null 2>&1; }

# JetStream's store in the data folder; the nodes of `make dev` publish their events here.
nats_up() {
  local bin; bin=$(nats_bin)
  mkdir -p "$NATS_DIR"
  if nats_running; then return 0; fi
  log "starting NATS with JetStream on 127.0.0.1:$NATS_PORT (monitoring on $NATS_MONITOR_PORT)"
  # nats-server does not daemonize: its own session, so the caller's Ctrl-C does not reach it.
  setsid "$bin" -js -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MONITOR_PORT" -sd "$NATS_DIR/jetstream" \
    -P "$NATS_DIR/nats.pid" -l "$NATS_DIR/nats.log" </dev/null >/dev/null 2>&1 &
  for _ in $(seq 1 100); do nats_running && return 0; sleep 0.1; done
  echo "NATS did not start; see $NATS_DIR/nats.log" >&2; return 1
}

nats_down() {
  [ -f "$NATS_DIR/nats.pid" ] || return 0
  local pid; pid=$(cat "$NATS_DIR/nats.pid")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping NATS"
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$NATS_DIR/nats.pid"
}

case "${1:-}" in
  up) "$(dirname "${BASH_SOURCE[0]}")/deps.sh" --servers-only; tls_certs; pg_up; redis_up; nats_up ;;
  down) nats_down; redis_down; pg_down ;;
  env)
    printf 'export DATABASE_URL=%q\nexport DATABASE_OWNER_URL=%q\nexport DATABASE_ADMIN_URL=%q\nexport REDIS_URL=%q\nexport NATS_URL=%q\n' \
      "$DATABASE_URL" "$DATABASE_OWNER_URL" "$DATABASE_ADMIN_URL" "$REDIS_URL" "$NATS_URL"
    # verify-full to both: the CA, and URLs that demand it.
    printf 'export WALLET_TLS_CA=%q\nexport WALLET_TLS_OTHER_CA=%q\nexport DATABASE_ADMIN_TLS_URL=%q\nexport REDIS_TLS_URL=%q\n' \
      "$TLS_DIR/ca.crt" "$TLS_DIR/other-ca.crt" \
      "$DATABASE_ADMIN_URL?sslmode=verify-full&sslrootcert=$TLS_DIR/ca.crt" \
      "rediss://$REDIS_TLS_USER:$REDIS_TLS_PASSWORD@127.0.0.1:$REDIS_TLS_PORT" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac

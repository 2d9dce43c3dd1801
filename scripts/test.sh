#!/usr/bin/env bash
# Everything CI checks, on a machine that may be brand new: installs what is missing,
# starts PostgreSQL, Redis and NATS in .data/ (and stops them again if it started them),
# then lint, the test suite (all but the cluster fault tests, which are `make chaos`), the
# API fuzz, the chart checks and a bench smoke run.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"
export PATH="$DATA_DIR/bin:$PATH"

started_stack=0
stack_running || started_stack=1
cleanup() {
  local status=$?
  scripts/cluster.sh stop >/dev/null 2>&1 || true
  [ -n "${test_node_pid:-}" ] && kill "$test_node_pid" 2>/dev/null
  [ "$started_stack" = 1 ] && scripts/stack.sh down
  exit "$status"
}
trap cleanup EXIT

step "installing what is missing"
scripts/deps.sh
scripts/stack.sh up
# The URLs, and the CA and TLS URLs the TLS tests (tests/api/tls.rs) connect with.
eval "$(scripts/stack.sh env)"

# Databases left by earlier runs of the tests.
PGPASSWORD=wallet psql -h 127.0.0.1 -p "$PG_PORT" -U wallet -d postgres -Atqc \
  "select 'drop database \"' || datname || '\";' from pg_database where datname like 'test\_%'" \
  | PGPASSWORD=wallet psql -h 127.0.0.1 -p "$PG_PORT" -U wallet -d postgres -q >/dev/null

step "formatting and clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "supply chain: licenses, duplicate versions, sources (cargo-deny, deny.toml)"
# cargo-deny reads the metadata of every platform's packages; a build fetches only this one's.
cargo fetch --locked --quiet
cargo deny --frozen check licenses bans sources
# The RustSec advisory database comes over the network: checked where it can be fetched.
if cargo deny fetch db >/dev/null 2>&1; then
  cargo deny --frozen check advisories
else
  printf '\033[1;33mSKIPPED: cargo deny check advisories (the RustSec advisory database cannot be fetched from here)\033[0m\n'
fi

step "tests (real PostgreSQL, Redis and NATS)"
cargo build --workspace --bins --locked
# deps.sh installed nats-server: the NATS sink's tests must run, not skip.
WALLET_REQUIRE_NATS=1 cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-4}"

step "a node for the API fuzz and the dashboard check"
scripts/cluster.sh up 1 >/dev/null
node_admin=http://127.0.0.1:9090
node_api=http://127.0.0.1:8080

step "API fuzz from the node's own OpenAPI document (schemathesis)"
scripts/schemathesis.sh "$node_api"

step "Grafana dashboard queries use only metrics the node exposes"
"$DATA_DIR/venv/bin/python" scripts/check-dashboard-metrics.py charts/wallet/dashboards/wallet.json "$node_admin/metrics"
scripts/cluster.sh stop

step "Helm chart and kustomize manifests (offline validation)"
scripts/k8s-check.sh

step "bench smoke: constant and failover with the consistency check"
scripts/bench.sh smoke

step "bench-compare's summary arithmetic (made-up results)"
python3 scripts/bench_compare.py --self-test

step "all checks passed"

#!/usr/bin/env bash
# The cluster fault tests (tests/cluster): nodes as processes, killed, paused, partitioned in
# network namespaces, with PostgreSQL and Redis faults, each ending with the full audit.
# Like `make test`: installs what is missing, starts PostgreSQL and Redis in .data/ (and
# stops them again if it started them).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"
export PATH="$DATA_DIR/bin:$PATH"

started_stack=0
stack_running || started_stack=1
cleanup() {
  local status=$?
  [ "$started_stack" = 1 ] && scripts/stack.sh down
  exit "$status"
}
trap cleanup EXIT

scripts/deps.sh --servers-only
scripts/stack.sh up
eval "$(scripts/stack.sh env)"
cargo build --workspace --bins --locked
cargo test -p wallet-tests --test cluster --locked -- --test-threads="${TEST_THREADS:-2}" --skip transfers::
# 1000 transfers/s under faults needs release nodes: debug ones cannot carry the rate on
# two cores, and would only measure that.
cargo build --release -p wallet --bin wallet --locked
WALLET_BIN="$REPO_ROOT/target/release/wallet" \
  cargo test -p wallet-tests --test cluster --locked -- --test-threads=1 transfers::

#!/usr/bin/env bash
# Two builds in one run: REV (a worktree in .data/compare) against this working tree, the
# same wallet-bench (this tree's) against both, on a fresh 3-node cluster per run, in
# A B B A order so that the machine's drift hits both builds alike.
#   bench-compare.sh REV
# Environment (defaults):
#   COMPARE_PAIRS=4                       pairs of runs (each pair: one run of each build)
#   COMPARE_SCENARIOS="saturate-one multi-uniform constant"
#   COMPARE_DURATION=20s                  duration of every scenario
#   COMPARE_ARGS=""                       more wallet-bench flags, for both builds
#   COMPARE_BASE_ENV=""                   VAR=value ... for the base runs' nodes only; with
#                                         REV=HEAD this compares one build with itself under
#                                         other settings (make bench-events: events off vs on)
# Prints, per scenario, each build's runs, their mean and spread, the ratio of the means
# and the median, min and max of the per-pair ratios, plus node CPU per operation; every
# run must pass wallet-bench's consistency check (balances equal the audit trail).
# Results: .data/compare/<short rev>-vs-<short HEAD>/ (one folder per run, summary.md/json).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Both builds measured alike: the nodes of this tree publish to no NATS either (cluster.sh).
export WALLET_LOCAL_NATS="${WALLET_LOCAL_NATS:-0}"
cd "$REPO_ROOT"

REV="${1:-}"
if [ -z "$REV" ]; then
  echo "usage: $0 REV   (e.g. make bench-compare REV=origin/main~1)" >&2
  exit 2
fi
PAIRS="${COMPARE_PAIRS:-4}"
read -r -a SCENARIOS <<<"${COMPARE_SCENARIOS:-saturate-one multi-uniform constant}"
DURATION="${COMPARE_DURATION:-20s}"
read -r -a EXTRA <<<"${COMPARE_ARGS:-}"
read -r -a BASE_ENV <<<"${COMPARE_BASE_ENV:-}"

base_sha=$(git rev-parse --verify "$REV^{commit}")
head_sha=$(git rev-parse HEAD)
dirty=""; git diff --quiet HEAD -- || dirty="+changes"
COMPARE_DIR="$DATA_DIR/compare"
BASE_TREE="$COMPARE_DIR/tree-${base_sha:0:12}"
OUT="$COMPARE_DIR/${base_sha:0:8}-vs-${head_sha:0:8}$dirty-$(date -u +%Y%m%dT%H%M%SZ)"

# Both builds use the same ports, PostgreSQL and Redis ports included: nothing else may run.
# (The nodes' public ports are fixed in older revisions' cluster.sh, as in wallet-bench's defaults.)
if ss -ltn 2>/dev/null | grep -qE "(127\.0\.0\.1|\*):(808[0-2]|$PG_PORT|$REDIS_PORT)\b"; then
  echo "a cluster or the local stack is running (ports 8080-8082, $PG_PORT or $REDIS_PORT): stop it first (make down)" >&2
  exit 1
fi

mkdir -p "$COMPARE_DIR" "$OUT"
if [ "$base_sha" = "$head_sha" ] && [ ${#BASE_ENV[@]} -gt 0 ]; then
  # One build (this tree's) under two settings: no second tree.
  BASE_TREE="$REPO_ROOT"
elif [ ! -d "$BASE_TREE" ]; then
  log "worktree of $REV (${base_sha:0:12}) in $BASE_TREE"
  git worktree add --detach "$BASE_TREE" "$base_sha" >/dev/null
fi
# Base revisions share one target folder, so a second REV rebuilds only what changed; a
# first one starts from a copy of this tree's release dependencies instead of from nothing.
if [ "$BASE_TREE" != "$REPO_ROOT" ] && [ ! -d "$COMPARE_DIR/target" ]; then
  mkdir -p "$COMPARE_DIR/target"
  [ -d target/release ] && cp -a --reflink=auto target/release "$COMPARE_DIR/target/"
fi
[ -e "$BASE_TREE/target" ] || ln -s ../target "$BASE_TREE/target"

log "release builds: $REV in $BASE_TREE, this tree, and this tree's wallet-bench"
[ "$BASE_TREE" = "$REPO_ROOT" ] || (cd "$BASE_TREE" && cargo build --release --locked -p wallet -p wallet-migrator --bins)
cargo build --release --locked -p wallet -p wallet-migrator -p wallet-bench --bins
BENCH="$REPO_ROOT/target/release/wallet-bench"

durations=(--saturate-duration "$DURATION" --multi-duration "$DURATION" --constant-duration "$DURATION")

# run LABEL TREE PAIR: a fresh cluster in TREE, the scenarios, the cluster and stack down.
run() {
  local label=$1 tree=$2 pair=$3 settings=()
  [ "$label" = base ] && settings=("${BASE_ENV[@]}")
  log "pair $pair: $label ($tree) ${settings[*]}"
  (
    # Each tree's scripts pick their own stack's URLs (the logins differ between
    # revisions); the ones this script's lib.sh exported would leak into the other tree.
    unset DATABASE_URL DATABASE_OWNER_URL DATABASE_ADMIN_URL REDIS_URL WALLET_DATA_DIR
    cd "$tree"
    trap 'PROFILE=release scripts/cluster.sh down >/dev/null 2>&1 || true' EXIT
    env "${settings[@]}" PROFILE=release scripts/cluster.sh up 3 >"$OUT/$label-$pair.cluster.log" 2>&1 \
      || { cat "$OUT/$label-$pair.cluster.log" >&2; exit 1; }
    eval "$(scripts/stack.sh env)"
    # The owner login runs the bench's SQL where the revision has one.
    "$BENCH" run "${SCENARIOS[@]}" --root "$tree" --out "$OUT/$label-$pair" \
      --database-url "${DATABASE_OWNER_URL:-$DATABASE_URL}" "${durations[@]}" "${EXTRA[@]}" \
      >"$OUT/$label-$pair.log" 2>&1 || { tail -40 "$OUT/$label-$pair.log" >&2; exit 1; }
  )
}

for pair in $(seq 1 "$PAIRS"); do
  if [ $((pair % 2)) = 1 ]; then
    run base "$BASE_TREE" "$pair"; run head "$REPO_ROOT" "$pair"
  else
    run head "$REPO_ROOT" "$pair"; run base "$BASE_TREE" "$pair"
  fi
done

python3 scripts/bench_compare.py "$OUT" \
  --base "$REV (${base_sha:0:12})${BASE_ENV[*]:+ with ${BASE_ENV[*]}}" --head "HEAD (${head_sha:0:12}$dirty)" --pairs "$PAIRS"

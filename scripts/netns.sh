#!/usr/bin/env bash
# Network namespaces for the partition tests: `netns.sh up [N]|down|status`.
#
# `up` (idempotent) makes a bridge wnbr0 (10.77.0.1/24) on the host and N namespaces
# wallet-n<i> (i = 0..N-1, N <= 10, default 3), each with a veth into the bridge at
# 10.77.0.1<i>/24, loopback up and a default route via 10.77.0.1. Inside each namespace
# the filter chains WALLET_IN and WALLET_OUT hang off INPUT and OUTPUT, empty: the
# tests put their DROP rules there and heal by flushing them. `down` removes it all.
#
# How nodes in a namespace reach PostgreSQL and Redis, which listen on 127.0.0.1 only:
# the host DNATs 10.77.0.1:<port> to 127.0.0.1:<port> (route_localnet=1 on the bridge
# lets a packet from the bridge be routed to loopback) and SNATs the source to
# 127.0.0.1, so both servers see a loopback client and pg_hba, Redis' bind and
# protected mode need no change. Chosen over the alternatives because it is kernel
# state only: no process to keep alive (a TCP proxy), it survives the PostgreSQL and
# Redis restarts other tests do, and stack.sh stays as it is (PostgreSQL cannot bind
# 10.77.0.1 before the bridge exists, so listening there would tie the stack's start
# to this script). A cut inside a namespace drops packets before they leave it, so the
# forwarding does not soften the black hole.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BRIDGE=wnbr0
GATEWAY=10.77.0.1
SUBNET=10.77.0.0/24
NS_PREFIX=wallet-n
# Host nat chains of this script, so `down` removes exactly what `up` added.
NAT_PRE=WALLET_NETNS_DNAT
NAT_IN=WALLET_NETNS_SNAT

need() {
  [ "$(id -u)" = 0 ] || { echo "netns.sh: needs root (network namespaces, iptables)" >&2; exit 1; }
  command -v ip >/dev/null || { echo "netns.sh: 'ip' not found: apt-get install -y iproute2" >&2; exit 1; }
  command -v iptables >/dev/null || { echo "netns.sh: 'iptables' not found: apt-get install -y iptables" >&2; exit 1; }
}

# Not a `... | grep -q` pipeline: grep's early exit fails it under pipefail (SIGPIPE).
ns_exists() { grep -qx "$1" <<<"$(ip netns list | awk '{print $1}')"; }

# Appends a rule unless the same one is already there.
ensure_rule() { # table chain rule...
  local table=$1 chain=$2; shift 2
  iptables -t "$table" -C "$chain" "$@" 2>/dev/null || iptables -t "$table" -A "$chain" "$@"
}

up() {
  local nodes=${1:-${WALLET_NETNS_NODES:-3}}
  [ "$nodes" -ge 1 ] && [ "$nodes" -le 10 ] || { echo "netns.sh: 1 to 10 namespaces" >&2; exit 2; }
  need
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "creating bridge $BRIDGE ($GATEWAY/24)"
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$GATEWAY/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  echo 1 > "/proc/sys/net/ipv4/conf/$BRIDGE/route_localnet"

  local i ns veth
  for i in $(seq 0 $((nodes - 1))); do
    ns=$NS_PREFIX$i veth=veth-wn$i
    if ! ns_exists "$ns"; then
      log "creating namespace $ns (10.77.0.1$i)"
      ip netns add "$ns"
    fi
    if ! ip netns exec "$ns" ip link show eth0 >/dev/null 2>&1; then
      ip link del "$veth" 2>/dev/null || true
      ip link add "$veth" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$veth" master "$BRIDGE" up
    ip netns exec "$ns" sh -euc "
      ip addr replace 10.77.0.1$i/24 dev eth0
      ip link set eth0 up
      ip link set lo up
      ip route replace default via $GATEWAY
      for pair in INPUT:WALLET_IN OUTPUT:WALLET_OUT; do
        chain=\${pair#*:}
        iptables -N \$chain 2>/dev/null || true
        iptables -C \${pair%%:*} -j \$chain 2>/dev/null || iptables -I \${pair%%:*} -j \$chain
      done"
  done

  iptables -t nat -N "$NAT_PRE" 2>/dev/null || iptables -t nat -F "$NAT_PRE"
  iptables -t nat -N "$NAT_IN" 2>/dev/null || iptables -t nat -F "$NAT_IN"
  local port
  for port in "$PG_PORT" "$REDIS_PORT"; do
    iptables -t nat -A "$NAT_PRE" -d "$GATEWAY" -p tcp --dport "$port" -j DNAT --to-destination "127.0.0.1:$port"
    iptables -t nat -A "$NAT_IN" -s "$SUBNET" -d 127.0.0.1 -p tcp --dport "$port" -j SNAT --to-source 127.0.0.1
  done
  ensure_rule nat PREROUTING -i "$BRIDGE" -j "$NAT_PRE"
  ensure_rule nat INPUT -s "$SUBNET" -j "$NAT_IN"
  # Where br_netfilter is loaded (Docker hosts) bridged traffic crosses FORWARD, whose
  # policy may be DROP: namespace-to-namespace traffic must not depend on that.
  ensure_rule filter FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT
  log "namespaces ${NS_PREFIX}0..${NS_PREFIX}$((nodes - 1)) ready; PostgreSQL at $GATEWAY:$PG_PORT, Redis at $GATEWAY:$REDIS_PORT"
}

down() {
  need
  local ns
  for ns in $(ip netns list | awk '{print $1}' | grep "^$NS_PREFIX[0-9]*$" || true); do
    log "removing namespace $ns"
    ip netns del "$ns"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  iptables -t nat -D PREROUTING -i "$BRIDGE" -j "$NAT_PRE" 2>/dev/null || true
  iptables -t nat -D INPUT -s "$SUBNET" -j "$NAT_IN" 2>/dev/null || true
  iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || true
  local chain
  for chain in "$NAT_PRE" "$NAT_IN"; do
    iptables -t nat -F "$chain" 2>/dev/null || true
    iptables -t nat -X "$chain" 2>/dev/null || true
  done
}

# Which namespaces exist and whether each reaches PostgreSQL and Redis through the host.
status() {
  need
  local ns
  for ns in $(ip netns list | awk '{print $1}' | grep "^$NS_PREFIX[0-9]*$" || true); do
    local pg=no redis=no cuts
    ip netns exec "$ns" timeout 2 bash -c "</dev/tcp/$GATEWAY/$PG_PORT" 2>/dev/null && pg=yes
    ip netns exec "$ns" timeout 2 bash -c "</dev/tcp/$GATEWAY/$REDIS_PORT" 2>/dev/null && redis=yes
    cuts=$(ip netns exec "$ns" iptables -S 2>/dev/null | grep -c -- '-A WALLET_.* -j DROP' || true)
    echo "$ns $(ip netns exec "$ns" ip -4 -o addr show dev eth0 | awk '{print $4}') postgres=$pg redis=$redis drop-rules=$cuts"
  done
}

# Two `up`s at once would race on the same links and rules.
serialised() {
  exec 9>"${TMPDIR:-/tmp}/wallet-netns.sh.lock"
  flock 9
  "$@"
}

case "${1:-}" in
  up) serialised up "${2:-}" ;;
  down) serialised down ;;
  status) status ;;
  *) echo "usage: $0 up [N]|down|status" >&2; exit 2 ;;
esac

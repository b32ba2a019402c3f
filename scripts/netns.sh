#!/usr/bin/env bash
# Two test hosts on one machine: network namespaces A and B joined by a veth pair, the same way
# `ftvm_channel::netns::HostPair` makes them (lo up, IPv6 off, fixed MACs, optional IPv4).
#
#   scripts/netns.sh up      create (idempotent: a leftover of the same names is replaced)
#   scripts/netns.sh down    remove (idempotent)
#   scripts/netns.sh status  show both ends
#
# Environment (defaults in brackets):
#   FTVM_NS_A [ftvm-a]   FTVM_NS_B [ftvm-b]          namespace names
#   FTVM_IF_A [ftvm-va]  FTVM_IF_B [ftvm-vb]         veth end names (<= 15 bytes)
#   FTVM_MAC_A [02:66:74:76:6d:0a]  FTVM_MAC_B [02:66:74:76:6d:0b]
#   FTVM_IP_A / FTVM_IP_B  e.g. 10.77.0.1/24 and 10.77.0.2/24 (unset: no IPv4 address)
#   FTVM_MTU               MTU of both ends (unset: 1500)
# Needs root and iproute2. Run a command on host B with: ip netns exec ftvm-b CMD...
set -euo pipefail

NS_A=${FTVM_NS_A:-ftvm-a}
NS_B=${FTVM_NS_B:-ftvm-b}
IF_A=${FTVM_IF_A:-ftvm-va}
IF_B=${FTVM_IF_B:-ftvm-vb}
MAC_A=${FTVM_MAC_A:-02:66:74:76:6d:0a}
MAC_B=${FTVM_MAC_B:-02:66:74:76:6d:0b}
IP_A=${FTVM_IP_A:-}
IP_B=${FTVM_IP_B:-}
MTU=${FTVM_MTU:-}

down() {
  for ns in "$NS_A" "$NS_B"; do
    if [ -e "/run/netns/$ns" ]; then
      ip netns del "$ns"
    fi
  done
}

mkns() {
  local ns=$1
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  if [ -d /proc/sys/net/ipv6 ]; then
    ip netns exec "$ns" sh -c \
      'echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6'
  fi
}

up() {
  down
  mkns "$NS_A"
  mkns "$NS_B"
  ip link add "$IF_A" netns "$NS_A" address "$MAC_A" type veth \
    peer name "$IF_B" netns "$NS_B" address "$MAC_B"
  local ns ifc addr
  for side in A B; do
    if [ "$side" = A ]; then ns=$NS_A ifc=$IF_A addr=$IP_A; else ns=$NS_B ifc=$IF_B addr=$IP_B; fi
    if [ -n "$MTU" ]; then ip -n "$ns" link set dev "$ifc" mtu "$MTU"; fi
    if [ -n "$addr" ]; then ip -n "$ns" addr add "$addr" dev "$ifc"; fi
    ip -n "$ns" link set dev "$ifc" up
  done
  echo "up: $NS_A/$IF_A ($MAC_A${IP_A:+ $IP_A}) <-> $NS_B/$IF_B ($MAC_B${IP_B:+ $IP_B})"
}

status() {
  ip -n "$NS_A" -br link show dev "$IF_A"
  ip -n "$NS_B" -br link show dev "$IF_B"
}

if [ "$(id -u)" != 0 ]; then
  echo "netns.sh: needs root" >&2
  exit 1
fi
case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

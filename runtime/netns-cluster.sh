#!/usr/bin/env bash
# A three-host test cluster on one machine: network namespaces joined by a bridge. Needs root.
#
#   runtime/netns-cluster.sh up PREFIX SUBNET [RATE]   # e.g. up fs1 10.77.1 1gbit
#   runtime/netns-cluster.sh down PREFIX
#
# `up` makes namespaces PREFIX-a, PREFIX-b, PREFIX-c with addresses SUBNET.2, .3 and .4 on their
# eth0, and a bridge PREFIXbr holding SUBNET.1 in this namespace (where the driver runs). With a
# RATE, every link is limited to it by a tbf qdisc on both ends. The kernels here have no netem,
# so there is no delay or loss: a test that needs delay adds it in a process.
# Run an agent in a host with: ip netns exec PREFIX-a fastserve agent --listen SUBNET.2:7301 ...
set -euo pipefail

usage() { echo "usage: $0 up PREFIX SUBNET [RATE] | down PREFIX" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 prefix=$2
[[ $prefix =~ ^[a-z][a-z0-9]{0,7}$ ]] || { echo "PREFIX: 1-8 lowercase letters/digits" >&2; exit 2; }
hosts=(a b c)

down() {
  for h in "${hosts[@]}"; do ip netns del "$prefix-$h" 2>/dev/null || true; done
  ip link del "${prefix}br" 2>/dev/null || true
}

case $cmd in
  up)
    [ $# -ge 3 ] || usage
    subnet=$3 rate=${4:-}
    [[ $subnet =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || { echo "SUBNET: like 10.77.1" >&2; exit 2; }
    down
    trap 'down' ERR
    ip link add "${prefix}br" type bridge
    ip addr add "$subnet.1/24" dev "${prefix}br"
    ip link set "${prefix}br" up
    for i in 0 1 2; do
      h=${hosts[$i]} ns="$prefix-${hosts[$i]}"
      ip netns add "$ns"
      ip link add "${prefix}$h" type veth peer name "${prefix}${h}p"
      ip link set "${prefix}${h}p" netns "$ns"
      ip -n "$ns" link set "${prefix}${h}p" name eth0
      ip -n "$ns" addr add "$subnet.$((i + 2))/24" dev eth0
      ip -n "$ns" link set lo up
      ip -n "$ns" link set eth0 up
      ip link set "${prefix}$h" master "${prefix}br"
      ip link set "${prefix}$h" up
      if [ -n "$rate" ]; then
        tc qdisc add dev "${prefix}$h" root tbf rate "$rate" burst 256kb latency 50ms
        ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst 256kb latency 50ms
      fi
    done
    ;;
  down) down ;;
  *) usage ;;
esac

# Network namespaces for the benches that cut links between workers (partition.sh, nemesis.sh); sourced, not run.

# netns_pool BRIDGE SUBNET NS...: one namespace per worker, the i-th (from 0) with address SUBNET.(i+1)/24 on its
# veth `v<i>`, all joined by a bridge in namespace BRIDGE; bringing `v<i>-br` down there cuts worker i off.
netns_pool() {
  local br=$1 subnet=$2 i=0 ns
  shift 2
  ip netns add "$br"
  ip -n "$br" link add br0 type bridge
  ip -n "$br" link set br0 up
  for ns in "$@"; do
    ip netns add "$ns"
    ip link add "v$i" netns "$ns" type veth peer name "v$i-br" netns "$br"
    ip -n "$br" link set "v$i-br" master br0 up
    ip -n "$ns" addr add "$subnet.$((i + 1))/24" dev "v$i"
    ip -n "$ns" link set "v$i" up
    ip -n "$ns" link set lo up
    i=$((i + 1))
  done
}

# netns_clear NS...: removes the namespaces, those that exist.
netns_clear() {
  local ns
  for ns in "$@"; do ip netns del "$ns" 2>/dev/null || true; done
}

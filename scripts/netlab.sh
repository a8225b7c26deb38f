# A network to measure on: the store and each node in a network namespace of its own,
# joined by veth links to a bridge in a "switch" namespace, the store's link shaped to a
# profile's rate (tbf) and every request to the store delayed by the profile's latency
# (scripts/bench/delay_proxy.py: this machine's kernel has no netem).
#
# Sourced by scripts/bench/net.sh and tests; needs root, iproute2 and tc. Nothing runs
# in the host's own namespace, and every namespace is named NETLAB_PREFIX-*, so
# `netlab_down` (or a rerun's `netlab_up`) removes all of them.
#
#   . scripts/netlab.sh
#   netlab_profile region                 # sets NETLAB_DELAY_MS, NETLAB_RATE
#   netlab_up 8                           # lbn-store (10.77.0.1) and lbn-1..8 (10.77.0.11..)
#   netlab_exec store lazyblk store ...   # a command inside a namespace
#   netlab_down
#
# Profiles (what the store looks like from a node):
#   region  object store in region: 20 ms per request, 1 Gbit/s
#   far     a far store: 60 ms per request, 200 Mbit/s
#   local   no delay, no shaping (the loopback figures, through the same namespaces)
# Node to node links are not shaped (nodes of one fleet are a rack apart); set
# NETLAB_NODE_RATE (a tc rate such as 10gbit) to shape them too.

NETLAB_PREFIX=${NETLAB_PREFIX:-lbn}
NETLAB_NET=${NETLAB_NET:-10.77.0}
NETLAB_NODES=0

netlab_profile() { # NAME
  case $1 in
    region) NETLAB_DELAY_MS=20 NETLAB_RATE=1gbit ;;
    far) NETLAB_DELAY_MS=60 NETLAB_RATE=200mbit ;;
    local) NETLAB_DELAY_MS=0 NETLAB_RATE= ;;
    *) echo "netlab: unknown profile $1 (region, far, local)" >&2; return 2 ;;
  esac
  NETLAB_PROFILE=$1
}

# The namespace of an endpoint: "store", "sw" or a node number.
netlab_ns() { echo "$NETLAB_PREFIX-$1"; }
# The address of an endpoint: the store is .1, node N is .(10+N).
netlab_ip() { if [ "$1" = store ]; then echo "$NETLAB_NET.1"; else echo "$NETLAB_NET.$((10 + $1))"; fi; }
# In the background, call `ip netns exec "$(netlab_ns E)" ...` instead, so that $! is the
# command's pid and not a subshell's.
netlab_exec() { # ENDPOINT COMMAND...
  local ns
  ns=$(netlab_ns "$1")
  shift
  ip netns exec "$ns" "$@"
}

netlab_down() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk -v p="$NETLAB_PREFIX-" 'index($1, p) == 1 { print $1 }'); do
    # Processes left in a namespace keep it (and its addresses) alive: stop them.
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  NETLAB_NODES=0
}

# tbf on DEV in namespace NS at RATE: a bucket of at least 64 KiB (one GSO packet) and
# 2 ms of the rate, at most 50 ms of queue.
netlab_shape() { # NS DEV RATE
  local bits burst
  bits=$(tc_rate_bits "$3")
  burst=$((bits / 8 / 500))
  [ "$burst" -lt 131072 ] && burst=131072
  ip netns exec "$1" tc qdisc replace dev "$2" root tbf rate "$3" burst "$burst" latency 50ms
}
tc_rate_bits() {
  case $1 in
    *gbit) echo $((${1%gbit} * 1000000000)) ;;
    *mbit) echo $((${1%mbit} * 1000000)) ;;
    *kbit) echo $((${1%kbit} * 1000)) ;;
    *) echo "$1" ;;
  esac
}

# One endpoint: its namespace, a veth to the switch's bridge, its address, lo up.
netlab_endpoint() { # ENDPOINT PORT_NAME
  local ns sw port=$2
  ns=$(netlab_ns "$1")
  sw=$(netlab_ns sw)
  ip netns add "$ns"
  ip link add "$port" netns "$sw" type veth peer name eth0 netns "$ns"
  ip netns exec "$sw" ip link set "$port" master br0 up
  ip netns exec "$ns" ip addr add "$(netlab_ip "$1")/24" dev eth0
  ip netns exec "$ns" ip link set eth0 up
  ip netns exec "$ns" ip link set lo up
}

netlab_up() { # NODES
  local n=$1 i sw
  netlab_down
  sw=$(netlab_ns sw)
  ip netns add "$sw"
  ip netns exec "$sw" ip link add br0 type bridge
  ip netns exec "$sw" ip link set br0 up
  ip netns exec "$sw" ip link set lo up
  netlab_endpoint store p-store
  for i in $(seq "$n"); do netlab_endpoint "$i" "p-$i"; done
  if [ -n "${NETLAB_RATE:-}" ]; then
    # Both directions of the store's link: what it sends (its eth0) and what it is
    # sent (the switch's port towards it).
    netlab_shape "$(netlab_ns store)" eth0 "$NETLAB_RATE"
    netlab_shape "$sw" p-store "$NETLAB_RATE"
  fi
  if [ -n "${NETLAB_NODE_RATE:-}" ]; then
    for i in $(seq "$n"); do
      netlab_shape "$(netlab_ns "$i")" eth0 "$NETLAB_NODE_RATE"
      netlab_shape "$sw" "p-$i" "$NETLAB_NODE_RATE"
    done
  fi
  NETLAB_NODES=$n
}

# Starts the delay proxy in the store's namespace: nodes reach the store at
# http://STORE_IP:PUBLIC_PORT, which forwards to 127.0.0.1:STORE_PORT there after the
# profile's delay. Prints the proxy's pid; its messages go to LOG.
netlab_store_proxy() { # PUBLIC_PORT STORE_PORT LOG
  local here
  here=$(dirname "${BASH_SOURCE[0]}")
  # `ip netns exec` itself (not netlab_exec) in the background: $! is then the proxy.
  ip netns exec "$(netlab_ns store)" /usr/bin/python3 "$here/bench/delay_proxy.py" \
    "$(netlab_ip store):$1" "127.0.0.1:$2" "${NETLAB_DELAY_MS:-0}" </dev/null >>"$3" 2>&1 &
  echo $!
}

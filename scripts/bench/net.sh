#!/usr/bin/env bash
# B9 over a shaped network: N nodes, each in a network namespace of its own, read one
# new template at once from a store whose link has a network profile's rate and
# per-request delay (scripts/netlab.sh), with peers (--advertise) and without. Per
# profile: the wave's wall time against one node alone, the store's bytes sent over
# the template's stored bytes, and the bytes on peer links per node over the stored
# bytes. A second wave replays a boot trace instead: the store holds a trace of the
# template (a boot's scattered reads: BENCH_NET_TRACE_EVERY, one 64 KiB range in every
# 4th chunk by default), each fresh node opens the template (its replay starts at once,
# lazyblk_replay_stopped_total{reason="done"} says when it ends), and the same ratios
# are taken against the bytes of the chunks the trace names.
#
#   scripts/bench/net.sh [PROFILE...]        # default: region far; needs root
#   BENCH_BIN=target/debug/lazyblk BENCH_NET_MIB=16 scripts/bench/net.sh region
#
# Environment: BENCH_BIN (default target/release/lazyblk), BENCH_DIR (work directory,
# default bench/work), BENCH_NET_NODES (8), BENCH_NET_MIB (the template's size, 64),
# BENCH_NET_ROWS (a file the table rows are appended to, for scripts/bench.sh).
# Prints a markdown table. Ratios within one run are what count.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
. "$repo/scripts/netlab.sh"
bin=$(realpath "${BENCH_BIN:-$repo/target/release/lazyblk}")
work=$(realpath -m "${BENCH_DIR:-$repo/bench/work}")/net
nodes=${BENCH_NET_NODES:-8}
mib=${BENCH_NET_MIB:-64}
trace_every=${BENCH_NET_TRACE_EVERY:-4}
profiles=("$@")
[ ${#profiles[@]} -eq 0 ] && profiles=(region far)
MIB=1048576
store_port=7000 proxy_port=7001 node_port=8000
export LAZYBLK_LOG=${LAZYBLK_LOG:-warn}

die() { echo "bench/net: $*" >&2; exit 1; }
log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
[ -x "$bin" ] || die "no lazyblk binary at $bin (cargo build --release, or set BENCH_BIN)"
command -v nbdcopy >/dev/null || die "needs nbdcopy (scripts/setup.sh)"

cleanup() {
  set +e
  netlab_down
  [ -z "${BENCH_KEEP:-}" ] && rm -rf "$work"
}
trap cleanup EXIT
rm -rf "$work"
mkdir -p "$work/logs"

now_ns() { date +%s%N; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }
meets() { awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN {
  ok = (op == "<=") ? (v <= t) : (v >= t); print ok ? "yes" : "NO" }'; }
# A metric of the server at URL, asked from inside ENDPOINT's namespace.
metric() { # ENDPOINT URL NAME
  netlab_exec "$1" curl -sf "$2/metrics" | awk -v n="$3" '$1 == n { v += $2 } END { printf "%.0f", v }'
}
wait_http() { # ENDPOINT URL
  for _ in $(seq 300); do netlab_exec "$1" curl -sf -o /dev/null "$2" && return 0; sleep 0.05; done
  die "no answer from $2 in $(netlab_ns "$1")"
}
node_url() { echo "http://$(netlab_ip "$1"):$node_port"; }
store_local=http://127.0.0.1:$store_port

rows=()
row() { rows+=("| $1 | $2 | $3 | $4 | $5 | $6 |"); }

# The template: an ext4 of random data (incompressible: stored bytes = data bytes).
mkdir -p "$work/src"
head -c "$((mib * MIB * 5 / 8))" /dev/urandom >"$work/src/data"
mkfs.ext4 -q -F -b 4096 -d "$work/src" "$work/wave.img" "${mib}M"
rm -rf "$work/src"

pids=()
start_nodes() { # COUNT PEERS(yes|no) TAG
  local i adv
  for i in $(seq "$1"); do
    adv=()
    [ "$2" = yes ] && adv=(--advertise "$(node_url "$i")")
    ip netns exec "$(netlab_ns "$i")" "$bin" daemon --cache "$work/$3-$i" --store "http://$(netlab_ip store):$proxy_port" \
      --listen "$(netlab_ip "$i"):$node_port" --nbd "unix:$work/$3-$i.sock" "${adv[@]}" \
      >>"$work/logs/daemons.log" 2>&1 &
    pids+=($!)
  done
  for i in $(seq "$1"); do wait_http "$i" "$(node_url "$i")/healthz"; done
  if [ "$2" = yes ]; then
    for _ in $(seq 200); do
      [ "$(netlab_exec store "$bin" nodes --store "$store_local" --json | jq length)" -ge "$1" ] && break
      sleep 0.1
    done
    sleep 2.5 # one more heartbeat: every node has the whole list
  fi
}
stop_nodes() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null || true; done
  pids=()
  for _ in $(seq 100); do
    [ "$(netlab_exec store "$bin" nodes --store "$store_local" --json | jq length)" -eq 0 ] && break
    sleep 0.1
  done
}
# Every node of the wave reads TEMPLATE at once; prints the wall time.
read_all() { # COUNT TEMPLATE TAG
  local t0 t1 i ps=()
  t0=$(now_ns)
  for i in $(seq "$1"); do
    nbdcopy "nbd+unix:///$2?socket=$work/$3-$i.sock" null: 2>>"$work/logs/nbdcopy.err" &
    ps+=($!)
  done
  for p in "${ps[@]}"; do wait "$p" || die "a wave read failed (see $work/logs)"; done
  t1=$(now_ns)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'
}
# Every node of the wave opens TEMPLATE at once (its replay starts) and the wave ends
# when every node's replay is done; prints the wall time.
replay_all() { # COUNT TEMPLATE TAG
  local t0 t1 i done_count
  t0=$(now_ns)
  for i in $(seq "$1"); do
    nbdinfo --size "nbd+unix:///$2?socket=$work/$3-$i.sock" >/dev/null 2>>"$work/logs/nbdinfo.err" &
  done
  wait
  for _ in $(seq 6000); do
    done_count=0
    for i in $(seq "$1"); do
      [ "$(metric "$i" "$(node_url "$i")" 'lazyblk_replay_stopped_total{reason="done"}')" -ge 1 ] &&
        done_count=$((done_count + 1))
    done
    [ "$done_count" -eq "$1" ] && break
    sleep 0.05
  done
  [ "$done_count" -eq "$1" ] || die "only $done_count of $1 replays finished (see $work/logs)"
  t1=$(now_ns)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'
}
# A boot trace of TEMPLATE in the store: one 64 KiB range in every `trace_every`th of its
# data chunks; prints the stored bytes of the chunks it names.
put_trace() { # TEMPLATE
  local manifest chunk_size doc
  manifest=$(netlab_exec store curl -sf "$store_local/v1/templates/$1/manifest")
  chunk_size=$(jq .chunk_size <<<"$manifest")
  doc=$(jq -c --argjson every "$trace_every" --argjson cs "$chunk_size" --arg id "$1" '
    [.chunks | to_entries[] | select(.value != null) | .key] as $data
    | [$data | to_entries[] | select(.key % $every == 0) | .value] as $picked
    | {template: $id, version: 2, chunks: $picked, ranges: [$picked[] | [. * $cs, 65536]]}' \
    <<<"$manifest")
  netlab_exec store curl -sf -X PUT -H 'content-type: application/json' --data-binary "$doc" \
    "$store_local/v1/templates/$1/trace" >/dev/null || die "the trace of $1 was refused"
  jq -r '.chunks | length' <<<"$doc" | awk -v cs="$chunk_size" '{ printf "%.0f", $1 * cs }'
}
peer_bytes() { # COUNT: bytes served to peers by every node
  local i sum=0
  for i in $(seq "$1"); do
    sum=$((sum + $(metric "$i" "$(node_url "$i")" lazyblk_peer_bytes_served_total)))
  done
  echo "$sum"
}

round=0
for profile in "${profiles[@]}"; do
  netlab_profile "$profile"
  log "B9 over the '$profile' profile (${NETLAB_DELAY_MS} ms per request, ${NETLAB_RATE:-unshaped}): $nodes nodes, a $mib MiB template"
  netlab_up "$nodes"
  ip netns exec "$(netlab_ns store)" "$bin" store --root "$work/store-$profile" --listen "127.0.0.1:$store_port" \
    >>"$work/logs/store.log" 2>&1 &
  store_pid=$!
  wait_http store "$store_local/healthz"
  proxy_pid=$(netlab_store_proxy "$proxy_port" "$store_port" "$work/logs/proxy.log")
  wait_http 1 "http://$(netlab_ip store):$proxy_port/healthz"
  declare -A wall=() store_x=() peer_x=()
  for mode in one yes no; do
    round=$((round + 1))
    id="net-$round"
    netlab_exec store "$bin" publish "$work/wave.img" --template "$id" --store "$store_local" \
      >/dev/null 2>>"$work/logs/publish.err"
    stored=$(netlab_exec store curl -sf "$store_local/v1/templates/$id" | jq .stored_bytes)
    count=$nodes peers=$mode
    [ "$mode" = one ] && count=1 peers=no
    start_nodes "$count" "$peers" "$id"
    before=$(metric store "$store_local" lazyblk_store_bytes_served_total)
    wall[$mode]=$(read_all "$count" "$id" "$id")
    after=$(metric store "$store_local" lazyblk_store_bytes_served_total)
    store_x[$mode]=$(calc %.2f "($after - $before) / $stored")
    # Per reading node: what one node's peer link carried for it.
    peer_x[$mode]=$(calc %.2f "$(peer_bytes "$count") / ($count * $stored)")
    stop_nodes
  done
  declare -A rwall=() rstore_x=()
  for mode in one yes no; do
    round=$((round + 1))
    id="net-$round"
    netlab_exec store "$bin" publish "$work/wave.img" --template "$id" --store "$store_local" \
      >/dev/null 2>>"$work/logs/publish.err"
    traced=$(put_trace "$id")
    count=$nodes peers=$mode
    [ "$mode" = one ] && count=1 peers=no
    start_nodes "$count" "$peers" "$id"
    before=$(metric store "$store_local" lazyblk_store_bytes_served_total)
    rwall[$mode]=$(replay_all "$count" "$id" "$id")
    after=$(metric store "$store_local" lazyblk_store_bytes_served_total)
    # The chunks are random data, stored raw: a trace's chunk costs its whole size.
    rstore_x[$mode]=$(calc %.2f "($after - $before) / $traced")
    stop_nodes
  done
  kill "$proxy_pid" "$store_pid" 2>/dev/null || true
  wait "$proxy_pid" "$store_pid" 2>/dev/null || true
  netlab_down
  on=$(calc %.2f "${wall[yes]} / ${wall[one]}")
  off=$(calc %.2f "${wall[no]} / ${wall[one]}")
  row "B9 $profile ($NETLAB_DELAY_MS ms, $NETLAB_RATE): $nodes nodes at once, peers on, wall / one node's" \
    "${on}x (${wall[yes]} s; one node ${wall[one]} s)" "peers off: ${off}x (${wall[no]} s)" "${on}x" "<= 1.5x" "$(meets "$on" "<=" 1.5)"
  row "B9 $profile: store bytes sent / stored bytes, peers on" "${store_x[yes]}x" \
    "peers off: ${store_x[no]}x; one node: ${store_x[one]}x" "${store_x[yes]}x" "<= 1.2x" "$(meets "${store_x[yes]}" "<=" 1.2)"
  row "B9 $profile: bytes on peer links per node / stored bytes, peers on" "${peer_x[yes]}x" "" "-" "<= 1.1x" "$(meets "${peer_x[yes]}" "<=" 1.1)"
  on=$(calc %.2f "${rwall[yes]} / ${rwall[one]}")
  off=$(calc %.2f "${rwall[no]} / ${rwall[one]}")
  row "B9 $profile: $nodes nodes replay a boot trace at once, peers on, wall / one node's" \
    "${on}x (${rwall[yes]} s; one node ${rwall[one]} s)" "peers off: ${off}x (${rwall[no]} s)" "${on}x" "<= 1.5x" "$(meets "$on" "<=" 1.5)"
  row "B9 $profile replay: store bytes sent / the traced chunks' bytes, peers on" "${rstore_x[yes]}x" \
    "peers off: ${rstore_x[no]}x; one node: ${rstore_x[one]}x" "${rstore_x[yes]}x" "<= 1.2x" "$(meets "${rstore_x[yes]}" "<=" 1.2)"
  unset wall store_x peer_x rwall rstore_x
done

if [ -n "${BENCH_NET_ROWS:-}" ]; then
  printf '%s\n' "${rows[@]}" >>"$BENCH_NET_ROWS"
fi
echo "| figure | lazyblk | peer(s) | ratio | target | met? |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"

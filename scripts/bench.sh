#!/usr/bin/env bash
# The lazyblk benchmark (DESIGN.md section 9): every figure side by side in one run,
# on the same images, against real peers: nbdkit (file plugin; curl plugin with its
# cache filter over nginx), qemu-nbd, and the physical floors (`cat` of the image
# from the page cache, a plain `curl` of it from nginx). Prints a table of figures
# and ratios and writes it to bench/results.md. Absolute times are noisy here;
# ratios within one run are what count.
#
#   scripts/bench.sh                  # about 4 minutes on 2 cores; needs root
#   BENCH_DIR=/tmp/b BENCH_REPS=5 BENCH_FIO_RUNTIME=10 scripts/bench.sh
#   BENCH_KEEP=1 scripts/bench.sh     # keep images, store and caches afterwards
#
# Figures: B1 cached sequential NBD read, B2 cold sequential read, B3 cached 4 KiB
# random reads at queue depth 16, B4 lazy boot through the FUSE file (bytes fetched,
# first byte), B5 fill to READY (time, and read latency during the fill), B6 commit
# time of a 1 GiB vs an 8 GiB template, B7 the daemon's peak RSS, B8 FUSE sequential
# read, B9 a launch wave of N daemons reading one new template at once (the store's
# bytes per template byte with peers and without, for N = 2, 4, 8), B10 thousands of
# templates (NBD_OPT_LIST, `lazyblk templates`, the daemon's RSS) and a 50 GiB one;
# B9 again over shaped networks (scripts/bench/net.sh: nodes and store in network
# namespaces, the store 20 ms and 1 Gbit/s away, then 60 ms and 200 Mbit/s), B11
# kernel block devices in a qemu guest (only with BENCH_B11=1: attach latency, fio
# through /dev/nbdX as a ratio to the guest's own disk), and B12 cold boots of a
# real Debian in a qemu guest from /dev/nbd0 (scripts/bench/boot.sh).
# A figure whose feature is missing is reported as "not measured: <reason>".
# Exits 0 when targets are missed (the table says so), non-zero when the bench breaks.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=${BENCH_DIR:-$repo/bench/work}
results=${BENCH_RESULTS:-$repo/bench/results.md}
reps=${BENCH_REPS:-3}
# Seconds of each fio run in B3 (three servers, BENCH_REPS rounds).
fio_runtime=${BENCH_FIO_RUNTIME:-5}
# The system python: it has libnbd's binding (python3-libnbd); a pyenv python on PATH
# does not.
py=/usr/bin/python3
helpers=$repo/scripts/bench
MIB=1048576
# The 1 GiB template's file system holds about this much data (DESIGN: "~600 MiB used").
tree_mib=600
# B6 writes this much into each sandbox before committing it, at this offset.
commit_write=$((64 * MIB))
commit_offset=$((256 * MIB))
# B5 reads this many cached MiB at random while the fill runs.
fill_probe_mib=64
# B4 reads every Nth file of the sorted file list (5 %).
sample_every=20
# B4's first byte should arrive within this many milliseconds.
first_byte_target_ms=50

started=$(date +%s)
load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
export LAZYBLK_LOG=${LAZYBLK_LOG:-warn}

# --- processes and cleanup ---------------------------------------------------------

store_pid= daemon_pid= nginx_pid= nbdkit_pid= qemu_pid= loop_dev=
is_mounted() { grep -qs " $1 " /proc/mounts; }
cleanup() {
  set +e
  is_mounted "$work/mnt" && umount "$work/mnt"
  [ -n "$loop_dev" ] && losetup -d "$loop_dev"
  # Background jobs of this script first (fio, warm), then the servers it started.
  for p in $(jobs -p) $nbdkit_pid $qemu_pid $daemon_pid $nginx_pid $store_pid ${b10_daemon_pid:-} ${b10_store_pid:-}; do
    kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
  done
  is_mounted "$work/fuse" && umount -l "$work/fuse"
  if [ -z "${BENCH_KEEP:-}" ]; then
    rm -rf "$work/tree" "$work/store" "$work/cache" "$work/old-caches" "$work/www" \
      "$work/nbdkit-cache" "$work/b10" "$work/rootfs" "$work"/*.img
  fi
}
trap cleanup EXIT

# Leftovers of a run that was killed: mounts and loop devices under the work dir.
clear_leftovers() {
  if is_mounted "$work/mnt"; then umount "$work/mnt"; fi
  losetup -l -n -O NAME,BACK-FILE | awk -v w="$work/" 'index($2, w) == 1 { print $1 }' |
    xargs -r -n1 losetup -d
  if is_mounted "$work/fuse"; then umount -l "$work/fuse"; fi
}

log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
free_port() { $py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits until URL answers; asks for one byte, as nginx would otherwise send a whole image.
wait_http() {
  for _ in $(seq 200); do curl -sf -r 0-0 -o /dev/null "$1" && return 0; sleep 0.05; done
  die "no answer from $1"
}
wait_socket() {
  for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
  die "no socket at $1"
}
wait_file() {
  for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done
  return 1
}
now_ns() { date +%s%N; }
# Runs a command quietly and prints its wall time in seconds.
timeit() {
  local t0 t1
  t0=$(now_ns)
  "$@" >/dev/null 2>>"$work/logs/commands.err" || die "failed: $* (see $work/logs/commands.err)"
  t1=$(now_ns)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", (b - a) / 1e9 }'
}
# min / max / median of the numbers given as arguments.
best_min() { printf '%s\n' "$@" | sort -g | head -1; }
best_max() { printf '%s\n' "$@" | sort -g | tail -1; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }
# "yes" when `value op target` holds, else "NO".
meets() { awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN {
  ok = (op == "<=") ? (v <= t) : (v >= t); print ok ? "yes" : "NO" }'; }

# --- the table -----------------------------------------------------------------------

rows=()
notes=()
# row FIGURE LAZYBLK PEER RATIO TARGET MET
row() { rows+=("| $1 | $2 | $3 | $4 | $5 | $6 |"); }
not_measured() { row "$1" "not measured: $2" "" "" "$3" "-"; }
note() { notes+=("- $*"); }

# --- the daemon ----------------------------------------------------------------------

peak_rss=()
caches_used=0
# Starts a daemon with a fresh cache; `fuse` as $1 mounts its FUSE view at $work/fuse.
# An earlier cache is moved aside, not deleted, until the end: on an ext4 without a
# journal, creating files right after thousands were deleted makes each inode
# allocation scan the recently deleted ones (recently_deleted() in the kernel), a cost
# a fresh node does not pay and that would otherwise show up in every chunk write.
daemon_start() {
  [ -z "$daemon_pid" ] || die "a daemon is already running"
  if [ -d "$work/cache" ]; then
    caches_used=$((caches_used + 1))
    mkdir -p "$work/old-caches"
    mv "$work/cache" "$work/old-caches/$caches_used"
  fi
  node_port=$(free_port)
  node="http://127.0.0.1:$node_port"
  nbd_sock=$work/nbd.sock
  rm -f "$nbd_sock"
  local fuse_args=()
  if [ "${1:-}" = fuse ]; then
    fuse_args=(--fuse "$work/fuse")
  fi
  "$bin" daemon --cache "$work/cache" --store "$store" --listen "127.0.0.1:$node_port" \
    --nbd "unix:$nbd_sock" "${fuse_args[@]}" >>"$work/logs/daemon.log" 2>&1 &
  daemon_pid=$!
  wait_http "$node/healthz"
  wait_socket "$nbd_sock"
  if [ "${1:-}" = fuse ]; then
    wait_file "$work/fuse/templates/t1" || die "the FUSE view has no templates/t1"
  fi
}
# Stops the daemon, recording its peak RSS (VmHWM) under label $1.
daemon_stop() {
  local hwm
  hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$daemon_pid/status")
  peak_rss+=("$1:$hwm")
  kill "$daemon_pid"
  wait "$daemon_pid" || true
  daemon_pid=
  if is_mounted "$work/fuse"; then umount -l "$work/fuse"; fi
}
lazy_uri() { echo "nbd+unix:///$1?socket=$nbd_sock"; }
# metric URL NAME: one sample of a Prometheus page (0 when absent).
metric() { curl -sf "$1/metrics" | awk -v n="$2" '$1 == n { v = $2 } END { printf "%.0f", v }'; }
served() { metric "$store" lazyblk_store_bytes_served_total; }
warm_wait() { "$bin" warm "$1" --wait --node "$node"; }

# --- peers ---------------------------------------------------------------------------

nbdkit_file_start() {
  rm -f "$work/nbdkit.sock"
  nbdkit -r -f --unix "$work/nbdkit.sock" file "$work/t1.img" 2>>"$work/logs/nbdkit.log" &
  nbdkit_pid=$!
  wait_socket "$work/nbdkit.sock"
}
nbdkit_curl_start() {
  rm -rf "$work/nbdkit-cache" "$work/nbdkit.sock"
  mkdir -p "$work/nbdkit-cache"
  TMPDIR=$work/nbdkit-cache nbdkit -f --unix "$work/nbdkit.sock" curl "url=$nginx/template.img" \
    --filter=cache cache-on-read=true 2>>"$work/logs/nbdkit.log" &
  nbdkit_pid=$!
  wait_socket "$work/nbdkit.sock"
}
nbdkit_stop() { kill "$nbdkit_pid"; wait "$nbdkit_pid" || true; nbdkit_pid=; }
nbdkit_uri="nbd+unix:///?socket=$work/nbdkit.sock"
qemu_start() {
  rm -f "$work/qemu.sock"
  # --shared: nbdcopy opens several connections when the server allows multi-conn.
  qemu-nbd -r -f raw --persistent --shared=8 -k "$work/qemu.sock" "$work/t1.img" \
    2>>"$work/logs/qemu-nbd.log" &
  qemu_pid=$!
  wait_socket "$work/qemu.sock"
}
qemu_stop() { kill "$qemu_pid"; wait "$qemu_pid" || true; qemu_pid=; }
qemu_uri="nbd+unix:///?socket=$work/qemu.sock"

nginx_start() {
  local port conf=$work/nginx/nginx.conf
  port=$(free_port)
  mkdir -p "$work/nginx" "$work/www"
  ln -f "$work/t1.img" "$work/www/template.img"
  cat >"$conf" <<EOF
user root;
worker_processes 2;
daemon off;
pid nginx/nginx.pid;
error_log nginx/error.log warn;
events { worker_connections 256; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path nginx/body;
  proxy_temp_path nginx/proxy;
  fastcgi_temp_path nginx/fastcgi;
  uwsgi_temp_path nginx/uwsgi;
  scgi_temp_path nginx/scgi;
  types { application/octet-stream img; }
  server { listen 127.0.0.1:$port; root www; }
}
EOF
  nginx -c "$conf" -p "$work/" &
  nginx_pid=$!
  nginx=http://127.0.0.1:$port
  wait_http "$nginx/template.img"
}

# --- fio -----------------------------------------------------------------------------

# fio_randread SECONDS URI OUT [extra fio args]: 4 KiB random reads at queue depth 16.
fio_randread() {
  local runtime=$1 uri=$2 out=$3
  shift 3
  fio --name=randread --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth=16 \
    --runtime="$runtime" --time_based --readonly --output-format=json "$@" \
    --output="$out.raw" >/dev/null 2>>"$work/logs/fio.err" || true
  # fio prints "terminating on signal" above the JSON when interrupted.
  sed -n '/^{/,$p' "$out.raw" >"$out"
  jq -e '.jobs[0].read.iops' "$out" >/dev/null || die "fio gave no result in $out.raw"
}
fio_iops() { jq -r '.jobs[0].read.iops | floor' "$1"; }
fio_p99_us() { jq -r '.jobs[0].read.clat_ns.percentile["99.000000"] / 1000' "$1"; }

# --- set-up ----------------------------------------------------------------------------

[ "$(id -u)" -eq 0 ] || die "needs root (loop devices, FUSE, mount)"
scripts/setup.sh >&2
log "cargo build --release"
cargo build --release --quiet
bin=${BENCH_BIN:-$repo/target/release/lazyblk}
mkdir -p "$work/logs"
clear_leftovers
rm -f "$work"/logs/*

have_fuse=
"$bin" daemon --help | grep -q -- --fuse && have_fuse=1
have_commit=
"$bin" commit --help >/dev/null 2>&1 && "$bin" overlay --help >/dev/null 2>&1 && have_commit=1

machine() {
  echo "- machine: $(nproc) cores, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)," \
    "$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM"
  echo "- kernel: $(uname -r)"
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- lazyblk: $("$bin" --version); peers: nbdkit $(nbdkit --version | awk '{ print $2 }')," \
    "$(qemu-nbd --version | head -1), $(fio --version), $(nbdcopy --version | head -1)," \
    "$(nginx -v 2>&1 | sed 's/.*: //')"
}

log "images: a ${tree_mib} MiB tree, a 1 GiB ext4 template"
rm -rf "$work/tree"
$py "$helpers/mktree.py" "$work/tree" "$tree_mib" >&2
mkfs.ext4 -q -F -b 4096 -d "$work/tree" "$work/t1.img" 1G 2>>"$work/logs/commands.err"
image_size=$(stat -c %s "$work/t1.img")
file_count=$(find "$work/tree" -type f | wc -l)
tree_bytes=$(du -sb --apparent-size "$work/tree" | cut -f1)
note "template t1: 1 GiB ext4 (4 KiB blocks), $file_count files, $((tree_bytes / MIB)) MiB of" \
  "data (small text files, random binaries, compressible data), the rest free space"

log "store, publish t1, nginx"
store_port=$(free_port)
store=http://127.0.0.1:$store_port
rm -rf "$work/store"
"$bin" store --root "$work/store" --listen "127.0.0.1:$store_port" >>"$work/logs/store.log" 2>&1 &
store_pid=$!
wait_http "$store/healthz"
"$bin" publish "$work/t1.img" --template t1 --store "$store" >/dev/null 2>>"$work/logs/commands.err"
# The bytes of t1's non-zero chunks (a fill fetches each distinct one once).
stored_bytes=$(curl -sf "$store/v1/templates/t1/manifest" | jq '
  .size as $size | .chunk_size as $cs |
  [.chunks | to_entries[] | select(.value != null)
   | ([$cs, $size - .key * $cs] | min)] | add')
distinct_chunks=$(curl -sf "$store/v1/templates/t1/manifest" | jq '[.chunks[] | select(. != null)] | unique | length')
# The store's bytes of t1's distinct chunks as stored (zstd frames where they shrank),
# for the durable floor: the frames in one file, the raw chunks in another.
mkdir -p "$work/www"
: >"$work/www/frames.zst"
: >"$work/www/raw.bin"
raw_distinct=0 frames=0
for d in $(curl -sf "$store/v1/templates/t1/manifest" | jq -r '[.chunks[] | select(. != null)] | unique | .[]'); do
  f=$work/store/chunks/${d:0:2}/$d
  # A zstd frame (format 2) or a chunk in blocks (format 3: a skippable frame, then a
  # frame per block), both streams `zstd -d` decodes.
  magic=$(head -c 4 "$f" | od -An -tx1 | tr -d ' ')
  if [ "$magic" = "28b52ffd" ] || [ "$magic" = "5b2a4d18" ]; then
    cat "$f" >>"$work/www/frames.zst"
    frames=$((frames + 1))
  else
    cat "$f" >>"$work/www/raw.bin"
  fi
  raw_distinct=$((raw_distinct + 1))
done
store_stored_bytes=$(($(stat -c %s "$work/www/frames.zst") + $(stat -c %s "$work/www/raw.bin")))
note "t1 in the store: $((stored_bytes / MIB)) MiB in non-zero chunks of 1 MiB, $distinct_chunks of them" \
  "distinct (zero chunks are not stored; a repeated chunk is stored and fetched once);" \
  "stored as $((store_stored_bytes / MIB)) MiB: $frames chunks as zstd frames, $((raw_distinct - frames)) raw"
# B4's realistic root file system, as the demo builds it: Debian's documentation and
# Python's library from this machine's /usr.
rm -rf "$work/rootfs"
mkdir -p "$work/rootfs/usr/share" "$work/rootfs/usr/lib"
cp -a /usr/share/doc "$work/rootfs/usr/share/" 2>/dev/null || true
cp -a /usr/lib/python3 "$work/rootfs/usr/lib/" 2>/dev/null || true
mkfs.ext4 -q -F -b 4096 -d "$work/rootfs" "$work/root.img" 256M 2>>"$work/logs/commands.err"
rm -rf "$work/rootfs"
"$bin" publish "$work/root.img" --template root --store "$store" >/dev/null 2>>"$work/logs/commands.err"
root_raw=0 root_stored=0
for d in $(curl -sf "$store/v1/templates/root/manifest" | jq -r '[.chunks[] | select(. != null)] | unique | .[]'); do
  root_stored=$((root_stored + $(stat -c %s "$work/store/chunks/${d:0:2}/$d")))
  root_raw=$((root_raw + MIB))
done
note "template root (B4): 256 MiB ext4 of /usr/share/doc and /usr/lib/python3," \
  "$((root_raw / MIB)) MiB in distinct non-zero 1 MiB chunks, stored as $((root_stored / MIB)) MiB" \
  "($(calc %.2f "$root_raw / $root_stored")x smaller with zstd)"
nginx_start
# The durable floor of a cold read or a fill: download the same stored bytes, decompress
# them, sha256 them and write them to a file on the same file system, then sync.
durable_floor() {
  { curl -sf "$nginx/frames.zst" | zstd -qdc; curl -sf "$nginx/raw.bin"; } |
    tee "$work/floor.img" | sha256sum >/dev/null && sync "$work/floor.img"
  rm -f "$work/floor.img"
}

# --- B4: lazy boot; first byte ---------------------------------------------------------

log "B4 first byte: fresh daemons, connect + first 4 KiB read over NBD"
first=()
for _ in $(seq "$reps"); do
  daemon_start
  first+=("$($py "$helpers/nbdio.py" firstbyte "$(lazy_uri t1)")")
  daemon_stop "B4 first byte"
done
first_ms=$(median "${first[@]}")
note "B4 first byte (ms, each on a fresh daemon right after /healthz answered): ${first[*]}"

if [ -z "$have_fuse" ]; then
  not_measured "B4 lazy boot: bytes fetched / bytes of files read" "lazyblk daemon has no --fuse" "<= 2x"
else
  # lazy_boot TEMPLATE IMAGE TARGET: a fresh daemon, a loop mount of TEMPLATE's FUSE
  # file, every ${sample_every}th file read; one row (held to TARGET, or "-").
  lazy_boot() {
    local id=$1 img=$2 target=$3 before after t0 t_mount t1 misses chunks kernel_read link
    log "B4 lazy boot of $id: fresh daemon, loop mount of the FUSE file, read 5% of the files"
    daemon_start fuse
    wait_file "$work/fuse/templates/$id" || die "the FUSE view has no templates/$id"
    before=$(served)
    t0=$(now_ns)
    loop_dev=$(losetup -r -f --show "$work/fuse/templates/$id")
    mkdir -p "$work/mnt"
    mount -o ro "$loop_dev" "$work/mnt"
    t_mount=$(now_ns)
    (cd "$work/mnt" && find . -type f | sort | awk -v n="$sample_every" 'NR % n == 0') >"$work/sample.txt"
    (cd "$work/mnt" && tr '\n' '\0' <"$work/sample.txt" | xargs -0 cat | wc -c) >"$work/sample.bytes"
    t1=$(now_ns)
    after=$(served)
    misses=$(metric "$node" lazyblk_cache_misses_total)
    chunks=$(curl -sf "$node/metrics" | awk '/^lazyblk_fetched_chunks_total/ { n += $2 } END { printf "%.0f", n }')
    kernel_read=$(metric "$node" 'lazyblk_nbd_bytes_total{command="fuse_read"}')
    # Whether the node took its loopback store for a slow link (whole chunks for small
    # reads, cache/src/link.rs), with the means that decided it.
    link=$(curl -sf "$node/metrics" | awk '/^lazyblk_store_prefers_whole_chunks/ { w = $2 }
      /^lazyblk_store_request_seconds.*kind="small"/ { s = $2 } /^lazyblk_store_request_seconds.*kind="whole"/ { h = $2 }
      END { printf "prefers whole chunks: %s (small %.2f ms, whole %.2f ms)", w + 0, s * 1000, h * 1000 }')
    umount "$work/mnt"
    losetup -d "$loop_dev"
    loop_dev=
    daemon_stop "B4 lazy boot $id"
    local read_bytes fetched sampled floor_chunks ratio met
    read_bytes=$(cat "$work/sample.bytes")
    fetched=$((after - before))
    sampled=$(wc -l <"$work/sample.txt")
    # The floor with 1 MiB chunks: the distinct chunks that hold the sampled files' blocks.
    sed 's|^\./|blocks /|' "$work/sample.txt" >"$work/sample.debugfs"
    floor_chunks=$(debugfs -f "$work/sample.debugfs" "$img" 2>/dev/null | grep -v '^debugfs' |
      tr ' ' '\n' | grep -E '^[0-9]+$' | awk '{ print int($1 / 256) }' | sort -un | wc -l)
    ratio=$(calc %.2f "$fetched / $read_bytes")
    met=-
    [ "$target" = - ] || met=$(meets "$ratio" "<=" "$target")
    row "B4 lazy boot of $id: bytes fetched from the store / bytes of the 5% of files read" \
      "$(calc %.1f "$fetched / $MIB") MiB" \
      "files read: $(calc %.1f "$read_bytes / $MIB") MiB ($sampled files); the kernel read $(calc %.1f "$kernel_read / $MIB") MiB of the FUSE file; the 1 MiB chunks holding the files: $floor_chunks MiB" \
      "${ratio}x" "$([ "$target" = - ] && echo - || echo "<= ${target}x")" "$met"
    note "B4 lazy boot of $id: losetup + mount took $(calc %.0f "($t_mount - $t0) / 1e6") ms, find + reading" \
      "$sampled files $(calc %.0f "($t1 - $t_mount) / 1e6") ms; the daemon fetched $chunks chunks," \
      "$misses reads missed (the rest came in by readahead); $link"
  }
  lazy_boot root "$work/root.img" 2
  lazy_boot t1 "$work/t1.img" -
fi
row "B4 first byte: connect + first 4 KiB read on a fresh daemon (median of $reps)" \
  "$(calc %.1f "$first_ms") ms" "" "-" "<= ${first_byte_target_ms} ms" \
  "$(meets "$first_ms" "<=" "$first_byte_target_ms")"

# --- B2: cold sequential read --------------------------------------------------------

log "B2 cold sequential read: nbdkit curl + cache filter over nginx, curl, lazyblk"
cold_nbdkit=() cold_curl=() cold_lazy=() floors=()
for _ in $(seq "$reps"); do
  floors+=("$(timeit durable_floor)")
  nbdkit_curl_start
  cold_nbdkit+=("$(timeit nbdcopy --no-extents "$nbdkit_uri" null:)")
  nbdkit_stop
  cold_curl+=("$(timeit curl -sf -o /dev/null "$nginx/template.img")")
  daemon_start
  cold_lazy+=("$(timeit nbdcopy --no-extents "$(lazy_uri t1)" null:)")
  daemon_stop "B2 cold read"
done
rm -rf "$work/nbdkit-cache"
l=$(best_min "${cold_lazy[@]}") k=$(best_min "${cold_nbdkit[@]}") c=$(best_min "${cold_curl[@]}")
ratio=$(calc %.2f "$l / $k")
row "B2 cold sequential read, fresh cache (nbdcopy, best of $reps)" "$l s" \
  "nbdkit curl + cache filter over nginx: $k s" "${ratio}x" "<= 0.5x" "$(meets "$ratio" "<=" 0.5)"
ratio=$(calc %.2f "$l / $c")
row "B2 cold sequential read vs a plain download" "$l s" "curl of the image from nginx: $c s" \
  "${ratio}x" "-" "-"
f=$(best_min "${floors[@]}")
ratio=$(calc %.2f "$l / $f")
row "B2 cold sequential read vs the durable floor" "$l s" \
  "the stored $((store_stored_bytes / MIB)) MiB: curl, zstd -d, sha256sum, tee to a file, sync: $f s" \
  "${ratio}x" "<= 1.2x" "$(meets "$ratio" "<=" 1.2)"
note "B2 times (s): lazyblk ${cold_lazy[*]}; nbdkit curl ${cold_nbdkit[*]}; curl ${cold_curl[*]}; durable floor ${floors[*]}." \
  "lazyblk fetches the distinct non-zero chunks only and answers zero chunks without a fetch;" \
  "nbdkit and curl move the whole 1 GiB image"

# --- B5: fill to READY -----------------------------------------------------------------

log "B5 read latency during a fill: cached ${fill_probe_mib} MiB read at random, idle and while filling"
daemon_start
fio --name=prime --ioengine=nbd --uri="$(lazy_uri t1)" --rw=read --bs=1m --size="${fill_probe_mib}m" \
  --readonly >/dev/null 2>>"$work/logs/fio.err"
fio_randread 5 "$(lazy_uri t1)" "$work/b5-idle.json" --size="${fill_probe_mib}m"
warm_wait t1 >/dev/null 2>>"$work/logs/commands.err" &
warm_pid=$!
fio_randread 600 "$(lazy_uri t1)" "$work/b5-fill.json" --size="${fill_probe_mib}m" &
fio_pid=$!
wait "$warm_pid" || die "warm t1 failed during B5"
# SIGINT makes fio stop and print its results so far: the window is the fill.
pkill -INT -P "$fio_pid" -x fio || true
wait "$fio_pid" || die "fio during the fill failed"
daemon_stop "B5 fill under reads"
idle_p99=$(fio_p99_us "$work/b5-idle.json") fill_p99=$(fio_p99_us "$work/b5-fill.json")

log "B5 fill to READY: fresh daemons, warm --wait, vs curl of the same bytes"
fills=() curls=() durable_curls=() fill_bytes=
for i in $(seq "$reps"); do
  if [ "$i" -eq "$reps" ] && [ -n "$have_fuse" ]; then daemon_start fuse; else daemon_start; fi
  before=$(served)
  fills+=("$(timeit warm_wait t1)")
  # The same bytes: what the fill fetched (chunks repeated in the image come once).
  fill_bytes=${fill_bytes:-$(($(served) - before))}
  curls+=("$(timeit curl -sf -o /dev/null -r "0-$((fill_bytes - 1))" "$nginx/template.img")")
  # A fill must land on the node's disk; the floor for that is a plain download to a
  # file on the same file system, made durable once.
  durable_curls+=("$(timeit sh -c "curl -sf -o '$work/durable.img' -r '0-$((fill_bytes - 1))' '$nginx/template.img' && sync '$work/durable.img'")")
  rm -f "$work/durable.img"
  [ "$i" -eq "$reps" ] || daemon_stop "B5 fill"
done
# The last daemon stays up, READY, for B1, B3, B8 and B6.
l=$(best_min "${fills[@]}") c=$(best_min "${curls[@]}")
ratio=$(calc %.2f "$l / $c")
row "B5 fill to READY (warm --wait, fresh cache, best of $reps)" "$l s" \
  "curl of the same $((fill_bytes / MIB)) MiB from nginx: $c s" "${ratio}x" "<= 1.3x" \
  "$(meets "$ratio" "<=" 1.3)"
d=$(best_min "${durable_curls[@]}")
ratio=$(calc %.2f "$l / $d")
row "B5 fill to READY vs a durable download" "$l s" \
  "curl of the same bytes to a file on the same file system, then sync: $d s" "${ratio}x" "-" "-"
ratio=$(calc %.2f "$l / $f")
row "B5 fill to READY vs the durable floor" "$l s" \
  "B2's floor (the stored bytes downloaded, decompressed, hashed, written, synced): $f s" \
  "${ratio}x" "<= 1.0x" "$(meets "$ratio" "<=" 1.0)"
ratio=$(calc %.2f "$fill_p99 / $idle_p99")
row "B5 p99 of cached 4 KiB random reads (qd 16) during the fill vs idle" "$(calc %.0f "$fill_p99") us" \
  "idle: $(calc %.0f "$idle_p99") us" "${ratio}x" "<= 1.5x" "$(meets "$ratio" "<=" 1.5)"
note "B5 fill times (s): ${fills[*]}; curl times (s): ${curls[*]}; curl to a file + sync (s): ${durable_curls[*]}; IOPS idle $(fio_iops "$work/b5-idle.json")," \
  "during the fill $(fio_iops "$work/b5-fill.json")"

# --- B1: cached sequential read --------------------------------------------------------

log "B1 cached sequential read: lazyblk (READY), nbdkit file, qemu-nbd, cat"
nbdkit_file_start
qemu_start
cat "$work/t1.img" >/dev/null
seq_lazy=() seq_nbdkit=() seq_qemu=() seq_cat=()
# Interleaved, so that noise spreads over every server alike.
for _ in $(seq $((reps + 4))); do
  seq_cat+=("$(timeit cat "$work/t1.img")")
  seq_lazy+=("$(timeit nbdcopy --no-extents "$(lazy_uri t1)" null:)")
  seq_nbdkit+=("$(timeit nbdcopy --no-extents "$nbdkit_uri" null:)")
  seq_qemu+=("$(timeit nbdcopy --no-extents "$qemu_uri" null:)")
done
b1=$(best_min "${seq_lazy[@]}") k=$(best_min "${seq_nbdkit[@]}") q=$(best_min "${seq_qemu[@]}")
c=$(best_min "${seq_cat[@]}")
gibs() { calc %.2f "$image_size / $1 / 1073741824"; }
ratio=$(calc %.2f "$b1 / $k")
row "B1 cached sequential read over NBD, unix socket (nbdcopy, best of $((reps + 4)))" \
  "$b1 s ($(gibs "$b1") GiB/s)" "nbdkit file: $k s ($(gibs "$k") GiB/s)" "${ratio}x" "<= 0.8x" \
  "$(meets "$ratio" "<=" 0.8)"
ratio=$(calc %.2f "$b1 / $q")
row "B1 cached sequential read vs qemu-nbd" "$b1 s" "qemu-nbd: $q s ($(gibs "$q") GiB/s)" \
  "${ratio}x" "<= 1.0x" "$(meets "$ratio" "<=" 1.0)"
row "B1 cached sequential read vs the floor" "$b1 s" "cat of the image from the page cache: $c s" \
  "$(calc %.2f "$b1 / $c")x" "-" "-"
note "B1 times (s): lazyblk ${seq_lazy[*]}; nbdkit ${seq_nbdkit[*]}; qemu-nbd ${seq_qemu[*]}; cat ${seq_cat[*]}"

# --- B3: cached random reads -----------------------------------------------------------

log "B3 cached 4 KiB random reads, qd 16: lazyblk, nbdkit file, qemu-nbd; $reps rounds of ${fio_runtime}s each"
# Interleaved rounds, best of each: a burst of other work on the machine then hurts
# one round of every server, not all of one server's.
iops_lazy=() iops_nbdkit=() iops_qemu=() p99_lazy=() p99_nbdkit=() p99_qemu=()
for i in $(seq "$reps"); do
  fio_randread "$fio_runtime" "$(lazy_uri t1)" "$work/b3-lazyblk-$i.json"
  fio_randread "$fio_runtime" "$nbdkit_uri" "$work/b3-nbdkit-$i.json"
  fio_randread "$fio_runtime" "$qemu_uri" "$work/b3-qemu-$i.json"
  iops_lazy+=("$(fio_iops "$work/b3-lazyblk-$i.json")") p99_lazy+=("$(fio_p99_us "$work/b3-lazyblk-$i.json")")
  iops_nbdkit+=("$(fio_iops "$work/b3-nbdkit-$i.json")") p99_nbdkit+=("$(fio_p99_us "$work/b3-nbdkit-$i.json")")
  iops_qemu+=("$(fio_iops "$work/b3-qemu-$i.json")") p99_qemu+=("$(fio_p99_us "$work/b3-qemu-$i.json")")
done
nbdkit_stop
qemu_stop
li=$(best_max "${iops_lazy[@]}") ki=$(best_max "${iops_nbdkit[@]}") qi=$(best_max "${iops_qemu[@]}")
lp=$(best_min "${p99_lazy[@]}") kp=$(best_min "${p99_nbdkit[@]}") qp=$(best_min "${p99_qemu[@]}")
ratio=$(calc %.2f "$li / $ki")
row "B3 cached 4 KiB random reads, qd 16 (fio nbd engine, best of $reps x ${fio_runtime}s): IOPS" "$li" \
  "nbdkit file: $ki (qemu-nbd: $qi)" "${ratio}x" ">= 1.2x" "$(meets "$ratio" ">=" 1.2)"
ratio=$(calc %.2f "$lp / $kp")
row "B3 p99 completion latency (best of $reps)" "$(calc %.0f "$lp") us" \
  "nbdkit file: $(calc %.0f "$kp") us (qemu-nbd: $(calc %.0f "$qp") us)" "${ratio}x" "<= 1.0x" \
  "$(meets "$ratio" "<=" 1.0)"
note "B3 IOPS: lazyblk ${iops_lazy[*]}; nbdkit ${iops_nbdkit[*]}; qemu-nbd ${iops_qemu[*]}." \
  "p99 (us): lazyblk ${p99_lazy[*]}; nbdkit ${p99_nbdkit[*]}; qemu-nbd ${p99_qemu[*]}"

# --- B7: memory ------------------------------------------------------------------------

daemon_rss=$(awk '/^VmHWM/ { print $2 }' "/proc/$daemon_pid/status")
peak_rss+=("B5 fill + B1 + B3:$daemon_rss")
peak_kib=$(printf '%s\n' "${peak_rss[@]}" | cut -d: -f2 | sort -n | tail -1)
peak_mib=$(calc %.1f "$peak_kib / 1024")
row "B7 peak RSS of the daemon over B1-B5 (VmHWM, the largest of every daemon started)" \
  "$peak_mib MiB" "" "-" "<= 128 MiB" "$(meets "$peak_mib" "<=" 128)"
note "B7 VmHWM (KiB) by daemon: $(printf '%s, ' "${peak_rss[@]}" | sed 's/, $//')"

# --- B8: FUSE sequential read ----------------------------------------------------------

if [ -z "$have_fuse" ]; then
  not_measured "B8 FUSE cached sequential read" "lazyblk daemon has no --fuse" ">= 0.5x B1"
else
  log "B8 FUSE cached sequential read: dd of the FUSE file, its page cache dropped"
  fuse_file=$work/fuse/templates/t1
  dds=()
  for _ in $(seq "$reps"); do
    # Drops the FUSE file's pages only (posix_fadvise DONTNEED), not the chunk files'.
    dd if="$fuse_file" iflag=nocache count=0 status=none
    dds+=("$(timeit dd if="$fuse_file" of=/dev/null bs=1M)")
  done
  d=$(best_min "${dds[@]}")
  ratio=$(calc %.2f "$b1 / $d")
  row "B8 FUSE cached sequential read (dd bs=1M, page cache dropped, best of $reps)" \
    "$d s ($(gibs "$d") GiB/s)" "B1 lazyblk over NBD: $b1 s ($(gibs "$b1") GiB/s)" \
    "${ratio}x of B1's throughput" ">= 0.5x" "$(meets "$ratio" ">=" 0.5)"
  note "B8 times (s): ${dds[*]}"
fi

# --- B6: commit time vs template size --------------------------------------------------

# A trial commit of an empty overlay tells whether overlays and commit work.
commit_missing=
if [ -z "$have_commit" ]; then
  commit_missing="lazyblk has no overlay or commit command"
else
  "$bin" overlay create t1 --sandbox bench-trial --node "$node" >/dev/null 2>"$work/logs/trial.err" ||
    commit_missing="overlay create failed: $(tr '\n' ' ' <"$work/logs/trial.err" | cut -c1-120)"
  if [ -z "$commit_missing" ]; then
    "$bin" commit bench-trial --template bench-trial-c --node "$node" >/dev/null 2>"$work/logs/trial.err" ||
      commit_missing="commit failed: $(tr '\n' ' ' <"$work/logs/trial.err" | cut -c1-120)"
  fi
fi
if [ -n "$commit_missing" ]; then
  not_measured "B6 commit with 64 MiB written: 8 GiB vs 1 GiB template" "$commit_missing" "<= 1.2"
else
  log "B6 commit: an 8 GiB sparse template with the same files; 64 MiB written into each"
  mkfs.ext4 -q -F -b 4096 -d "$work/tree" "$work/t8.img" 8G 2>>"$work/logs/commands.err"
  publish8=$(timeit "$bin" publish "$work/t8.img" --template t8 --store "$store")
  rm -f "$work/t8.img"
  # Both parents READY: a commit reads the parent's bytes of every dirty chunk, and
  # fetching them would measure the store, not the template's size.
  warm_wait t8 >/dev/null 2>>"$work/logs/commands.err"
  commits1=() commits8=()
  for i in $(seq "$reps"); do
    for t in t1 t8; do
      "$bin" overlay create "$t" --sandbox "sb-$t-$i" --node "$node" >/dev/null
      $py "$helpers/nbdio.py" write "$(lazy_uri "sb-$t-$i")" "$commit_offset" "$commit_write"
      s=$(timeit "$bin" commit "sb-$t-$i" --template "c-$t-$i" --node "$node")
      if [ "$t" = t1 ]; then commits1+=("$s"); else commits8+=("$s"); fi
    done
  done
  c1=$(best_min "${commits1[@]}") c8=$(best_min "${commits8[@]}")
  ratio=$(calc %.2f "$c8 / $c1")
  row "B6 commit with 64 MiB written (best of $reps): 8 GiB template vs 1 GiB" "8 GiB: $c8 s" \
    "1 GiB: $c1 s" "${ratio}x" "<= 1.2x" "$(meets "$ratio" "<=" 1.2)"
  note "B6 commit times (s): 1 GiB ${commits1[*]}; 8 GiB ${commits8[*]} (both parents READY; 64 MiB" \
    "of random data written at offset 256 MiB); publishing the sparse 8 GiB image took $publish8 s"
fi

daemon_stop "B8 + B6"

# --- B9: a launch wave ---------------------------------------------------------------

# N daemons on this machine, each with --advertise (peers by chunk ownership) or without
# (each node pulls every chunk from the store), read one new template at once with
# nbdcopy. The store's bytes sent / the template's stored bytes (as publish stored them,
# compressed where they shrink) is what a fleet pays; the bytes each node received over
# its peer links / the same stored bytes is what its peer links carry (peers send the
# stored form, so about (N-1)/N of it, not the decoded bytes).
wave_mib=${BENCH_WAVE_MIB:-128}
wave_pids=()
wave_start() { # N PEERS(yes|no) TAG
  local n=$1 peers=$2 tag=$3 i port
  wave_nodes=() wave_urls=()
  for i in $(seq "$n"); do
    port=$(free_port)
    local adv=()
    [ "$peers" = yes ] && adv=(--advertise "http://127.0.0.1:$port")
    rm -rf "$work/wave/$tag-$i"
    "$bin" daemon --cache "$work/wave/$tag-$i" --store "$store" --listen "127.0.0.1:$port" \
      --nbd "unix:$work/wave/$tag-$i.sock" "${adv[@]}" >>"$work/logs/wave.log" 2>&1 &
    wave_pids+=($!)
    wave_nodes+=("$work/wave/$tag-$i.sock")
    wave_urls+=("http://127.0.0.1:$port")
    wait_http "http://127.0.0.1:$port/healthz"
  done
  if [ "$peers" = yes ]; then
    for _ in $(seq 100); do
      [ "$("$bin" nodes --store "$store" --json | jq length)" -ge "$n" ] && break
      sleep 0.1
    done
    sleep 2.5 # one more heartbeat: every node has the whole list
  fi
}
wave_stop() {
  for p in "${wave_pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  wave_pids=()
  # A stopped daemon leaves the membership; wait until no lease is left, so the next
  # wave's nodes do not count dead owners.
  for _ in $(seq 100); do
    [ "$("$bin" nodes --store "$store" --json | jq length)" -eq 0 ] && break
    sleep 0.1
  done
}
wave_read() { # TEMPLATE: every node of the wave reads it at once; prints the wall time
  local t0 t1 pids=() s
  t0=$(now_ns)
  for s in "${wave_nodes[@]}"; do
    nbdcopy "nbd+unix:///$1?socket=$s" null: 2>>"$work/logs/commands.err" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || die "a wave read failed (see $work/logs/commands.err)"; done
  t1=$(now_ns)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", (b - a) / 1e9 }'
}
# The most bytes one node of the wave received from its peers.
wave_peer_bytes() {
  local u most=0 got
  for u in "${wave_urls[@]}"; do
    got=$(metric "$u" lazyblk_peer_bytes_received)
    [ "${got:-0}" -gt "$most" ] && most=$got
  done
  echo "$most"
}
log "B9 launch waves: N daemons reading one new ${wave_mib} MiB template at once, peers on and off"
mkdir -p "$work/wave/src"
# Half random (does not compress), half a root file system's libraries (about 2.6x).
head -c "$((wave_mib * MIB * 3 / 8))" /dev/urandom >"$work/wave/src/data"
{ tar cf - /usr/lib 2>/dev/null || true; } | head -c "$((wave_mib * MIB * 3 / 8))" >"$work/wave/src/libs.tar"
mkfs.ext4 -q -F -b 4096 -d "$work/wave/src" "$work/wave.img" "${wave_mib}M" 2>>"$work/logs/commands.err"
wave_round=0 stored=
for peers in yes no; do
  for n in 2 4 8; do
    wave_round=$((wave_round + 1))
    id="wave-$wave_round"
    # The template's bytes as stored (compressed where they shrink): the first publish
    # uploads every chunk and says so; the later ones (the same image) upload none.
    published=$("$bin" publish "$work/wave.img" --template "$id" --store "$store" --json 2>>"$work/logs/commands.err")
    [ -n "$stored" ] || stored=$(jq .stored_bytes <<<"$published")
    wave_start "$n" "$peers" "$id"
    before=$(served)
    t=$(wave_read "$id")
    ratio=$(calc %.2f "($(served) - $before) / $stored")
    peer_ratio=$(calc %.2f "$(wave_peer_bytes) / $stored")
    wave_stop
    eval "wave_${peers}_${n}=\$ratio wave_t_${peers}_${n}=\$t wave_peer_${peers}_${n}=\$peer_ratio"
  done
done
# One node's cold read of a new template, for the wave's wall time.
"$bin" publish "$work/wave.img" --template wave-one --store "$store" >/dev/null 2>>"$work/logs/commands.err"
wave_start 1 no one
one=$(wave_read wave-one)
wave_stop
rm -rf "$work/wave" "$work/wave.img"
for n in 2 4 8; do
  on=$(eval echo "\$wave_yes_$n") off=$(eval echo "\$wave_no_$n")
  ton=$(eval echo "\$wave_t_yes_$n") toff=$(eval echo "\$wave_t_no_$n")
  row "B9 wave of $n nodes: store bytes sent / template bytes, peers on" "${on}x (wall $ton s)" \
    "peers off: ${off}x (wall $toff s); one node alone: $one s" "$(calc %.2f "$ton / $one")x of one node's time" \
    "<= 1.2x store bytes" "$(meets "$on" "<=" 1.2)"
  peer=$(eval echo "\$wave_peer_yes_$n")
  row "B9 wave of $n nodes: bytes one node received over its peer links / template stored bytes" \
    "${peer}x (the most of any node)" "" "" "<= 1.1x of stored" "$(meets "$peer" "<=" 1.1)"
done
note "B9: ${wave_mib} MiB ext4, half random data and half a tar of /usr/lib (compressible), each" \
  "wave on a template no node has read; bytes are over the template's stored bytes (as publish" \
  "stored them: compressed where they shrink); wall times include every node's nbdcopy"

# --- B10: thousands of templates ----------------------------------------------------

# A store of its own with one published base and N templates that share it (manifests
# only, as a fleet of task templates would be), a fresh daemon over it: NBD_OPT_LIST with
# every export's info (nbdinfo --list), `lazyblk templates`, the daemon's peak RSS after
# it has looked at all of them; and a 50 GiB sparse template with 20 GiB of data (its
# chunks repeat the base's), first 4 KiB read on a fresh daemon after connect.
b10_templates=${BENCH_B10_TEMPLATES:-3000}
log "B10 thousands of templates: $b10_templates sharing a base, and a 50 GiB template"
b10=$work/b10
rm -rf "$b10"
mkdir -p "$b10/m"
b10_port=$(free_port)
b10_store=http://127.0.0.1:$b10_port
"$bin" store --root "$b10/store" --listen "127.0.0.1:$b10_port" >>"$work/logs/b10-store.log" 2>&1 &
b10_store_pid=$!
wait_http "$b10_store/healthz"
"$bin" publish "$work/t1.img" --template base --store "$b10_store" >/dev/null 2>>"$work/logs/commands.err"
curl -sf "$b10_store/v1/templates/base/manifest" >"$b10/base.json"
$py - "$b10" "$b10_templates" <<'PY'
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
base = json.load(open(f"{out}/base.json"))
for i in range(n):
    m = dict(base, template=f"task-{i:05d}", parent="base")
    json.dump(m, open(f"{out}/m/task-{i:05d}.json", "w"))
# 50 GiB, 20 GiB of it data: 20480 chunks that cycle through the base's data chunks.
data = [c for c in base["chunks"] if c]
size = 50 << 30
chunks = [None] * (size // base["chunk_size"])
for i in range(20480):
    chunks[i * 2] = data[i % len(data)]
# Its block index lists a page per 8 chunks as a published one does, all null (its chunks
# are read whole): the pages of a real one would add about 10% to the manifest.
big = dict(base, template="big", parent=None, size=size, chunks=chunks)
if "blocks" in base:
    per = base["blocks"]["chunks_per_page"]
    big["blocks"] = dict(base["blocks"], pages=[None] * (-(-len(chunks) // per)))
json.dump(big, open(f"{out}/big.json", "w"))
PY
ls "$b10/m" | xargs -P 8 -I{} sh -c \
  "curl -sf -X PUT --data-binary @$b10/m/{} -o /dev/null $b10_store/v1/templates/\$(basename {} .json)/manifest"
curl -sf -X PUT --data-binary @"$b10/big.json" -o /dev/null "$b10_store/v1/templates/big/manifest"
b10_list_cli=$(timeit "$bin" templates --store "$b10_store")
b10_node_port=$(free_port)
"$bin" daemon --cache "$b10/cache" --store "$b10_store" --listen "127.0.0.1:$b10_node_port" \
  --nbd "unix:$b10/nbd.sock" >>"$work/logs/b10-daemon.log" 2>&1 &
b10_daemon_pid=$!
wait_http "http://127.0.0.1:$b10_node_port/healthz"
wait_socket "$b10/nbd.sock"
b10_first=$($py "$helpers/nbdio.py" firstbyte "nbd+unix:///big?socket=$b10/nbd.sock")
b10_list=$(timeit sh -c "nbdinfo --list 'nbd+unix:///?socket=$b10/nbd.sock' >'$b10/list.txt'")
b10_exports=$(grep -c '^export=' "$b10/list.txt" || true)
b10_rss=$(awk '/^VmHWM/ { print $2 }' "/proc/$b10_daemon_pid/status")
kill "$b10_daemon_pid" "$b10_store_pid" 2>/dev/null
wait "$b10_daemon_pid" "$b10_store_pid" 2>/dev/null || true
row "B10 NBD_OPT_LIST of $b10_templates templates sharing a base (nbdinfo --list, every export's info)" \
  "$b10_list s ($b10_exports exports)" "" "-" "<= 5 s" "$(meets "$b10_list" "<=" 5)"
row "B10 lazyblk templates over $b10_templates templates" "$b10_list_cli s" "" "-" "<= 0.5 s" \
  "$(meets "$b10_list_cli" "<=" 0.5)"
row "B10 daemon peak RSS after looking at all $b10_templates templates (VmHWM)" \
  "$(calc %.1f "$b10_rss / 1024") MiB" "" "-" "<= 128 MiB" "$(meets "$(calc %.1f "$b10_rss / 1024")" "<=" 128)"
row "B10 50 GiB template (20 GiB of data): connect + first 4 KiB read on a fresh daemon" \
  "$(calc %.1f "$b10_first") ms" "" "-" "<= 50 ms" "$(meets "$b10_first" "<=" 50)"
note "B10: the base is t1 published to a store of its own; its $b10_templates children are manifests that share its chunks; the 50 GiB manifest names 20480 data chunks (cycling through the base's) among 51200"
rm -rf "$b10"

# --- B9 over shaped networks --------------------------------------------------------

# The same wave with each node and the store in network namespaces of their own, the
# store's link shaped to the "region" and "far" profiles (scripts/netlab.sh).
# BENCH_NET=0 skips it.
if [ "${BENCH_NET:-1}" != 0 ]; then
  log "B9 over shaped networks (scripts/bench/net.sh)"
  : >"$work/net-rows"
  if BENCH_BIN=$bin BENCH_DIR=$work BENCH_NET_ROWS=$work/net-rows scripts/bench/net.sh >&2; then
    while IFS= read -r line; do rows+=("$line"); done <"$work/net-rows"
    note "B9 region/far: ${BENCH_NET_MIB:-64} MiB ext4 of random data; ${BENCH_NET_NODES:-8} nodes and the store each in a network namespace (scripts/netlab.sh); the store's link shaped with tbf, its requests delayed by scripts/bench/delay_proxy.py"
  else
    not_measured "B9 over shaped networks" "scripts/bench/net.sh failed (see its output above)" "<= 1.5x"
  fi
fi

# --- B12: cold boots -------------------------------------------------------------------

# A real Debian booting in a qemu guest from a lazyblk sandbox on /dev/nbd0, the store
# 20 ms per request away: warm, first, cold, and the image as a virtio disk (the floor).
# Minutes under TCG; BENCH_BOOT=0 skips it.
if [ "${BENCH_BOOT:-1}" != 0 ]; then
  log "B12 cold boots (scripts/bench/boot.sh)"
  : >"$work/boot-rows"
  if BENCH_BIN=$bin BENCH_NET_ROWS=$work/boot-rows scripts/bench/boot.sh region >&2; then
    while IFS= read -r line; do rows+=("$line"); done <"$work/boot-rows"
    note "B12: Debian 12 (systemd; debootstrap, 2 GiB ext4) in a qemu guest under TCG on Debian's 6.12 cloud kernel; the store on the host behind a 20 ms per-request delay through qemu's user network; times from the moment the root device can be opened to multi-user.target, guest clock"
  else
    not_measured "B12 cold boots" "scripts/bench/boot.sh failed (see its output above)" "<= 1.3x"
  fi
fi

# --- B11: kernel block devices (a qemu guest) -----------------------------------------

# This machine's kernel has no nbd driver: scripts/kernel-test.sh boots Debian's 6.12
# cloud kernel under qemu (TCG, minutes) and measures there: attach latency over 100
# attaches, fio through /dev/nbdX with 1 and 2 connections as ratios to the same fio on
# a file of the guest's own disk. Its own selector, BENCH_B11=1, as it takes minutes.
if [ "${BENCH_B11:-0}" = 1 ]; then
  log "B11 kernel block devices in a qemu guest (scripts/kernel-test.sh, KERNEL_TEST_BENCH=1)"
  b11_line=$(KERNEL_TEST_BENCH=1 KERNEL_TEST_FIO_RUNTIME=$fio_runtime LAZYBLK_BIN=$bin \
    KERNEL_TEST_KERNEL=${KERNEL_TEST_KERNEL:-linux-image-6.12-cloud-amd64} \
    "$repo/scripts/kernel-test.sh" 2>>"$work/logs/b11.log" | tr -d '\r' | grep '^B11 ' || true)
  if [ -n "$b11_line" ]; then
    b11_field() { echo "$b11_line" | sed -n "s|.*$1.*|\1|p"; }
    row "B11 attach latency over 100 attaches (guest, TCG): p50 / p95" \
      "$(b11_field 'attach p50 \([0-9.]* ms\) p95') / $(b11_field 'p95 \([0-9.]* ms\)')" "" "-" "-" "-"
    for conn in 1 2; do
      row "B11 /dev/nbdX, ${conn} connection(s): 4 KiB random reads qd 32 (fio, direct)" \
        "$(b11_field "nbd ${conn}conn: randread4k-qd32 \([0-9]* IOPS\)")" \
        "guest disk file: $(b11_field 'disk: randread4k-qd32 \([0-9]* IOPS\)')" \
        "$(b11_field "nbd ${conn}conn: randread4k-qd32 [0-9]* IOPS (\([0-9.]*x\) disk)")" "-" "-"
      row "B11 /dev/nbdX, ${conn} connection(s): 1 MiB sequential reads (fio, direct)" \
        "$(b11_field "nbd ${conn}conn: [^;]*seqread1M \([0-9.]* MiB/s\)")" \
        "guest disk file: $(b11_field 'disk: [^;]*seqread1M \([0-9.]* MiB/s\)')" \
        "$(b11_field "nbd ${conn}conn: [^;]*seqread1M [0-9.]* MiB/s (\([0-9.]*x\) disk)")" "-" "-"
    done
    note "B11: $b11_line (a TCG guest: absolute figures are the emulator's, the ratios to the guest's own virtio disk are what count; not asserted)"
  else
    not_measured "B11 kernel block devices (qemu guest)" "scripts/kernel-test.sh failed (see $work/logs/b11.log)" "-"
  fi
else
  not_measured "B11 kernel block devices (qemu guest)" "set BENCH_B11=1 (boots a qemu guest; minutes)" "-"
fi

# --- report ------------------------------------------------------------------------------

elapsed=$(($(date +%s) - started))
mkdir -p "$(dirname "$results")"
{
  echo "# lazyblk benchmark"
  echo
  echo "Written by \`scripts/bench.sh\` (DESIGN.md section 9). Ratios within one run are what count."
  echo
  machine
  echo "- bench run time: ${elapsed} s; load average (1, 5, 15 min) at the start: $load_at_start," \
    "at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews absolute figures)"
  echo
  echo "| figure | lazyblk | peer(s) | ratio | target | met? |"
  echo "|---|---|---|---|---|---|"
  # By figure; rows of one figure in the order they were measured.
  printf '%s\n' "${rows[@]}" | sort -s -k2,2
  echo
  echo "## Notes"
  echo
  printf '%s\n' "${notes[@]}"
} >"$results.tmp"
mv "$results.tmp" "$results"
cat "$results"

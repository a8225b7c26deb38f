#!/usr/bin/env bash
# The lazyblk demo on the embedded defaults: a local store, one node daemon, a small
# ext4 template built with mkfs.ext4 -d, published, then read lazily over NBD.
# It shows how few bytes a first read fetches, then warms the replica to READY.
#
#   scripts/demo.sh            # everything in a fresh temporary directory
#   DEMO_DIR=/tmp/d scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
bin=$PWD/target/release/lazyblk

dir=${DEMO_DIR:-$(mktemp -d /tmp/lazyblk-demo.XXXXXX)}
mkdir -p "$dir"
store_port=${STORE_PORT:-7070}
node_port=${NODE_PORT:-7071}
store="http://127.0.0.1:$store_port"
node="http://127.0.0.1:$node_port"
sock="$dir/nbd.sock"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_http() { for _ in $(seq 100); do curl -sf "$1" >/dev/null && return; sleep 0.1; done; echo "no answer from $1"; exit 1; }
served() { curl -s "$store/metrics" | awk '/^lazyblk_store_bytes_served_total/ {print $2}'; }

step "start the store (a directory served over HTTP) on $store"
LAZYBLK_LOG=warn "$bin" store --root "$dir/store" --listen "127.0.0.1:$store_port" &
pids+=($!)
wait_http "$store/healthz"

step "build a 256 MiB ext4 template from /usr/share/doc and /usr/lib/python3 (mkfs.ext4 -d)"
rm -rf "$dir/rootfs" && mkdir -p "$dir/rootfs/usr/share" "$dir/rootfs/usr/lib"
cp -r /usr/share/doc "$dir/rootfs/usr/share/" 2>/dev/null || true
cp -r /usr/lib/python3 "$dir/rootfs/usr/lib/" 2>/dev/null || true
echo "hello from a lazily served template" > "$dir/rootfs/hello.txt"
mkfs.ext4 -q -F -b 4096 -d "$dir/rootfs" "$dir/template.img" 256M
du -sh --apparent-size "$dir/rootfs" | sed 's/^/  files: /'

step "publish it: 1 MiB chunks named by sha256, zero chunks skipped"
"$bin" publish "$dir/template.img" --template demo --store "$store"
"$bin" templates --store "$store"

fuse_args=()
if [ "$(id -u)" -eq 0 ] && [ -e /dev/fuse ]; then fuse_args=(--fuse "$dir/fuse"); fi
step "start a node daemon: NBD on unix:$sock, API on $node ${fuse_args[*]:+, FUSE at $dir/fuse}"
LAZYBLK_LOG=warn,fuser=error "$bin" daemon --cache "$dir/cache" --store "$store" --listen "127.0.0.1:$node_port" --nbd "unix:$sock" "${fuse_args[@]}" &
pids+=($!)
wait_http "$node/healthz"

uri="nbd+unix:///demo?socket=$sock"
step "nbdinfo $uri (a first look reads the superblock)"
nbdinfo "$uri" | sed -n '1,6p'
echo "  bytes fetched from the store so far: $(served) of $(stat -c %s "$dir/template.img") in the image"
"$bin" status demo --node "$node"

step "nbdinfo --map: zero chunks are holes, never stored or fetched"
nbdinfo --map "$uri" | head -8

step "nbdcopy the whole export and compare with the image"
nbdcopy "$uri" "$dir/copy.img"
cmp "$dir/copy.img" "$dir/template.img" && echo "  identical"
echo "  bytes fetched from the store: $(served)"

step "warm the replica to READY and look at it as an operator"
"$bin" warm demo --wait --node "$node"
"$bin" status --node "$node"

step "a sandbox: a copy-on-write overlay over the template, written over NBD, committed"
"$bin" overlay create demo --sandbox sb1 --node "$node" >/dev/null
qemu-io -f raw -c "write -P 0x5a 200M 4M" -c flush "nbd+unix:///sb1?socket=$sock" | tail -1
"$bin" commit sb1 --template demo-v2 --node "$node"
"$bin" templates --store "$store"

if ((${#fuse_args[@]})); then
  step "the FUSE view: templates and sandboxes as files, mounted through a loop device"
  ls -l "$dir/fuse/templates" "$dir/fuse/sandboxes"
  mkdir -p "$dir/mnt"
  loopdev=$(losetup -r --find --show "$dir/fuse/templates/demo")
  mount -o ro "$loopdev" "$dir/mnt"
  echo "  $(cat "$dir/mnt/hello.txt")   (read through $loopdev -> $dir/fuse/templates/demo)"
  umount "$dir/mnt"; losetup -d "$loopdev"
fi

echo
echo "Demo files are in $dir. The store and daemon stop when this script exits."

#!/usr/bin/env bash
# Tests `lazyblk attach` / `detach` against the real kernel NBD client (/dev/nbdN).
#
# This machine's kernel has no nbd driver, so the test boots Debian's cloud kernel
# (which has nbd.ko) under qemu with a busybox initramfs that carries the lazyblk
# binary, a store prepared here, and an init script that runs the store and a daemon
# inside the guest, attaches a template read-only and a sandbox read-write, mounts
# them, checks and writes files, and prints one line: "KERNEL-TEST: PASS" or
# "KERNEL-TEST: FAIL: <step>". Exit status 0 on PASS.
#
# Environment:
#   LAZYBLK_BIN          the lazyblk binary to test (default: cargo build --release)
#   KERNEL_TEST_WORK     work directory (default: target/kernel-test; downloads are kept)
#   KERNEL_TEST_TIMEOUT  seconds the guest may run (default: 300)
#
# qemu-system-x86 is not installed as a package: Debian 12's qemu-system-common (7.2)
# conflicts with the qemu-utils 10 the other tests use, and installing it would remove
# that. Its libraries are installed, and the two qemu packages are unpacked into the
# work directory instead (the kernel too: it is never installed over the host's).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${KERNEL_TEST_WORK:-$repo/target/kernel-test}
guest_timeout=${KERNEL_TEST_TIMEOUT:-300}
started=$(date +%s)
mkdir -p "$work"
work=$(cd "$work" && pwd)

say() { echo "kernel-test: $*" >&2; }

# ---- host packages -----------------------------------------------------------------
apt_updated=""
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
apt_update_once() {
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
}

apt_install busybox-static e2fsprogs binutils curl

# Unpacks package $1 (its candidate version) into $work/pkg/$1, once.
unpack() {
  local package=$1 dir=$work/pkg/$1
  [ -e "$dir/.unpacked" ] && return 0
  apt_update_once
  rm -rf "$dir" && mkdir -p "$dir"
  (cd "$work/pkg" && rm -f "${package}"_*.deb && apt-get download -qq "$package" >/dev/null 2>&1) \
    || { say "apt-get download $package failed"; exit 1; }
  dpkg-deb -x "$work/pkg/${package}"_*.deb "$dir"
  touch "$dir/.unpacked"
}

mkdir -p "$work/pkg"
if command -v qemu-system-x86_64 >/dev/null; then
  qemu=(qemu-system-x86_64)
else
  apt_update_once
  # qemu-system-x86's own dependencies, except qemu-system-common (see the header).
  deps=$(apt-cache show qemu-system-x86 | sed -n 's/^Depends: //p' | head -1 | tr ',' '\n' \
    | sed 's/([^)]*)//g; s/|.*//; s/ //g' | grep -v '^qemu-system-common$' | grep -v '^$')
  # shellcheck disable=SC2086
  apt_install $deps
  unpack qemu-system-x86
  unpack qemu-system-common
  # TCG is a loadable module in Debian's build; the firmware lives in seabios and
  # qemu-system-data (installed above as dependencies).
  export QEMU_MODULE_DIR=$work/pkg/qemu-system-common/usr/lib/x86_64-linux-gnu/qemu
  qemu=("$work/pkg/qemu-system-x86/usr/bin/qemu-system-x86_64" -L /usr/share/seabios -L /usr/share/qemu)
fi

# The cloud kernel: linux-image-cloud-amd64 names the current versioned package.
if [ ! -e "$work/pkg/kernel/.unpacked" ]; then
  apt_update_once
  kernel_package=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$kernel_package" ] || { say "cannot resolve linux-image-cloud-amd64"; exit 1; }
  unpack "$kernel_package"
  rm -rf "$work/pkg/kernel" && mv "$work/pkg/$kernel_package" "$work/pkg/kernel"
fi
vmlinuz=$(ls "$work"/pkg/kernel/boot/vmlinuz-* | head -1)
modules=$(ls -d "$work"/pkg/kernel/lib/modules/* | head -1)
say "kernel $(basename "$vmlinuz"), qemu $("${qemu[0]}" --version | head -1)"

# ---- the binary ----------------------------------------------------------------------
if [ -z "${LAZYBLK_BIN:-}" ]; then
  cargo build --release --bin lazyblk
  LAZYBLK_BIN=$repo/target/release/lazyblk
fi
[ -x "$LAZYBLK_BIN" ] || { say "no lazyblk binary at $LAZYBLK_BIN"; exit 1; }

# ---- test data: a template published to a store directory packed into the guest ------
data=$work/data
rm -rf "$data" && mkdir -p "$data/tree/etc" "$data/tree/data" "$data/store"
echo guest-template >"$data/tree/etc/hostname"
head -c $((3 << 20)) /dev/urandom >"$data/tree/data/blob"
expected_sha=$(sha256sum "$data/tree/data/blob" | cut -d' ' -f1)
mkfs.ext4 -q -F -b 4096 -d "$data/tree" "$data/base.img" 64M >/dev/null
store_port=$(( (RANDOM % 20000) + 30000 ))
"$LAZYBLK_BIN" store --root "$data/store" --listen "127.0.0.1:$store_port" 2>"$data/store.log" &
store_pid=$!
trap 'kill $store_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$store_port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
LAZYBLK_LOG=warn "$LAZYBLK_BIN" publish "$data/base.img" --template base \
  --store "http://127.0.0.1:$store_port" >"$data/publish.log" 2>&1 \
  || { cat "$data/publish.log" "$data/store.log" >&2; say "publishing the test template failed"; exit 1; }
kill $store_pid && wait $store_pid 2>/dev/null || true
trap - EXIT

# ---- the initramfs -----------------------------------------------------------------
root=$work/initramfs
rm -rf "$root" && mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules,etc,store,expected}
cp /usr/bin/busybox "$root/bin/busybox"
strip -o "$root/bin/lazyblk" "$LAZYBLK_BIN"
cp "$(command -v e2fsck)" "$root/sbin/e2fsck"
cp -a "$data/store/." "$root/store/"
echo "$expected_sha" >"$root/expected/blob.sha256"

# Shared libraries (and the loader) of the dynamic binaries, at their host paths.
for binary in "$root/bin/lazyblk" "$root/sbin/e2fsck"; do
  ldd "$binary" | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done

# nbd.ko and whatever it depends on (from each module's modinfo "depends=").
add_module() {
  local name=$1 file
  [ -e "$root/lib/modules/$name.ko" ] && return 0
  file=$(find "$modules" -name "$name.ko*" | head -1)
  [ -n "$file" ] || { say "module $name not found in $modules"; exit 1; }
  case $file in
    *.xz) xz -dc "$file" >"$root/lib/modules/$name.ko" ;;
    *.zst) zstd -qdc "$file" >"$root/lib/modules/$name.ko" ;;
    *) cp "$file" "$root/lib/modules/$name.ko" ;;
  esac
  local deps
  deps=$(strings "$root/lib/modules/$name.ko" | sed -n 's/^depends=//p' | tr ',' ' ')
  for dep in $deps; do add_module "$dep"; done
  echo "$name" >>"$root/lib/modules/order"
}
add_module nbd

cat >"$root/init" <<'INIT'
#!/bin/busybox sh
# The guest: runs a store and a daemon on loopback and drives lazyblk attach/detach.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
ifconfig lo 127.0.0.1 up 2>/dev/null || ip link set lo up
export PATH=/bin:/sbin LAZYBLK_LOG=warn
node=http://127.0.0.1:7071

log() { echo "guest: $*"; }
fail() {
  echo "KERNEL-TEST: FAIL: $*"
  echo "--- daemon log"; tail -n 40 /tmp/daemon.log
  echo "--- kernel log"; dmesg | tail -n 20
  poweroff -f
}
# Runs a command that must succeed; its output is in $out.
must() { out=$("$@" 2>&1) || fail "$* -> $out"; }
# Runs a command that must fail with a message containing $1.
must_refuse() {
  want=$1; shift
  if out=$("$@" 2>&1); then fail "$* succeeded; expected a refusal naming '$want'"; fi
  case $out in *"$want"*) log "refused as expected: $out" ;; *) fail "$* -> $out (expected '$want')" ;; esac
}

for module in $(cat /lib/modules/order); do
  insmod "/lib/modules/$module.ko" || fail "insmod $module"
done
[ -e /sys/block/nbd0 ] || fail "no /sys/block/nbd0 after insmod nbd"

# Starts the daemon (same cache every time); its pid is in $daemon.
start_daemon() {
  lazyblk daemon --cache /tmp/cache --store http://127.0.0.1:7070 --listen 127.0.0.1:7071 \
    --nbd unix:/tmp/nbd.sock 2>>/tmp/daemon.log &
  daemon=$!
  for i in $(seq 100); do wget -q -O /dev/null $node/healthz 2>/dev/null && return; sleep 0.2; done
  fail "the daemon did not start"
}
# Waits until /dev/$1 is no longer connected.
wait_free() {
  for i in $(seq 50); do [ -e "/sys/block/$1/pid" ] || return 0; sleep 0.2; done
  fail "/dev/$1 is still connected: $2"
}

lazyblk store --root /store --listen 127.0.0.1:7070 2>/tmp/store.log &
start_daemon

# A template, read-only.
must lazyblk attach base
ro=$out
[ "$ro" = /dev/nbd0 ] || fail "attach base printed '$ro', expected /dev/nbd0"
log "attached base at $ro ($(cat /sys/block/nbd0/size) sectors, ro=$(cat /sys/block/nbd0/ro))"
[ "$(cat /sys/block/nbd0/ro)" = 1 ] || fail "$ro is not read-only"
mkdir -p /mnt/ro /mnt/rw /mnt/commit
must mount -t ext4 -o ro "$ro" /mnt/ro
sum=$(sha256sum /mnt/ro/data/blob | cut -d' ' -f1)
[ "$sum" = "$(cat /expected/blob.sha256)" ] || fail "sha256 of data/blob over $ro is $sum"
[ "$(cat /mnt/ro/etc/hostname)" = guest-template ] || fail "etc/hostname over $ro"
log "data/blob sha256 matches over $ro"
must lazyblk status base
case $out in *"kernel /dev/nbd0"*) ;; *) fail "status base does not name kernel /dev/nbd0: $out" ;; esac
must_refuse "kernel /dev/nbd0" lazyblk evict base
must_refuse "already attached" lazyblk attach base --device /dev/nbd0
must_refuse "does not exist" lazyblk attach base --device /dev/nbd99
must_refuse '"nosuch"' lazyblk attach nosuch

# A sandbox, read-write.
must lazyblk overlay create base --sandbox sb1
must lazyblk attach sb1
rw=$out
[ "$rw" = /dev/nbd1 ] || fail "attach sb1 printed '$rw', expected /dev/nbd1"
[ "$(cat /sys/block/nbd1/ro)" = 0 ] || fail "$rw is read-only"
must mount -t ext4 "$rw" /mnt/rw
echo "written in the guest" >/mnt/rw/new.txt || fail "writing new.txt"
cp /mnt/rw/data/blob /mnt/rw/blob-copy || fail "copying blob"
rm /mnt/rw/etc/hostname || fail "removing etc/hostname"
sync
must_refuse "in use" lazyblk detach "$rw"
must_refuse "kernel /dev/nbd1" lazyblk overlay delete sb1
must umount /mnt/rw
must lazyblk detach "$rw"
log "wrote, unmounted and detached $rw"

# The writes are in the overlay: attach it again (on the device just freed), check
# the file system and the files.
must lazyblk attach sb1 --device /dev/nbd1
must e2fsck -fn /dev/nbd1
must mount -t ext4 /dev/nbd1 /mnt/rw
[ "$(cat /mnt/rw/new.txt)" = "written in the guest" ] || fail "new.txt after re-attach"
[ ! -e /mnt/rw/etc/hostname ] || fail "etc/hostname is back after re-attach"
sum=$(sha256sum /mnt/rw/blob-copy | cut -d' ' -f1)
[ "$sum" = "$(cat /expected/blob.sha256)" ] || fail "sha256 of blob-copy is $sum"
must umount /mnt/rw
must lazyblk detach /dev/nbd1
log "re-attached sb1: e2fsck clean, files as written"

# Commit the sandbox; the new template over the kernel shows the writes.
must lazyblk commit sb1 --template base2
must lazyblk attach base2
must mount -t ext4 -o ro "$out" /mnt/commit
[ "$(cat /mnt/commit/new.txt)" = "written in the guest" ] || fail "new.txt in the committed template"
must umount /mnt/commit
must lazyblk detach /dev/nbd1

must umount /mnt/ro
must lazyblk detach "$ro"
[ ! -e /sys/block/nbd0/pid ] || fail "/dev/nbd0 still connected after detach"
attached=$(wget -q -O - $node/v1/attachments)
[ "$attached" = "[]" ] || fail "attachments left: $attached"
must lazyblk overlay delete sb1
must lazyblk evict base
log "detached everything; template and sandbox released"

# A clean stop of the daemon disconnects the devices it attached.
must lazyblk attach base
kill -TERM $daemon; wait $daemon
wait_free nbd0 "after the daemon stopped"
log "the daemon's clean stop disconnected /dev/nbd0"
# A killed daemon leaves its device free for the next one.
start_daemon
must lazyblk attach base
kill -KILL $daemon; wait $daemon
wait_free nbd0 "after the daemon was killed"
start_daemon
must lazyblk attach base
[ "$out" = /dev/nbd0 ] || fail "attach after a restart printed '$out'"
must mount -t ext4 -o ro /dev/nbd0 /mnt/ro
sum=$(sha256sum /mnt/ro/data/blob | cut -d' ' -f1)
[ "$sum" = "$(cat /expected/blob.sha256)" ] || fail "sha256 of data/blob after a restart is $sum"
must umount /mnt/ro
must lazyblk detach /dev/nbd0
log "after SIGKILL and restart, /dev/nbd0 attached and read again"
echo "KERNEL-TEST: PASS"
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$work/initrd.gz"
say "initramfs $(du -h "$work/initrd.gz" | cut -f1), prepared in $(( $(date +%s) - started ))s"

# ---- boot ----------------------------------------------------------------------------
# TCG: nested KVM is not dependable on these machines, and the guest's work is small.
booted=$(date +%s)
set +e
timeout "$guest_timeout" "${qemu[@]}" -accel tcg -smp 2 -m 1024 -nographic -nic none -no-reboot \
  -kernel "$vmlinuz" -initrd "$work/initrd.gz" \
  -append 'console=ttyS0 panic=-1 quiet' </dev/null | tee "$work/console.log"
qemu_status=${PIPESTATUS[0]}
set -e
say "guest ran $(( $(date +%s) - booted ))s (qemu exit $qemu_status); total $(( $(date +%s) - started ))s"
if grep -q '^KERNEL-TEST: PASS' "$work/console.log"; then
  exit 0
fi
if [ "$qemu_status" = 124 ]; then
  say "FAIL: the guest did not finish within ${guest_timeout}s (console: $work/console.log)"
else
  say "FAIL (console: $work/console.log)"
fi
exit 1

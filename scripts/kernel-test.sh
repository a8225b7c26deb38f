#!/usr/bin/env bash
# Tests `lazyblk attach` / `detach` against the real kernel NBD client (/dev/nbdN).
#
# This machine's kernel has no nbd driver, so the test boots Debian's cloud kernel
# (which has nbd.ko) under qemu with a busybox initramfs that carries the lazyblk
# binary, a store prepared here, and an init script that runs the store and a daemon
# inside the guest, attaches a template read-only and a sandbox read-write, mounts
# them, checks and writes files, kills and restarts the daemon under their I/O (the
# devices, attached through netlink, must carry on), and prints one line:
# "KERNEL-TEST: PASS" or "KERNEL-TEST: FAIL: <step>". Exit status 0 on PASS.
#
# Environment:
#   LAZYBLK_BIN          the lazyblk binary to test (default: cargo build --release)
#   KERNEL_TEST_WORK     work directory (default: target/kernel-test; downloads are kept)
#   KERNEL_TEST_TIMEOUT  seconds the guest may run (default: 600)
#   KERNEL_TEST_ROUNDS   kill -9 rounds under I/O (default: 2)
#   KERNEL_TEST_KERNEL   the kernel's meta package (default: linux-image-cloud-amd64;
#                        linux-image-6.12-cloud-amd64 for 6.12)
#   KERNEL_TEST_DAEMON_FLAGS  extra flags for the guest's daemon (e.g. --device-ioctl,
#                        which attaches through the ioctls: the restart checks fail)
#
# qemu-system-x86 is not installed as a package: Debian 12's qemu-system-common (7.2)
# conflicts with the qemu-utils 10 the other tests use, and installing it would remove
# that. Its libraries are installed, and the two qemu packages are unpacked into the
# work directory instead (the kernel too: it is never installed over the host's).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${KERNEL_TEST_WORK:-$repo/target/kernel-test}
guest_timeout=${KERNEL_TEST_TIMEOUT:-600}
rounds=${KERNEL_TEST_ROUNDS:-2}
case $rounds in '' | *[!0-9]*) echo "KERNEL_TEST_ROUNDS must be a number: $rounds" >&2; exit 2 ;; esac
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

# The cloud kernel: the meta package (KERNEL_TEST_KERNEL, default linux-image-cloud-amd64,
# Debian 12's 6.1; linux-image-6.12-cloud-amd64 for 6.12) names the versioned package.
kernel_meta=${KERNEL_TEST_KERNEL:-linux-image-cloud-amd64}
kernel_dir=$work/pkg/kernel-$kernel_meta
if [ ! -e "$kernel_dir/.unpacked" ]; then
  apt_update_once
  kernel_package=$(apt-cache depends "$kernel_meta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$kernel_package" ] || { say "cannot resolve $kernel_meta"; exit 1; }
  unpack "$kernel_package"
  rm -rf "$kernel_dir" && mv "$work/pkg/$kernel_package" "$kernel_dir"
fi
vmlinuz=$(ls "$kernel_dir"/boot/vmlinuz-* | head -1)
modules=$(ls -d "$kernel_dir"/lib/modules/* | head -1)
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
echo "$rounds" >"$root/etc/rounds"
echo "${KERNEL_TEST_DAEMON_FLAGS:-}" >"$root/etc/daemon-flags"

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
  if [ -n "${daemon:-}" ] && [ -d "/proc/$daemon" ]; then
    echo "--- where the daemon's threads wait"
    for task in /proc/$daemon/task/*; do
      echo "$(cat "$task/comm") $(cat "$task/wchan" 2>/dev/null)"; cat "$task/stack" 2>/dev/null | head -n 12
    done
  fi
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

# Starts the daemon (same cache every time, the flags of /etc/daemon-flags and the
# arguments); its pid is in $daemon.
start_daemon() {
  # shellcheck disable=SC2046
  LAZYBLK_LOG=warn,lazyblk::daemon::attach=debug \
    lazyblk daemon --cache /tmp/cache --store http://127.0.0.1:7070 --listen 127.0.0.1:7071 \
    --nbd unix:/tmp/nbd.sock $(cat /etc/daemon-flags) "$@" 2>>/tmp/daemon.log &
  daemon=$!
  for i in $(seq 100); do timeout 5 wget -q -O /dev/null $node/healthz 2>/dev/null && return; sleep 0.2; done
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

# ---- devices outlive the daemon (netlink, dead-connection timeout, reconfigure) ----
# Fails the test when the kernel logged an I/O error or a file system error. (The nbd
# driver's "Dead connection, failed to find a fallback" is not one: it then waits for
# a new socket, up to the dead-connection timeout.)
check_kernel_log() {
  errors=$(dmesg | grep -iE 'I/O error|EXT4-fs error|EXT4-fs warning|Aborting journal|blk_update_request' || true)
  [ -z "$errors" ] || fail "$1: the kernel logged errors: $errors"
}
# Waits until the daemon lists $1 connected again (after its restart).
wait_reconnected() {
  for i in $(seq 100); do
    wget -q -O - $node/v1/attachments 2>/dev/null | tr '}' '\n' | grep "\"device\":\"$1\"" \
      | grep -q '"connected":true' && return 0
    sleep 0.2
  done
  fail "the restarted daemon did not reconnect $1: $(wget -q -O - $node/v1/attachments)"
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# An acknowledged write is not lost when the daemon is killed: 64 KiB written to the
# raw device with O_DIRECT and no flush, kill -9, restart, read back.
must lazyblk overlay create base --sandbox raw1
must lazyblk attach raw1
raw=$out
head -c 65536 /dev/urandom >/tmp/pattern
dd if=/tmp/pattern of="$raw" bs=65536 seek=100 count=1 oflag=direct 2>/dev/null || fail "direct write to $raw"
kill -KILL $daemon; wait $daemon
[ -e "/sys/block/${raw#/dev/}/pid" ] || fail "$raw was disconnected when the daemon was killed"
start_daemon
wait_reconnected "$raw"
dd if="$raw" of=/tmp/readback bs=65536 skip=100 count=1 iflag=direct 2>/dev/null || fail "direct read from $raw"
[ "$(sha256sum </tmp/readback)" = "$(sha256sum </tmp/pattern)" ] || fail "an acknowledged write to $raw was lost across kill -9"
must lazyblk detach "$raw"
must lazyblk overlay delete raw1
log "a write acknowledged before kill -9 reads back after the restart"

# Rounds of kill -9 under I/O: a sandbox mounted read-write (files written with
# fsync) and a template mounted read-only (re-read with the page cache dropped).
must lazyblk attach base
ro=$out
must mount -t ext4 -o ro "$ro" /mnt/ro
must lazyblk overlay create base --sandbox sb2
must_refuse "--connections must be 1 to 16" lazyblk attach sb2 --connections 17
must lazyblk attach sb2 --connections 2
rw=$out
must mount -t ext4 "$rw" /mnt/rw
head -c $((1 << 20)) /dev/urandom >/tmp/src
src_sum=$(sha256sum </tmp/src)
blob_sum=$(cat /expected/blob.sha256)
rounds=$(cat /etc/rounds)
round=1
# Waits until file $1 exists (the writer got that far).
wait_file() {
  for i in $(seq 600); do [ -e "$1" ] && return 0; sleep 0.1; done
  fail "round $round: $1 was never written: $(cat /tmp/writer.fail 2>/dev/null)"
}
while [ "$round" -le "$rounds" ]; do
  rm -f /tmp/writer.fail /tmp/reader.fail /tmp/stop /tmp/written
  # Writes files until told to stop, each with fsync; the one in progress at the
  # kill waits for the restarted daemon.
  (
    i=1
    while [ ! -e /tmp/stop ]; do
      dd if=/tmp/src of=/mnt/rw/r$round-$i bs=65536 conv=fsync 2>/dev/null || echo "r$round-$i" >>/tmp/writer.fail
      i=$((i + 1))
    done
    echo $((i - 1)) >/tmp/written
  ) &
  writer=$!
  # Re-reads the template's blob with the page cache dropped, until told to stop.
  (
    while [ ! -e /tmp/stop ]; do
      drop_caches
      sum=$(sha256sum /mnt/ro/data/blob | cut -d' ' -f1)
      [ "$sum" = "$blob_sum" ] || echo "$sum" >>/tmp/reader.fail
    done
  ) &
  reader=$!
  wait_file /mnt/rw/r$round-2
  # Counted before the kill: between the kill and the restart nothing may touch the
  # devices' file systems (the reader drops the page cache, so even a directory
  # listing would wait for the daemon that is not started yet).
  killed_at=$(ls /mnt/rw | grep -c "^r$round-")
  kill -KILL $daemon; wait $daemon
  start_daemon
  # Two more files after the restart, then stop.
  wait_file /mnt/rw/r$round-$((killed_at + 2))
  touch /tmp/stop
  wait $writer; wait $reader
  [ ! -e /tmp/writer.fail ] || fail "round $round: writes failed: $(cat /tmp/writer.fail)"
  [ ! -e /tmp/reader.fail ] || fail "round $round: template reads failed: $(cat /tmp/reader.fail)"
  drop_caches
  written=$(cat /tmp/written)
  i=1
  while [ "$i" -le "$written" ]; do
    [ "$(sha256sum </mnt/rw/r$round-$i)" = "$src_sum" ] || fail "round $round: r$round-$i reads back wrong"
    i=$((i + 1))
  done
  check_kernel_log "round $round"
  wget -q -O - $node/v1/attachments | tr '}' '\n' | grep "\"device\":\"$rw\"" | grep -q '"connections":2' \
    || fail "round $round: $rw is not listed with its 2 connections: $(wget -q -O - $node/v1/attachments)"
  log "round $round: kill -9 and restart under I/O ($killed_at files begun before the kill); $written files and the template's reads intact"
  round=$((round + 1))
done
must umount /mnt/rw
must e2fsck -fn "$rw"
must umount /mnt/ro
must lazyblk detach "$rw"
must lazyblk detach "$ro"
must lazyblk overlay delete sb2
log "after $rounds rounds: e2fsck clean, both devices detached"

# A clean stop leaves the device for the next run, which reconnects it.
must lazyblk attach base
kept=$out
kill -TERM $daemon; wait $daemon
[ -e "/sys/block/${kept#/dev/}/pid" ] || fail "$kept was disconnected by a clean stop"
start_daemon
wait_reconnected "$kept"
must lazyblk detach "$kept"
wait_free "${kept#/dev/}" "after its detach"
log "a clean stop left $kept attached and the next run reconnected it"

# A device whose export is gone by the restart is disconnected and reported.
must lazyblk overlay create base --sandbox gone1
must lazyblk attach gone1
gone=$out
kill -KILL $daemon; wait $daemon
rm -rf /tmp/cache/overlays/gone1
start_daemon
wait_free "${gone#/dev/}" "its export was gone at the restart"
case $(wget -q -O - $node/v1/attachments) in
  *gone1*disconnected*) ;;
  *) fail "the attachments do not report gone1 disconnected: $(wget -q -O - $node/v1/attachments)" ;;
esac
log "a device whose export was gone at the restart was disconnected and reported"
check_kernel_log "after the restarts"

# The ioctl fallback (kernels without the netlink family): the device dies with the
# daemon, as before, and is free for the next one.
kill -TERM $daemon; wait $daemon
start_daemon --device-ioctl
must_refuse "takes one connection" lazyblk attach base --connections 2
must lazyblk attach base
kill -KILL $daemon; wait $daemon
wait_free nbd0 "after the daemon (ioctl attach) was killed"
start_daemon --device-ioctl
must lazyblk attach base
[ "$out" = /dev/nbd0 ] || fail "attach after a restart printed '$out'"
must mount -t ext4 -o ro /dev/nbd0 /mnt/ro
sum=$(sha256sum /mnt/ro/data/blob | cut -d' ' -f1)
[ "$sum" = "$(cat /expected/blob.sha256)" ] || fail "sha256 of data/blob after a restart is $sum"
must umount /mnt/ro
must lazyblk detach /dev/nbd0
log "through the ioctls: after SIGKILL and restart, /dev/nbd0 attached and read again"
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

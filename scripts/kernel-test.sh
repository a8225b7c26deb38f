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
#   KERNEL_TEST_ROUNDS   kill -9 rounds under I/O, and launch waves (default: 2)
#   KERNEL_TEST_DEVICES  devices per launch wave, attached at once (default: 4; the
#                        issue's heavy run: KERNEL_TEST_DEVICES=32 KERNEL_TEST_ROUNDS=10);
#                        a SIGKILL then finds up to 8 of them attached and mounted
#   KERNEL_TEST_BENCH    1: measure B11 (attach latency over 100 attaches, fio 4 KiB
#                        random reads at qd 32 and 1 MiB sequential reads through
#                        /dev/nbdX with 1 and 2 connections, as ratios to the same fio
#                        on a file of the guest's own virtio disk) and print a "B11" line
#   KERNEL_TEST_FIO_RUNTIME  seconds of each B11 fio run (default: 5)
#   KERNEL_TEST_PROFILE  1 (with KERNEL_TEST_BENCH=1 and KERNEL_TEST_KIND=ublk): one more
#                        qd 32 fio run through ublk and through NBD (2 connections) under
#                        `perf record -a` (cpu-clock: the guest's CPUs by task and
#                        symbol), printed as "B11-profile" lines
#   KERNEL_TEST_FIO_VERIFY  1: in every kill -9 round, fio also runs a mixed random
#                        read/write job with crc32c verify and fsyncs on the sandbox's
#                        file system across the kill, and must finish with no error and
#                        its verify passed (issue 25's criterion; minutes per round
#                        under TCG, so off by default)
#   KERNEL_TEST_KERNEL   the kernel's meta package (default: linux-image-cloud-amd64;
#                        linux-image-6.12-cloud-amd64 for 6.12)
#   KERNEL_TEST_DAEMON_FLAGS  extra flags for the guest's daemon (e.g. --device-ioctl,
#                        which attaches through the ioctls: the restart checks fail)
#   KERNEL_TEST_KIND     nbd (default), ublk or both: which kernel driver's checks run.
#                        ublk (scripts/guest-ublk.sh: template and sandbox mounted and
#                        verified, kill -9 rounds with user recovery, launch waves, a
#                        churn of add/remove cycles) needs a kernel with ublk_drv:
#                        KERNEL_TEST_KERNEL=linux-image-6.12-cloud-amd64
#   KERNEL_TEST_CHURN    ublk add/remove cycles, 8 at a time (default: 24; the issue's
#                        run: 200)
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
devices=${KERNEL_TEST_DEVICES:-4}
bench=${KERNEL_TEST_BENCH:-0}
fio_verify=${KERNEL_TEST_FIO_VERIFY:-0}
fio_runtime=${KERNEL_TEST_FIO_RUNTIME:-5}
profile=${KERNEL_TEST_PROFILE:-0}
kind=${KERNEL_TEST_KIND:-nbd}
churn=${KERNEL_TEST_CHURN:-24}
case $kind in nbd | ublk | both) ;; *) echo "KERNEL_TEST_KIND must be nbd, ublk or both: $kind" >&2; exit 2 ;; esac
case $churn in '' | *[!0-9]*) echo "KERNEL_TEST_CHURN must be a number: $churn" >&2; exit 2 ;; esac
for number in "KERNEL_TEST_ROUNDS=$rounds" "KERNEL_TEST_DEVICES=$devices" "KERNEL_TEST_FIO_RUNTIME=$fio_runtime"; do
  case ${number#*=} in '' | *[!0-9]*) echo "${number%%=*} must be a number: ${number#*=}" >&2; exit 2 ;; esac
done
[ "$devices" -ge 2 ] || { echo "KERNEL_TEST_DEVICES must be at least 2 (a template and a sandbox)" >&2; exit 2; }
case $bench in 0 | 1) ;; *) echo "KERNEL_TEST_BENCH must be 0 or 1: $bench" >&2; exit 2 ;; esac
case $fio_verify in 0 | 1) ;; *) echo "KERNEL_TEST_FIO_VERIFY must be 0 or 1: $fio_verify" >&2; exit 2 ;; esac
case $profile in 0 | 1) ;; *) echo "KERNEL_TEST_PROFILE must be 0 or 1: $profile" >&2; exit 2 ;; esac
# The driver's devices: the wave's, and room for the ones the other steps attach.
nbds_max=$((devices + 16))
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

apt_install busybox-static e2fsprogs binutils curl jq
[ "$bench" = 0 ] || apt_install fio coreutils
[ "$fio_verify" = 0 ] || apt_install fio

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
if [ "$bench" = 1 ]; then
  # B11's template: 40 MiB of random data (nothing a zero chunk could shortcut), and
  # the guest's own disk, an ext4 virtio disk for the same fio on a file.
  mkdir -p "$data/bench/data"
  head -c $((40 << 20)) /dev/urandom >"$data/bench/data/random"
  mkfs.ext4 -q -F -b 4096 -d "$data/bench" "$data/bench.img" 64M >/dev/null
  LAZYBLK_LOG=warn "$LAZYBLK_BIN" publish "$data/bench.img" --template bench \
    --store "http://127.0.0.1:$store_port" >>"$data/publish.log" 2>&1 \
    || { cat "$data/publish.log" "$data/store.log" >&2; say "publishing the bench template failed"; exit 1; }
  rm -f "$data/bench.img" && rm -rf "$data/bench"
  mkfs.ext4 -q -F "$data/disk.img" 128M >/dev/null
fi
kill $store_pid && wait $store_pid 2>/dev/null || true
trap - EXIT

# ---- the initramfs -----------------------------------------------------------------
root=$work/initramfs
rm -rf "$root" && mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules,etc,store,expected}
cp /usr/bin/busybox "$root/bin/busybox"
strip -o "$root/bin/lazyblk" "$LAZYBLK_BIN"
cp "$(command -v e2fsck)" "$root/sbin/e2fsck"
cp "$(command -v jq)" "$root/bin/jq"
cp "$repo/scripts/guest-json.sh" "$root/json-test"
cp -a "$data/store/." "$root/store/"
echo "$expected_sha" >"$root/expected/blob.sha256"
echo "$rounds" >"$root/etc/rounds"
echo "${KERNEL_TEST_DAEMON_FLAGS:-}" >"$root/etc/daemon-flags"
echo "$devices" >"$root/etc/devices"
echo "$bench" >"$root/etc/bench"
echo "$fio_verify" >"$root/etc/fio-verify"
echo "$fio_runtime" >"$root/etc/bench-runtime"
echo "$profile" >"$root/etc/profile"
echo "nbds_max=$nbds_max" >"$root/etc/nbd-params"
dynamic=("$root/bin/lazyblk" "$root/sbin/e2fsck" "$root/bin/jq")
if [ "$bench" = 1 ] || [ "$fio_verify" = 1 ]; then
  cp "$(command -v fio)" "$root/bin/fio"
  dynamic+=("$root/bin/fio")
fi
if [ "$profile" = 1 ]; then
  apt_install linux-perf
  cp "$(command -v perf)" "$root/bin/perf"
  dynamic+=("$root/bin/perf")
fi
if [ "$bench" = 1 ]; then
  # coreutils' date: busybox's has no nanoseconds (%N).
  cp /usr/bin/date "$root/bin/gdate"
  dynamic+=("$root/bin/gdate")
fi

# Shared libraries (and the loader) of the dynamic binaries, at their host paths.
for binary in "${dynamic[@]}"; do
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
[ "$bench" = 0 ] || add_module virtio_blk
echo "$kind" >"$root/etc/kind"
echo "$churn" >"$root/etc/churn"
if [ "$kind" != nbd ]; then
  [ -n "$(find "$modules" -name 'ublk_drv.ko*' | head -1)" ] \
    || { say "KERNEL_TEST_KIND=$kind: kernel $(basename "$modules") has no ublk_drv (use KERNEL_TEST_KERNEL=linux-image-6.12-cloud-amd64)"; exit 2; }
  add_module ublk_drv
  cp "$repo/scripts/guest-ublk.sh" "$root/ublk-test"
fi

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

log() { echo "guest: $*"; echo "$*" >/tmp/progress; }
# Notes progress for the watchdog, silently.
progress() { echo "$*" >/tmp/progress; }
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
  poweroff -n -f
}
# Runs a command that must succeed; its output is in $out.
must() { out=$("$@" 2>&1) || fail "$* -> $out"; }
# Runs a command that must fail with a message containing $1.
must_refuse() {
  want=$1; shift
  if out=$("$@" 2>&1); then fail "$* succeeded; expected a refusal naming '$want'"; fi
  case $out in *"$want"*) log "refused as expected: $out" ;; *) fail "$* -> $out (expected '$want')" ;; esac
}

# A watchdog: when no step has logged progress for $stall seconds (a hung attach, a
# request the kernel never completes), it shows where the guest waits and fails the
# test instead of leaving it to the host's timeout.
stall=200
touch /tmp/progress
(
  while sleep 10; do
    [ $(($(date +%s) - $(date -r /tmp/progress +%s))) -gt $stall ] || continue
    echo "KERNEL-TEST: FAIL: no progress for ${stall}s after: $(cat /tmp/progress)"
    echo "--- daemon log"; tail -n 60 /tmp/daemon.log
    echo w >/proc/sysrq-trigger 2>/dev/null
    sleep 2
    echo "--- kernel log"; dmesg | tail -n 80
    echo "--- processes (pid, command, state, wait channel; the stacks of pid 1 and of tasks in D)"
    for p in /proc/[0-9]*; do
      state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "$p/status" 2>/dev/null)
      [ -n "$(cat "$p/cmdline" 2>/dev/null)" ] || continue
      echo "${p#/proc/} $(tr '\0' ' ' <"$p/cmdline" | cut -c1-80) $state $(cat "$p/wchan" 2>/dev/null)"
      if [ "${p#/proc/}" = 1 ] || [ "$state" = D ]; then head -n 12 "$p/stack" 2>/dev/null; fi
    done
    for task in /proc/$(cat /tmp/daemon.pid 2>/dev/null)/task/*; do
      echo "$(cat "$task/comm" 2>/dev/null) $(cat "$task/wchan" 2>/dev/null)"; cat "$task/stack" 2>/dev/null | head -n 12
    done
    poweroff -n -f
  done
) &

for module in $(cat /lib/modules/order); do
  params=""
  [ "$module" != nbd ] || params=$(cat /etc/nbd-params)
  # shellcheck disable=SC2086
  insmod "/lib/modules/$module.ko" $params || fail "insmod $module $params"
done
[ -e /sys/block/nbd0 ] || fail "no /sys/block/nbd0 after insmod nbd"

# Starts the daemon (same cache every time, the flags of /etc/daemon-flags and the
# arguments); its pid is in $daemon.
start_daemon() {
  # shellcheck disable=SC2046
  LAZYBLK_LOG=warn,lazyblk::daemon::attach=debug,lazyblk_nbd::kernel=debug \
    lazyblk daemon --cache /tmp/cache --store http://127.0.0.1:7070 --listen 127.0.0.1:7071 \
    --nbd unix:/tmp/nbd.sock $(cat /etc/daemon-flags) "$@" 2>>/tmp/daemon.log &
  daemon=$!
  echo $daemon >/tmp/daemon.pid
  for try in $(seq 100); do timeout 5 wget -q -O /dev/null $node/healthz 2>/dev/null && return; sleep 0.2; done
  fail "the daemon did not start"
}
# Waits until /dev/$1 is no longer connected.
wait_free() {
  for try in $(seq 50); do [ -e "/sys/block/$1/pid" ] || return 0; sleep 0.2; done
  fail "/dev/$1 is still connected: $2"
}

lazyblk store --root /store --listen 127.0.0.1:7070 2>/tmp/store.log &
start_daemon

# The ublk checks (KERNEL_TEST_KIND=ublk or both); they leave the daemon running with
# no device attached.
if [ "$(cat /etc/kind)" != nbd ]; then
  . /ublk-test
  if [ "$(cat /etc/kind)" = ublk ]; then
    echo "KERNEL-TEST: PASS"
    poweroff -n -f
  fi
fi

# attach --json and detach --json: the documented fields (scripts/guest-json.sh).
. /json-test

# A template, read-only.
must lazyblk attach base
ro=$out
[ "$ro" = /dev/nbd0 ] || fail "attach base printed '$ro', expected /dev/nbd0"
log "attached base at $ro ($(cat /sys/block/nbd0/size) sectors, ro=$(cat /sys/block/nbd0/ro))"
[ "$(cat /sys/block/nbd0/ro)" = 1 ] || fail "$ro is not read-only"
mkdir -p /mnt/ro /mnt/rw /mnt/commit /mnt/disk
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
  for try in $(seq 100); do
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
  for try in $(seq 600); do [ -e "$1" ] && return 0; sleep 0.1; done
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
  fio_pid=
  if [ "$(cat /etc/fio-verify)" = 1 ]; then
    # A mixed random read/write job with crc32c verify and an fsync every 8 writes,
    # running across the kill: it must end with no I/O error and its verify passed.
    fio --name=verify-r$round --filename=/mnt/rw/fio-r$round --size=16M --rw=randrw \
      --rwmixread=50 --bs=4k --ioengine=psync --fsync=8 --verify=crc32c --verify_fatal=1 \
      --do_verify=1 --randrepeat=0 --output=/tmp/fio-r$round.log >/dev/null 2>&1 &
    fio_pid=$!
    # Started and laying out its file before the kill.
    wait_file /mnt/rw/fio-r$round
  fi
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
  if [ -n "$fio_pid" ]; then
    wait $fio_pid || fail "round $round: fio (verify crc32c across the kill) failed: $(tail -n 15 /tmp/fio-r$round.log)"
    grep -q "err= 0" /tmp/fio-r$round.log || fail "round $round: fio reported errors: $(tail -n 15 /tmp/fio-r$round.log)"
    rm -f /mnt/rw/fio-r$round
    log "round $round: fio's mixed read/write job verified (crc32c) across the kill"
  fi
  [ ! -e /tmp/writer.fail ] || fail "round $round: writes failed: $(cat /tmp/writer.fail)"
  [ ! -e /tmp/reader.fail ] || fail "round $round: template reads failed: $(cat /tmp/reader.fail)"
  drop_caches
  written=$(cat /tmp/written)
  i=1
  while [ "$i" -le "$written" ]; do
    [ "$(sha256sum </mnt/rw/r$round-$i)" = "$src_sum" ] || fail "round $round: r$round-$i reads back wrong"
    i=$((i + 1))
  done
  # The sandbox's file system is 64 MiB: each round's files go once checked.
  rm -f /mnt/rw/r$round-*
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

# ---- launch waves: many devices attached at once, mounted, checked, detached -------
# $devices devices per wave (odd ones the template read-only, even ones a sandbox of
# their own read-write), $rounds waves: each attach succeeds, each device mounts and
# its files check out, all are detached; then no device is left connected, the kernel
# logged no hung task, and the daemon lists what the kernel shows.
devices=$(cat /etc/devices)
node_id=$(wget -q -O - $node/v1/node | tr ',' '\n' | sed -n 's/.*"node_id":"\([^"]*\)".*/\1/p')
[ -n "$node_id" ] || fail "no node_id in /v1/node"
# The devices the kernel shows connected with this node's backend identifier, and the
# ones the daemon lists connected, one per line, sorted.
kernel_devices() {
  for d in /sys/block/nbd*; do
    [ -e "$d/pid" ] && [ "$(cat "$d/backend" 2>/dev/null)" = "$node_id" ] && echo "/dev/${d##*/}"
  done | sort
}
daemon_devices() {
  wget -q -O - $node/v1/attachments | tr '}' '\n' | grep '"state":"connected"' \
    | sed -n 's/.*"device":"\([^"]*\)".*/\1/p' | sort
}
same_devices() {
  k=$(kernel_devices); d=$(daemon_devices)
  [ "$k" = "$d" ] || fail "$1: the kernel shows [$(echo $k)] but the daemon lists [$(echo $d)] connected"
}
check_no_hung_task() {
  hung=$(dmesg | grep -iE 'blocked for more than|hung_task|hung task' || true)
  [ -z "$hung" ] || fail "$1: the kernel logged a hung task: $hung"
}
# The export of wave slot $1: the template for odd slots, sandbox ws$1 for even ones.
wave_export() { if [ $(($1 % 2)) = 1 ]; then echo base; else echo ws$1; fi; }
i=2
while [ "$i" -le "$devices" ]; do
  must lazyblk overlay create base --sandbox ws$i
  i=$((i + 2))
done
wave=1
while [ "$wave" -le "$rounds" ]; do
  rm -rf /tmp/wave && mkdir -p /tmp/wave
  progress "wave $wave: attaching"
  pids=""
  i=1
  while [ "$i" -le "$devices" ]; do
    ( lazyblk attach "$(wave_export $i)" >/tmp/wave/$i.dev 2>/tmp/wave/$i.err || touch /tmp/wave/$i.failed ) &
    pids="$pids $!"
    i=$((i + 1))
  done
  # Only these: a bare wait would wait for the store and the daemon too.
  wait $pids
  progress "wave $wave: attached"
  failed=$(cd /tmp/wave && ls ./*.failed 2>/dev/null || true)
  [ -z "$failed" ] || fail "wave $wave: attaches failed: $(cat /tmp/wave/*.err)"
  uniq=$(cat /tmp/wave/*.dev | sort -u | wc -l)
  [ "$uniq" = "$devices" ] || fail "wave $wave: $devices attaches got $uniq devices: $(cat /tmp/wave/*.dev)"
  same_devices "wave $wave, attached"
  i=1
  while [ "$i" -le "$devices" ]; do
    dev=$(cat /tmp/wave/$i.dev)
    mkdir -p /mnt/w$i
    if [ $((i % 2)) = 1 ]; then
      [ "$(cat /sys/block/${dev#/dev/}/ro)" = 1 ] || fail "wave $wave: $dev (template) is not read-only"
      must mount -t ext4 -o ro "$dev" /mnt/w$i
      [ "$(sha256sum </mnt/w$i/data/blob | cut -d' ' -f1)" = "$blob_sum" ] || fail "wave $wave: data/blob over $dev"
    else
      must mount -t ext4 "$dev" /mnt/w$i
      # Every earlier wave's file is there, as written.
      w=1
      while [ "$w" -lt "$wave" ]; do
        [ "$(sha256sum </mnt/w$i/wave-$w)" = "$src_sum" ] || fail "wave $wave: wave-$w on ws$i ($dev) reads back wrong"
        w=$((w + 1))
      done
      dd if=/tmp/src of=/mnt/w$i/wave-$wave bs=65536 conv=fsync 2>/dev/null || fail "wave $wave: writing on $dev"
    fi
    i=$((i + 1))
  done
  i=1
  while [ "$i" -le "$devices" ]; do must umount /mnt/w$i; i=$((i + 1)); done
  progress "wave $wave: mounted, checked, unmounted; detaching"
  pids=""
  i=1
  while [ "$i" -le "$devices" ]; do
    ( lazyblk detach "$(cat /tmp/wave/$i.dev)" >/dev/null 2>/tmp/wave/$i.err || touch /tmp/wave/$i.failed ) &
    pids="$pids $!"
    i=$((i + 1))
  done
  wait $pids
  failed=$(cd /tmp/wave && ls ./*.failed 2>/dev/null || true)
  [ -z "$failed" ] || fail "wave $wave: detaches failed: $(cat /tmp/wave/*.err)"
  left=$(for d in /sys/block/nbd*; do [ -e "$d/pid" ] && echo "${d##*/}"; done)
  [ -z "$left" ] || fail "wave $wave: devices left connected after the detaches: $left"
  [ "$(wget -q -O - $node/v1/attachments)" = "[]" ] || fail "wave $wave: attachments left: $(wget -q -O - $node/v1/attachments)"
  same_devices "wave $wave, detached"
  check_no_hung_task "wave $wave"
  log "wave $wave: $devices devices attached at once, mounted, checked and detached"
  wave=$((wave + 1))
done
# The phases of the attaches are in the daemon's histogram and its debug log.
metrics=$(wget -q -O - $node/metrics)
for phase in handshake connect size_visible; do
  count=$(echo "$metrics" | sed -n "s/^lazyblk_device_attach_seconds_count{phase=\"$phase\"} //p")
  [ "${count:-0}" -ge "$devices" ] || fail "/metrics counts ${count:-no} $phase phases after waves of $devices attaches"
done
grep -q 'phase="connect"\|phase=connect' /tmp/daemon.log || fail "the daemon's log shows no attach phase"
check_kernel_log "after the waves"

# ---- SIGKILL with several devices attached: every one reconfigured and verified ----
killed=$devices
[ "$killed" -le 8 ] || killed=8
i=1
while [ "$i" -le "$killed" ]; do
  must lazyblk attach "$(wave_export $i)"
  echo "$out" >/tmp/wave/$i.dev
  mkdir -p /mnt/w$i
  if [ $((i % 2)) = 1 ]; then
    must mount -t ext4 -o ro "$out" /mnt/w$i
  else
    must mount -t ext4 "$out" /mnt/w$i
    dd if=/tmp/src of=/mnt/w$i/before-kill bs=65536 conv=fsync 2>/dev/null || fail "writing before the kill on $out"
  fi
  i=$((i + 1))
done
kill -KILL $daemon; wait $daemon
start_daemon
i=1
while [ "$i" -le "$killed" ]; do wait_reconnected "$(cat /tmp/wave/$i.dev)"; i=$((i + 1)); done
same_devices "after SIGKILL with $killed devices"
drop_caches
i=1
while [ "$i" -le "$killed" ]; do
  dev=$(cat /tmp/wave/$i.dev)
  if [ $((i % 2)) = 1 ]; then
    [ "$(sha256sum </mnt/w$i/data/blob | cut -d' ' -f1)" = "$blob_sum" ] || fail "after SIGKILL: data/blob over $dev"
  else
    [ "$(sha256sum </mnt/w$i/before-kill)" = "$src_sum" ] || fail "after SIGKILL: before-kill on $dev"
    dd if=/tmp/src of=/mnt/w$i/after-kill bs=65536 conv=fsync 2>/dev/null || fail "writing after the restart on $dev"
    [ "$(sha256sum </mnt/w$i/after-kill)" = "$src_sum" ] || fail "after SIGKILL: after-kill on $dev"
  fi
  i=$((i + 1))
done
must lazyblk status --devices
log "status after the restart:"; echo "$out"
count=$(echo "$out" | grep -c ' connected' || true)
[ "$count" = "$killed" ] || fail "status --devices shows $count devices connected, expected $killed"
i=1
while [ "$i" -le "$killed" ]; do
  must umount /mnt/w$i
  must e2fsck -fn "$(cat /tmp/wave/$i.dev)"
  must lazyblk detach "$(cat /tmp/wave/$i.dev)"
  i=$((i + 1))
done
i=2
while [ "$i" -le "$devices" ]; do must lazyblk overlay delete ws$i; i=$((i + 2)); done
check_kernel_log "after SIGKILL with $killed devices"
check_no_hung_task "after SIGKILL with $killed devices"
log "SIGKILL with $killed devices attached: every one reconfigured, files intact, e2fsck clean"

# ---- B11 (KERNEL_TEST_BENCH=1): attach latency, fio through /dev/nbdX vs the guest's disk
if [ "$(cat /etc/bench)" = 1 ]; then
  runtime=$(cat /etc/bench-runtime)
  # Attach latency: $attaches attaches (each detached again), by the clock of the CLI's
  # caller, in milliseconds; p50 and p95.
  attaches=100
  i=1
  while [ "$i" -le "$attaches" ]; do
    t0=$(gdate +%s%N)
    must lazyblk attach bench
    t1=$(gdate +%s%N)
    echo $(((t1 - t0) / 1000)) >>/tmp/attach-us
    must lazyblk detach "$out"
    i=$((i + 1))
  done
  sort -n /tmp/attach-us >/tmp/attach-sorted
  p50=$(sed -n "$((attaches * 50 / 100))p" /tmp/attach-sorted)
  p95=$(sed -n "$((attaches * 95 / 100))p" /tmp/attach-sorted)
  # fio's terse output: field 7 is the read bandwidth (KiB/s), 8 the read IOPS.
  fio_run() { # file, rw, bs, iodepth
    fio --name=b11 --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=libaio \
      --direct=1 --size=$((40 << 20)) --runtime="$runtime" --time_based --minimal 2>/tmp/fio.err \
      || fail "fio $2 on $1: $(cat /tmp/fio.err)"
  }
  iops() { fio_run "$1" randread 4k 32 | cut -d';' -f8; }
  mibs() { fio_run "$1" read 1M 8 | cut -d';' -f7 | awk '{printf "%.1f", $1 / 1024}'; }
  must mount -t ext4 /dev/vda /mnt/disk
  dd if=/dev/urandom of=/mnt/disk/file bs=1M count=40 conv=fsync 2>/dev/null || fail "writing the disk's fio file"
  disk_iops=$(iops /mnt/disk/file)
  disk_mibs=$(mibs /mnt/disk/file)
  must lazyblk warm bench --wait
  result="B11 attach p50 $((p50 / 1000)).$(((p50 % 1000) / 100)) ms p95 $((p95 / 1000)).$(((p95 % 1000) / 100)) ms ($attaches attaches);"
  result="$result disk: randread4k-qd32 $disk_iops IOPS, seqread1M $disk_mibs MiB/s;"
  for connections in 1 2; do
    must lazyblk attach bench --connections $connections
    dev=$out
    nbd_iops=$(iops "$dev")
    nbd_mibs=$(mibs "$dev")
    must lazyblk detach "$dev"
    ratio_iops=$(echo "$nbd_iops $disk_iops" | awk '{printf "%.2f", $1 / $2}')
    ratio_mibs=$(echo "$nbd_mibs $disk_mibs" | awk '{printf "%.2f", $1 / $2}')
    result="$result nbd ${connections}conn: randread4k-qd32 $nbd_iops IOPS (${ratio_iops}x disk), seqread1M $nbd_mibs MiB/s (${ratio_mibs}x disk);"
  done
  must umount /mnt/disk
  echo "$result"
  log "B11 measured (fio ${runtime}s per run; connections: 1 is the default, 2 one per guest CPU)"
fi

# ---- ownership: a device is this node's only while the kernel names its node id ----
# A second daemon on its own cache (so its own node id) attaches a device and is killed:
# the device waits for that node. This node's restart leaves it alone, an attach never
# picks it, one that names it or a detach of it is refused; its own node takes it back.
other_node=http://127.0.0.1:7072
start_other() {
  LAZYBLK_LOG=warn lazyblk daemon --cache /tmp/cache-other --store http://127.0.0.1:7070 \
    --listen 127.0.0.1:7072 --nbd unix:/tmp/nbd-other.sock 2>>/tmp/other.log &
  other=$!
  for try in $(seq 100); do timeout 5 wget -q -O /dev/null $other_node/healthz 2>/dev/null && return; sleep 0.2; done
  fail "the second daemon did not start: $(tail -n 5 /tmp/other.log)"
}
start_other
must lazyblk attach base --node $other_node
theirs=$out
kill -KILL $other; wait $other
kill -KILL $daemon; wait $daemon
start_daemon
[ -e "/sys/block/${theirs#/dev/}/pid" ] || fail "this node's restart disconnected $theirs, another node's device"
must_refuse "already connected" lazyblk attach base --device "$theirs"
must_refuse "not attached by this daemon" lazyblk detach "$theirs"
must lazyblk attach base
[ "$out" != "$theirs" ] || fail "an attach picked $theirs, another node's device"
must lazyblk detach "$out"
case $(wget -q -O - $node/v1/attachments) in *"$theirs"*) fail "this node lists $theirs, another node's device" ;; esac
start_other
for try in $(seq 100); do
  wget -q -O - $other_node/v1/attachments | grep -q '"state":"connected"' && break
  sleep 0.2
done
wget -q -O - $other_node/v1/attachments | grep -q "\"device\":\"$theirs\".*\"state\":\"connected\"" \
  || fail "the other node did not take $theirs back: $(wget -q -O - $other_node/v1/attachments)"
must lazyblk detach "$theirs" --node $other_node
kill -TERM $other; wait $other
log "another node's device: untouched by this node's restart, attach and detach; its own node took it back"

# A device the kernel shows with this node's id but the record does not name (the daemon
# died between the connect and the record) is disconnected at the next start and reported.
must lazyblk attach base
orphan=$out
kill -KILL $daemon; wait $daemon
echo '[]' >/tmp/cache/kernel-devices.json
start_daemon
wait_free "${orphan#/dev/}" "it was attached by this node but not recorded"
case $(wget -q -O - $node/v1/attachments) in
  *"$orphan"*'"state":"dead"'*"not in its record; disconnected"*) ;;
  *) fail "the unrecorded $orphan is not reported: $(wget -q -O - $node/v1/attachments)" ;;
esac
log "a device of this node missing from its record was disconnected and reported at the start"
# Restarted again so the reports above do not linger in the list.
kill -TERM $daemon; wait $daemon
start_daemon

# A device whose export is gone by the restart is disconnected and reported.
must lazyblk overlay create base --sandbox gone1
must lazyblk attach gone1
gone=$out
kill -KILL $daemon; wait $daemon
rm -rf /tmp/cache/overlays/gone1
start_daemon
wait_free "${gone#/dev/}" "its export was gone at the restart"
case $(wget -q -O - $node/v1/attachments) in
  *gone1*'"state":"dead"'*disconnected*) ;;
  *) fail "the attachments do not report gone1 dead and disconnected: $(wget -q -O - $node/v1/attachments)" ;;
esac
must lazyblk status --devices
case $out in
  *"$gone"*gone1*sandbox*dead*"$gone: "*disconnected*) ;;
  *) fail "status --devices does not report gone1 dead and disconnected: $out" ;;
esac
must lazyblk status
case $out in *DEVICE*"$gone"*dead*) ;; *) fail "status does not list the devices: $out" ;; esac
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
memory=1024
disk=()
if [ "$bench" = 1 ]; then
  # fio's libraries and the bench template's data live in the initramfs (RAM).
  memory=2048
  disk=(-drive "file=$data/disk.img,if=virtio,format=raw")
elif [ "$devices" -gt 8 ]; then
  memory=1536
fi
set +e
timeout "$guest_timeout" "${qemu[@]}" -accel tcg -smp 2 -m "$memory" -nographic -nic none -no-reboot \
  -kernel "$vmlinuz" -initrd "$work/initrd.gz" "${disk[@]}" \
  -append 'console=ttyS0 panic=-1 quiet' </dev/null | tee "$work/console.log"
qemu_status=${PIPESTATUS[0]}
set -e
say "guest ran $(( $(date +%s) - booted ))s (qemu exit $qemu_status); total $(( $(date +%s) - started ))s"
if grep -q '^KERNEL-TEST: PASS' "$work/console.log"; then
  rm -f "$data/disk.img"
  exit 0
fi
if [ "$qemu_status" = 124 ]; then
  say "FAIL: the guest did not finish within ${guest_timeout}s (console: $work/console.log)"
else
  say "FAIL (console: $work/console.log)"
fi
exit 1

#!/usr/bin/env bash
# B12 cold boot: a real Debian (systemd, made here with debootstrap) boots in a qemu
# guest (Debian's 6.12 cloud kernel, TCG) from a lazyblk sandbox overlay on /dev/nbd0,
# the store on the host a network profile's per-request delay away
# (scripts/bench/delay_proxy.py, reached through qemu's user network), in four modes:
#
#   warm   the guest's node has the template READY (`lazyblk warm --wait`) first (its
#          daemon records no trace: the first boot below stays the template's first)
#   first  a fresh node, the template's very first boot anywhere; after it reported, it
#          waits until its node has published the template's boot trace to the store
#   cold   a fresh node again, which replays that trace when the sandbox is attached
#   floor  the same image as the guest's own virtio disk (no lazyblk)
#
# Each is timed from the moment the root device can be opened (lazyblk: `attach` is
# called; floor: the virtio disk appears) to systemd reaching multi-user.target (a unit
# ordered after it prints the guest's clock and powers off), and printed with the bytes
# the node fetched (as they crossed the network) over the bytes the kernel read from
# the device.
#
#   scripts/bench/boot.sh [PROFILE]        # region (default: 20 ms per request) or far (60 ms)
#
# Environment: BENCH_BIN (default target/release/lazyblk), BOOT_WORK (downloads, the
# Debian image; kept between runs: default target/boot-bench), BOOT_RUNS (boots per mode,
# default 1), BOOT_TIMEOUT (seconds per boot, default 600), BENCH_NET_ROWS (a file the
# table rows are appended to, for scripts/bench.sh), BOOT_MODES (the modes to run, default
# "floor warm first cold"; cold needs a first before it, every ratio needs floor). Every
# request to the store is logged in $BOOT_WORK/run/requests.log (scripts/bench/requests.py
# reads it: the profile of a boot's fetches). BOOT_PROFILE=1 runs `perf record -a` in
# the guest from attach to multi-user.target (lazyblk boots) and prints, per boot, the
# guest's CPU by task and the daemon's hottest symbols (perf.data and the guest's
# kallsyms are carried out on a second virtio disk and reported on the host against the
# unstripped binary). Every boot prints how long `attach` and the root's mount took, how
# long `lazyblk --version` takes in the guest (the CLI's own start under emulation), the
# daemon's CPU, and its store link, miss and early-served counters. Needs root.
#
# The store's link is not rate-shaped here (qemu's user network is the guest's link);
# the profile's per-request delay is what a boot feels: its reads are small and serial.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
work=$(realpath -m "${BOOT_WORK:-$repo/target/boot-bench}")
bin=$(realpath "${BENCH_BIN:-$repo/target/release/lazyblk}")
profile=${1:-region}
runs=${BOOT_RUNS:-1}
boot_timeout=${BOOT_TIMEOUT:-600}
boot_profile=${BOOT_PROFILE:-0}
GUEST_SAY=bench/boot
. "$repo/scripts/guest-lib.sh"
. "$repo/scripts/netlab.sh"
netlab_profile "$profile"
[ "$(id -u)" = 0 ] || { say "needs root (debootstrap, mkfs of a root file system)"; exit 1; }
[ -x "$bin" ] || { say "no lazyblk binary at $bin (cargo build --release, or set BENCH_BIN)"; exit 1; }
mkdir -p "$work/pkg"

apt_install debootstrap busybox-static e2fsprogs binutils curl zstd xz-utils
[ "$boot_profile" = 1 ] && apt_install linux-perf
guest_qemu
guest_kernel linux-image-6.12-cloud-amd64

# ---- the Debian image -------------------------------------------------------------
# A minimal Debian 12 with systemd and udev, a unit that marks multi-user.target, and a
# static busybox (for the unit's metrics read: the image has no curl). Made once.
image=$work/debian.img
if [ ! -e "$image" ]; then
  rootfs=$work/rootfs
  rm -rf "$rootfs"
  say "debootstrap of Debian 12 (minbase, systemd, udev) into $rootfs"
  debootstrap --variant=minbase --include=systemd-sysv,udev bookworm "$rootfs" \
    http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; say "debootstrap failed"; exit 1; }
  echo lazyblk-guest >"$rootfs/etc/hostname"
  : >"$rootfs/etc/fstab"
  cp /bin/busybox "$rootfs/usr/local/bin/busybox"
  cat >"$rootfs/usr/local/bin/boot-done" <<'DONE'
#!/bin/sh
# Prints the guest's clock at multi-user.target, what the node fetched and what the
# kernel read from the root device, then powers off at once (the root's server lives
# in the initramfs: a clean shutdown would stop it under the root).
up=$(cut -d' ' -f1 /proc/uptime)
read_sectors=0
[ -e /sys/block/nbd0/stat ] && read_sectors=$(awk '{ print $3 }' /sys/block/nbd0/stat)
[ -e /sys/block/vda/stat ] && read_sectors=$(awk '{ print $3 }' /sys/block/vda/stat)
fetched=$(/usr/local/bin/busybox wget -q -O - http://127.0.0.1:7071/metrics 2>/dev/null |
  awk 'index($1, "lazyblk_fetched_stored_bytes_total") == 1 { v += $2 } END { printf "%.0f", v }')
echo "BOOT-DONE $up read=$((read_sectors * 512)) fetched=${fetched:-0}" >/dev/ttyS0
echo 1 >/proc/sys/kernel/sysrq
echo o >/proc/sysrq-trigger
DONE
  chmod +x "$rootfs/usr/local/bin/boot-done"
  cat >"$rootfs/etc/systemd/system/boot-done.service" <<'UNIT'
[Unit]
Description=Report that multi-user.target was reached (lazyblk B12)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/bin/boot-done

[Install]
WantedBy=multi-user.target
UNIT
  ln -sf /etc/systemd/system/boot-done.service \
    "$rootfs/etc/systemd/system/multi-user.target.wants/boot-done.service"
  rm -f "$rootfs"/var/cache/apt/archives/*.deb
  mkfs.ext4 -q -F -b 4096 -L debian -d "$rootfs" "$image.tmp" 2G
  mv "$image.tmp" "$image"
  rm -rf "$rootfs"
fi
say "Debian image: $(du -h --apparent-size "$image" | cut -f1), $(du -h "$image" | cut -f1) used"

# ---- the store on the host, behind the profile's delay ------------------------------
run=$work/run
rm -rf "$run" && mkdir -p "$run"
store_port=$(( (RANDOM % 20000) + 30000 ))
proxy_port=$((store_port + 1))
modes=${BOOT_MODES:-floor warm first cold}
"$bin" store --root "$run/store" --listen "127.0.0.1:$store_port" 2>"$run/store.log" &
store_pid=$!
DELAY_PROXY_LOG=$run/requests.log /usr/bin/python3 "$repo/scripts/bench/delay_proxy.py" "127.0.0.1:$proxy_port" \
  "127.0.0.1:$store_port" "$NETLAB_DELAY_MS" 2>"$run/proxy.log" &
proxy_pid=$!
trap 'kill $store_pid $proxy_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$proxy_port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
LAZYBLK_LOG=warn "$bin" publish "$image" --template debian --store "http://127.0.0.1:$store_port" \
  >"$run/publish.log" 2>&1 || { cat "$run/publish.log" >&2; say "publish failed"; exit 1; }

# ---- the initramfs ------------------------------------------------------------------
root=$run/initramfs
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,newroot,etc}
cp /bin/busybox "$root/bin/busybox"
strip -o "$root/bin/lazyblk" "$bin"
initramfs_libs "$root/bin/lazyblk"
if [ "$boot_profile" = 1 ]; then
  cp "$(command -v perf)" "$root/bin/perf"
  initramfs_libs "$root/bin/perf"
fi
for m in nbd virtio_net virtio_blk; do initramfs_module "$m"; done
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=1500m tmpfs /tmp
export PATH=/bin:/sbin LAZYBLK_LOG=warn
mode=$(sed -n 's/.*lb_mode=\([a-z]*\).*/\1/p' /proc/cmdline)
store=$(sed -n 's/.*lb_store=\([^ ]*\).*/\1/p' /proc/cmdline)
profile=$(sed -n 's/.*lb_profile=\([01]\).*/\1/p' /proc/cmdline)
fail() { echo "BOOT-FAIL: $*"; tail -n 20 /tmp/daemon.log 2>/dev/null; echo o >/proc/sysrq-trigger; sleep 5; }
echo 1 >/proc/sys/kernel/sysrq
for module in $(cat /lib/modules/order); do insmod "/lib/modules/$module.ko" 2>/dev/null; done
ip link set lo up
echo "LB-CPU $(grep -m1 '^flags' /proc/cpuinfo | grep -ow 'sha_ni\|avx2\|sse4_2\|bmi2' | tr '\n' ' ')"
uptime_now() { cut -d' ' -f1 /proc/uptime; }
if [ "$mode" = floor ]; then
  for i in $(seq 200); do [ -b /dev/vda ] && break; sleep 0.05; done
  echo "LB-T0 $(uptime_now)"
  mount -t ext4 /dev/vda /newroot || fail "mount /dev/vda"
else
  ip link set eth0 up
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
  case "$mode" in
    warm) trace_flags="--trace-window 0" ;;  # publishes no trace: "first" stays first
    first) trace_flags="--trace-quiet 3" ;;  # publishes soon after the boot went quiet
    *) trace_flags="" ;;
  esac
  lazyblk daemon --cache /tmp/cache --store "$store" --listen 127.0.0.1:7071 \
    --nbd unix:/tmp/nbd.sock $trace_flags 2>/tmp/daemon.log &
  for i in $(seq 300); do wget -q -O /dev/null http://127.0.0.1:7071/healthz 2>/dev/null && break; sleep 0.1; done
  if [ "$mode" = warm ]; then
    lazyblk warm debian --wait >/dev/null 2>&1 || fail "warm"
  fi
  lazyblk overlay create debian --sandbox boot >/dev/null 2>&1 || fail "overlay create"
  if [ "$profile" = 1 ]; then
    # Stopped by boot-done (SIGINT), which carries perf.data out on /dev/vda.
    perf record -a -g -e cpu-clock -F 499 -o /tmp/perf.data >/tmp/perf.log 2>&1 &
    sleep 1
  fi
  cli0=$(uptime_now); lazyblk --version >/dev/null; echo "LB-CLI $cli0 $(uptime_now)"
  echo "LB-T0 $(uptime_now)"
  dev=$(lazyblk attach boot --device /dev/nbd0 2>&1) || fail "attach: $dev"
  echo "LB-T1 $(uptime_now)"
  mount -t ext4 /dev/nbd0 /newroot || fail "mount /dev/nbd0"
fi
echo "LB-T2 $(uptime_now)"
# The report unit's script, written into the root at every boot (the image is made once
# and kept; a sandbox's or a snapshot's writes do not reach it).
cp /boot-done /newroot/usr/local/bin/boot-done || fail "installing boot-done"
exec switch_root /newroot /sbin/init
INIT
cat >"$root/boot-done" <<'DONE'
#!/bin/sh
# Prints the guest's clock at multi-user.target, what the node fetched and what the
# kernel read from the root device, then what the node's replay of the template's boot
# trace fetched. A first boot then waits until its node has published the boot trace
# (the cold boots replay it). Then it powers off at once (the root's server lives in the
# initramfs: a clean shutdown would stop it under the root).
up=$(cut -d' ' -f1 /proc/uptime)
read_sectors=0
# The root device: vda for the floor (otherwise, with BOOT_PROFILE, vda is the profile
# disk), nbd0 for every other mode.
root_dev=nbd0
grep -q 'lb_mode=floor' /proc/cmdline && root_dev=vda
[ -e /sys/block/$root_dev/stat ] && read_sectors=$(awk '{ print $3 }' /sys/block/$root_dev/stat)
metrics=$(/usr/local/bin/busybox wget -q -O - http://127.0.0.1:7071/metrics 2>/dev/null)
fetched=$(echo "$metrics" |
  awk 'index($1, "lazyblk_fetched_stored_bytes_total") == 1 { v += $2 } END { printf "%.0f", v }')
echo "BOOT-DONE $up read=$((read_sectors * 512)) fetched=${fetched:-0}" >/dev/ttyS0
# The node's CPU time in the guest (user and system clock ticks of the daemon): under
# TCG its decoding and hashing are emulated too, like the boot they serve.
for stat in /proc/[0-9]*/stat; do
  read -r _ comm rest <"$stat" 2>/dev/null || continue
  [ "$comm" = "(lazyblk)" ] || continue
  set -- $rest
  echo "LB-DAEMON-CPU ticks=$(( ${12} + ${13} )) hz=$(getconf CLK_TCK 2>/dev/null || echo 100) pid=$(basename "$(dirname "$stat")")" >/dev/ttyS0
done
# What the node measured of its store link (whole chunks or blocks, cache/src/link.rs).
echo "$metrics" | grep '^lazyblk_store_\|^lazyblk_reads_served_before_verified\|^lazyblk_cache_misses' | sed 's/^/LB-LINK /' >/dev/ttyS0
replayed=$(echo "$metrics" | awk '$1 == "lazyblk_replay_bytes_total" { printf "%.0f", $2 }')
echo "LB-REPLAY bytes=${replayed:-0}" >/dev/ttyS0
# BOOT_PROFILE: stop perf (in the initramfs' root, which its processes keep after
# switch_root) and write perf.data to the profile disk.
# The daemon's root is the initramfs' too, and outlives perf.
for stat in /proc/[0-9]*/stat; do
  read -r pid comm _ <"$stat" 2>/dev/null || continue
  [ "$comm" = "(lazyblk)" ] && old_root=/proc/$pid/root
done
for stat in /proc/[0-9]*/stat; do
  read -r pid comm _ <"$stat" 2>/dev/null || continue
  [ "$comm" = "(perf)" ] || continue
  kill -INT "$pid"
  while [ -e "/proc/$pid" ]; do sleep 0.2; done
  cat /proc/kallsyms >"$old_root/tmp/kallsyms"
  tar -cf /dev/vda -C "$old_root/tmp" perf.data kallsyms && sync
  echo "LB-PROFILE written" >/dev/ttyS0
done
mode=$(sed -n 's/.*lb_mode=\([a-z]*\).*/\1/p' /proc/cmdline)
store=$(sed -n 's/.*lb_store=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ "$mode" = first ]; then
  trace=missing
  for _ in $(seq 120); do
    if /usr/local/bin/busybox wget -q -O /dev/null "$store/v1/templates/debian/trace" 2>/dev/null; then
      trace=published
      break
    fi
    sleep 1
  done
  echo "LB-TRACE $trace" >/dev/ttyS0
fi
echo 1 >/proc/sys/kernel/sysrq
echo o >/proc/sysrq-trigger
DONE
chmod +x "$root/boot-done"
chmod +x "$root/init"
(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$run/initrd.gz"

# ---- the boots ----------------------------------------------------------------------
boot() { # MODE RUN: prints "seconds read fetched"
  local mode=$1 console=$run/console-$1-$2.log disk=() t0 done_line
  [ "$mode" = floor ] && disk=(-drive "file=$image,if=virtio,format=raw,snapshot=on")
  if [ "$boot_profile" = 1 ] && [ "$mode" != floor ]; then
    rm -rf "$run/perf-$1-$2" && truncate -s 0 "$run/perf-$1-$2.disk" && truncate -s 512M "$run/perf-$1-$2.disk"
    disk=(-drive "file=$run/perf-$1-$2.disk,if=virtio,format=raw")
  fi
  timeout "$boot_timeout" "${qemu[@]}" -accel tcg -smp 2 -m 2048 -nographic -no-reboot \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= "${disk[@]}" \
    -kernel "$vmlinuz" -initrd "$run/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet lb_mode=$mode lb_profile=$boot_profile lb_store=http://10.0.2.2:$proxy_port" \
    </dev/null >"$console" 2>&1 || true
  # The console's lines may start with the firmware's escape sequences.
  t0=$(grep -aoE 'LB-T0 [0-9.]+' "$console" | head -1 | cut -d' ' -f2)
  done_line=$(grep -aoE 'BOOT-DONE [0-9.]+ read=[0-9]+ fetched=[0-9]+' "$console" | head -1)
  if [ -z "$t0" ] || [ -z "$done_line" ]; then
    say "the $mode boot did not finish (console: $console)"
    grep -a 'BOOT-FAIL' -A20 "$console" >&2 || tail -20 "$console" >&2
    return 1
  fi
  echo "$done_line" | awk -v t0="$t0" '{
    split($3, r, "="); split($4, f, "=");
    printf "%.2f %s %s\n", $2 - t0, r[2], f[2] }'
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
declare -A secs=() ratio=()
for mode in $modes; do
  times=() last=
  for r in $(seq "$runs"); do
    if [ "$mode" = first ] && [ "$r" -gt 1 ]; then
      # Every "first" boot is the template's first: publish it again under a new id.
      say "first boots after the first need a new template; running one"
      break
    fi
    say "boot $r of $runs: $mode"
    echo "# boot $mode $r" >>"$run/requests.log"
    last=$(boot "$mode" "$r") || exit 1
    times+=("${last%% *}")
    console=$run/console-$mode-$r.log
    replayed=$(grep -aoE 'LB-REPLAY bytes=[0-9]+' "$console" | head -1 | cut -d= -f2 || true)
    [ "$mode" = cold ] && say "cold boot $r: its replay of the boot trace fetched ${replayed:-0} bytes"
    grep -aoE 'LB-LINK [^ ]+ [0-9.e+-]+' "$console" | sed "s/^LB-LINK /$mode boot $r: the node's store link and reads: /" |
      while read -r line; do say "$line"; done || true
    cpu=$(grep -aoE 'LB-DAEMON-CPU ticks=[0-9]+' "$console" | head -1 | cut -d= -f2 || true)
    t1=$(grep -aoE 'LB-T1 [0-9.]+' "$console" | head -1 | cut -d' ' -f2 || true)
    t2=$(grep -aoE 'LB-T2 [0-9.]+' "$console" | head -1 | cut -d' ' -f2 || true)
    t0=$(grep -aoE 'LB-T0 [0-9.]+' "$console" | head -1 | cut -d' ' -f2 || true)
    [ -z "$t2" ] || say "$mode boot $r: $(awk -v a="$t0" -v b="${t1:-$t0}" -v c="$t2" 'BEGIN { printf "attach %.2f s, mount %.2f s", b - a, c - b }')"
    cli=$(grep -aoE 'LB-CLI [0-9.]+ [0-9.]+' "$console" | head -1 | awk '{ printf "%.2f", $3 - $2 }' || true)
    [ -z "$cli" ] || say "$mode boot $r: \`lazyblk --version\` took $cli s; the guest's CPU has $(grep -aoE 'LB-CPU .*' "$console" | head -1 | cut -c8- | tr -d '\r')"
    if grep -aq 'LB-PROFILE written' "$console"; then
      prof=$run/perf-$mode-$r symfs=$run/symfs
      mkdir -p "$symfs/bin" "$prof" && ln -sf "$bin" "$symfs/bin/lazyblk"
      tar -xf "$prof.disk" -C "$prof" && rm -f "$prof.disk"
      data=$prof/perf.data
      say "$mode boot $r: the guest's CPU by task (perf, $data)"
      perf report -i "$data" --stdio --no-children --sort comm -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8 >&2 || true
      say "$mode boot $r: the daemon's hottest symbols"
      daemon_pid=$(grep -aoE 'LB-DAEMON-CPU .* pid=[0-9]+' "$console" | head -1 | sed 's/.*pid=//' || true)
      perf report -i "$data" --symfs "$symfs" --kallsyms "$prof/kallsyms" --pid "$daemon_pid" --stdio --no-children --sort dso,sym -g none 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -30 >&2 || true
    fi
    [ -z "$cpu" ] || say "$mode boot $r: the node's daemon used $(awk -v t="$cpu" 'BEGIN { printf "%.2f", t / 100 }') s of CPU in the guest"
    if [ "$mode" = first ]; then
      trace=$(curl -sf "http://127.0.0.1:$store_port/v1/templates/debian/trace" || true)
      if [ -n "$trace" ]; then
        say "the first boot's trace: $(echo "$trace" | grep -o '\[[0-9]*,[0-9]*\]' | wc -l) ranges"
      else
        say "the first boot published no trace ($(grep -aoE 'LB-TRACE [a-z]+' "$console" | head -1)); the cold boots will not replay"
      fi
    fi
  done
  secs[$mode]=$(median "${times[@]}")
  read -r _ read_b fetched_b <<<"$last"
  if [ "$mode" = floor ]; then
    ratio[$mode]="-"
  else
    ratio[$mode]=$(awk -v f="$fetched_b" -v r="$read_b" 'BEGIN { printf "%.2f (%.1f MB of %.1f MB)", f / r, f / 1e6, r / 1e6 }')
  fi
  say "$mode: ${secs[$mode]} s; fetched/read ${ratio[$mode]}"
done

rows=()
row() { rows+=("| $1 | $2 | $3 | $4 | $5 | $6 |"); }
x() { awk -v a="$1" -v b="${secs[floor]}" 'BEGIN { printf "%.2f", a / b }'; }
meets() { awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN { ok = (op == "<=") ? (v <= t) : (v >= t); print ok ? "yes" : "NO" }'; }
target_cold=1.3
[ "$profile" = far ] && target_cold=2
if [ -n "${secs[floor]:-}" ]; then
  [ -z "${secs[warm]:-}" ] || row "B12 boot ($profile, TCG), warm: attach to multi-user.target" "${secs[warm]} s; fetched/read ${ratio[warm]}" "floor (virtio disk): ${secs[floor]} s" "$(x "${secs[warm]}")x" "<= 1.05x" "$(meets "$(x "${secs[warm]}")" "<=" 1.05)"
  [ -z "${secs[cold]:-}" ] || row "B12 boot ($profile, TCG), cold (a second fresh node)" "${secs[cold]} s; fetched/read ${ratio[cold]}" "floor ${secs[floor]} s" "$(x "${secs[cold]}")x" "<= ${target_cold}x" "$(meets "$(x "${secs[cold]}")" "<=" "$target_cold")"
  [ -z "${secs[first]:-}" ] || row "B12 boot ($profile, TCG), first boot of the template" "${secs[first]} s; fetched/read ${ratio[first]}" "floor ${secs[floor]} s" "$(x "${secs[first]}")x" "<= 1.8x" "$(meets "$(x "${secs[first]}")" "<=" 1.8)"
fi
if [ -n "${BENCH_NET_ROWS:-}" ]; then printf '%s\n' "${rows[@]}" >>"$BENCH_NET_ROWS"; fi
echo "| figure | lazyblk | peer(s) | ratio | target | met? |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"

# The ublk part of scripts/kernel-test.sh's guest (KERNEL_TEST_KIND=ublk or both):
# sourced by the guest's init once the store and a daemon run, with its helpers
# (log, progress, fail, must, must_refuse, start_daemon) defined. The same checks as
# for /dev/nbdX through `lazyblk attach --kind ublk`: a template read-only and a sandbox
# read-write, mounted and verified; an acknowledged write and rounds of I/O across
# kill -9 and restart (user recovery); launch waves; a churn of add/remove cycles.
# Leaves the daemon running with no device attached.

# Fails the test when the kernel logged an I/O error or a file system error.
# $2: lines to leave out (the churn's readers racing a detach may see I/O errors).
ublk_check_kernel_log() {
  errors=$(dmesg | grep -iE 'I/O error|EXT4-fs error|EXT4-fs warning|Aborting journal|blk_update_request|hung_task|blocked for more than' \
    | grep -vE "${2:-^$}" || true)
  [ -z "$errors" ] || fail "ublk: $1: the kernel logged errors: $errors"
}
# Starts the daemon and waits (longer than start_daemon: recovering a device waits
# until the kernel has seen the old daemon die) for its API.
ublk_start_daemon() {
  # shellcheck disable=SC2046,SC2086
  LAZYBLK_LOG=warn,lazyblk::daemon::attach=debug,lazyblk_ublk=debug,lazyblk::daemon::mount_namespace=info \
    ${ublk_daemon_prefix:-} lazyblk daemon --cache /tmp/cache --store http://127.0.0.1:7070 --listen 127.0.0.1:7071 \
    --nbd unix:/tmp/nbd.sock $(cat /etc/daemon-flags) "$@" 2>>/tmp/daemon.log &
  daemon=$!
  echo $daemon >/tmp/daemon.pid
  for try in $(seq 600); do timeout 5 wget -q -O /dev/null $node/healthz 2>/dev/null && return; sleep 0.2; done
  fail "ublk: the daemon did not start (recovering its devices?)"
}
# Waits until the daemon lists $1 connected.
ublk_wait_served() {
  for try in $(seq 300); do
    wget -q -O - $node/v1/attachments 2>/dev/null | tr '}' '\n' | grep "\"device\":\"$1\"" \
      | grep -q '"connected":true' && return 0
    sleep 0.2
  done
  fail "ublk: the restarted daemon does not serve $1: $(wget -q -O - $node/v1/attachments)"
}
ublk_drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# Every lazyblk command of the churn under a bound, so a wedged control command fails
# the test instead of hanging it.
ublk_bound=150

[ -e /dev/ublk-control ] || fail "ublk: no /dev/ublk-control after insmod ublk_drv"
# The packaged unit's LimitNOFILE=1048576: a ublk device holds an eventfd per queue
# slot (132 descriptors per device on 2 CPUs), so the default 4096 would stop a wave
# of 32 devices at about 30.
ulimit -Hn 1048576 && ulimit -n 1048576 || fail "ublk: raising the descriptor limit"
kill -TERM $daemon; wait $daemon
ublk_start_daemon
mkdir -p /mnt/uro /mnt/urw

# ---- a template, read-only ------------------------------------------------------------
must lazyblk attach base --kind ublk
uro=$out
case $uro in /dev/ublkb[0-9]*) ;; *) fail "ublk: attach base --kind ublk printed '$uro'" ;; esac
uro_name=${uro#/dev/}
[ "$(cat /sys/block/$uro_name/ro)" = 1 ] || fail "ublk: $uro is not read-only"
log "ublk: attached base at $uro ($(cat /sys/block/$uro_name/size) sectors, ro=1, $(ls /sys/block/$uro_name/mq | wc -l) queues)"
must mount -t ext4 -o ro "$uro" /mnt/uro
sum=$(sha256sum /mnt/uro/data/blob | cut -d' ' -f1)
[ "$sum" = "$(cat /expected/blob.sha256)" ] || fail "ublk: sha256 of data/blob over $uro is $sum"
[ "$(cat /mnt/uro/etc/hostname)" = guest-template ] || fail "ublk: etc/hostname over $uro"
must lazyblk status base
case $out in *"kernel $uro"*) ;; *) fail "ublk: status base does not name kernel $uro: $out" ;; esac
must_refuse "kernel $uro" lazyblk evict base
must_refuse "not a ublk device" lazyblk attach base --kind ublk --device /dev/nbd0
must_refuse '"nosuch"' lazyblk attach nosuch --kind ublk
must lazyblk status --devices
case $out in *"$uro"*) ;; *) fail "ublk: status --devices does not list $uro: $out" ;; esac
metrics=$(wget -q -O - $node/metrics)
echo "$metrics" | grep -q 'ublk_read' || fail "ublk: /metrics counts no ublk reads"
log "ublk: data/blob sha256 matches over $uro; status, --devices and /metrics count it"

# ---- a sandbox, read-write ------------------------------------------------------------
must lazyblk overlay create base --sandbox usb1
must lazyblk attach usb1 --kind ublk
urw=$out
urw_name=${urw#/dev/}
[ "$(cat /sys/block/$urw_name/ro)" = 0 ] || fail "ublk: $urw is read-only"
grep -q "write back" /sys/block/$urw_name/queue/write_cache || fail "ublk: $urw has no volatile cache (flush not mapped): $(cat /sys/block/$urw_name/queue/write_cache)"
[ "$(cat /sys/block/$urw_name/queue/fua)" = 1 ] || fail "ublk: $urw does not take FUA"
[ "$(cat /sys/block/$urw_name/queue/discard_max_bytes)" != 0 ] || fail "ublk: $urw does not take discard"
must mount -t ext4 "$urw" /mnt/urw
echo "written in the guest over ublk" >/mnt/urw/new.txt || fail "ublk: writing new.txt"
cp /mnt/urw/data/blob /mnt/urw/blob-copy || fail "ublk: copying blob"
rm /mnt/urw/etc/hostname || fail "ublk: removing etc/hostname"
sync
must fstrim /mnt/urw
must_refuse "in use" lazyblk detach "$urw"
must_refuse "kernel $urw" lazyblk overlay delete usb1
must umount /mnt/urw
must lazyblk detach "$urw"
[ ! -e /sys/block/$urw_name ] || fail "ublk: $urw still exists after detach"
must lazyblk attach usb1 --kind ublk
urw=$out
must e2fsck -fn "$urw"
must mount -t ext4 "$urw" /mnt/urw
[ "$(cat /mnt/urw/new.txt)" = "written in the guest over ublk" ] || fail "ublk: new.txt after re-attach"
[ ! -e /mnt/urw/etc/hostname ] || fail "ublk: etc/hostname is back after re-attach"
sum=$(sha256sum /mnt/urw/blob-copy | cut -d' ' -f1)
[ "$sum" = "$(cat /expected/blob.sha256)" ] || fail "ublk: sha256 of blob-copy is $sum"
log "ublk: sandbox $urw written (flush, FUA, discard mapped), detached, re-attached: e2fsck clean, files as written"

# ---- an acknowledged write survives kill -9 (user recovery) --------------------------
must lazyblk overlay create base --sandbox uraw
must lazyblk attach uraw --kind ublk
uraw=$out
head -c 65536 /dev/urandom >/tmp/upattern
dd if=/tmp/upattern of="$uraw" bs=65536 seek=100 count=1 oflag=direct 2>/dev/null || fail "ublk: direct write to $uraw"
kill -KILL $daemon; wait $daemon
[ -e "/sys/block/${uraw#/dev/}" ] || fail "ublk: $uraw vanished when the daemon was killed"
ublk_start_daemon
ublk_wait_served "$uraw"
ublk_wait_served "$urw"
ublk_wait_served "$uro"
dd if="$uraw" of=/tmp/ureadback bs=65536 skip=100 count=1 iflag=direct 2>/dev/null || fail "ublk: direct read from $uraw"
[ "$(sha256sum </tmp/ureadback)" = "$(sha256sum </tmp/upattern)" ] || fail "ublk: an acknowledged write to $uraw was lost across kill -9"
must lazyblk detach "$uraw"
must lazyblk overlay delete uraw
log "ublk: a write acknowledged before kill -9 reads back after the restart recovered $uraw"

# ---- rounds of kill -9 under I/O ------------------------------------------------------
head -c $((1 << 20)) /dev/urandom >/tmp/usrc
usrc_sum=$(sha256sum </tmp/usrc)
blob_sum=$(cat /expected/blob.sha256)
rounds=$(cat /etc/rounds)
round=1
ublk_wait_file() {
  for try in $(seq 900); do [ -e "$1" ] && return 0; sleep 0.1; done
  fail "ublk: round $round: $1 was never written: $(cat /tmp/uwriter.fail 2>/dev/null)"
}
# Waits until the round's writer has written $1 files (it keeps only the last 16).
ublk_wait_written() {
  for try in $(seq 900); do [ "$(cat /tmp/uprogress 2>/dev/null || echo 0)" -ge "$1" ] 2>/dev/null && return 0; sleep 0.1; done
  for pid in $(pidof dd fio sync sha256sum 2>/dev/null); do
    echo "--- $(cat /proc/$pid/comm 2>/dev/null) $pid: $(tr '\n' ' ' </proc/$pid/stack 2>/dev/null | cut -c1-400)"
  done
  fail "ublk: round $round: the writer never finished file $1 ($(cat /tmp/uprogress 2>/dev/null) done): $(cat /tmp/uwriter.fail 2>/dev/null) $(ls /mnt/urw | tr '\n' ' ') load $(cat /proc/loadavg)"
}
while [ "$round" -le "$rounds" ]; do
  rm -f /tmp/uwriter.fail /tmp/uwriter.err /tmp/uprogress /tmp/ureader.fail /tmp/ustop /tmp/uwritten
  (
    i=1
    while [ ! -e /tmp/ustop ]; do
      dd if=/tmp/usrc of=/mnt/urw/r$round-$i bs=65536 conv=fsync 2>>/tmp/uwriter.err || echo "r$round-$i: $(tail -n 1 /tmp/uwriter.err)" >>/tmp/uwriter.fail
      # The 64 MiB file system holds 16 of these at a time (a release build writes
      # dozens in a round): the oldest goes.
      [ "$i" -le 16 ] || rm -f /mnt/urw/r$round-$((i - 16))
      echo "$i" >/tmp/uprogress
      i=$((i + 1))
    done
    echo $((i - 1)) >/tmp/uwritten
  ) &
  writer=$!
  (
    while [ ! -e /tmp/ustop ]; do
      ublk_drop_caches
      sum=$(sha256sum /mnt/uro/data/blob | cut -d' ' -f1)
      [ "$sum" = "$blob_sum" ] || echo "$sum" >>/tmp/ureader.fail
    done
  ) &
  reader=$!
  fio_pid=
  if [ "$(cat /etc/fio-verify)" = 1 ]; then
    fio --name=uverify-r$round --filename=/mnt/urw/fio-r$round --size=16M --rw=randrw \
      --rwmixread=50 --bs=4k --ioengine=psync --fsync=8 --verify=crc32c --verify_fatal=1 \
      --do_verify=1 --randrepeat=0 --output=/tmp/ufio-r$round.log >/dev/null 2>&1 &
    fio_pid=$!
    ublk_wait_file /mnt/urw/fio-r$round
  fi
  ublk_wait_written 2
  killed_at=$(cat /tmp/uprogress)
  kill -KILL $daemon; wait $daemon
  ublk_start_daemon
  ublk_wait_written $((killed_at + 2))
  touch /tmp/ustop
  wait $writer; wait $reader
  if [ -n "$fio_pid" ]; then
    wait $fio_pid || fail "ublk: round $round: fio (verify crc32c across the kill) failed: $(tail -n 15 /tmp/ufio-r$round.log)"
    grep -q "err= 0" /tmp/ufio-r$round.log || fail "ublk: round $round: fio reported errors: $(tail -n 15 /tmp/ufio-r$round.log)"
    rm -f /mnt/urw/fio-r$round
    log "ublk: round $round: fio's mixed read/write job verified (crc32c) across the kill"
  fi
  [ ! -e /tmp/uwriter.fail ] || fail "ublk: round $round: writes failed: $(cat /tmp/uwriter.fail)"
  [ ! -e /tmp/ureader.fail ] || fail "ublk: round $round: template reads failed: $(cat /tmp/ureader.fail)"
  ublk_drop_caches
  written=$(cat /tmp/uwritten)
  i=1
  [ "$written" -le 16 ] || i=$((written - 15))
  while [ "$i" -le "$written" ]; do
    [ "$(sha256sum </mnt/urw/r$round-$i)" = "$usrc_sum" ] || fail "ublk: round $round: r$round-$i reads back wrong"
    i=$((i + 1))
  done
  rm -f /mnt/urw/r$round-*
  ublk_check_kernel_log "round $round"
  log "ublk: round $round: kill -9 and restart under I/O ($killed_at files written before the kill); $written files (the last 16 kept and checked) and the template's reads intact"
  round=$((round + 1))
done
must umount /mnt/urw
must e2fsck -fn "$urw"
must lazyblk detach "$urw"
must umount /mnt/uro
must lazyblk detach "$uro"
must lazyblk overlay delete usb1

# ---- launch waves: devices attached at once, each mounted and checked ---------------
devices=$(cat /etc/devices)
wave=1
while [ "$wave" -le "$rounds" ]; do
  rm -rf /tmp/uwave && mkdir -p /tmp/uwave
  # The jobs' pids: a bare `wait` would also wait for the guest's watchdog.
  pids=""
  i=1
  while [ "$i" -le "$devices" ]; do
    if [ $((i % 2)) = 0 ]; then
      must lazyblk overlay create base --sandbox uw$i
      export_name=uw$i
    else
      export_name=base
    fi
    ( timeout $ublk_bound lazyblk attach $export_name --kind ublk >/tmp/uwave/$i.dev 2>/tmp/uwave/$i.err || echo fail >/tmp/uwave/$i.fail ) &
    pids="$pids $!"
    i=$((i + 1))
  done
  # shellcheck disable=SC2086
  wait $pids
  i=1
  while [ "$i" -le "$devices" ]; do
    [ ! -e /tmp/uwave/$i.fail ] || fail "ublk: wave $wave: attach $i: $(cat /tmp/uwave/$i.err)"
    dev=$(cat /tmp/uwave/$i.dev)
    mkdir -p /mnt/uw$i
    if [ $((i % 2)) = 0 ]; then
      must mount -t ext4 "$dev" /mnt/uw$i
      echo "device $i" >/mnt/uw$i/mine || fail "ublk: wave $wave: writing on $dev"
    else
      must mount -t ext4 -o ro "$dev" /mnt/uw$i
    fi
    sum=$(sha256sum /mnt/uw$i/data/blob | cut -d' ' -f1)
    [ "$sum" = "$blob_sum" ] || fail "ublk: wave $wave: sha256 of data/blob over $dev is $sum"
    i=$((i + 1))
  done
  pids=""
  i=1
  while [ "$i" -le "$devices" ]; do
    must umount /mnt/uw$i
    ( timeout $ublk_bound lazyblk detach "$(cat /tmp/uwave/$i.dev)" >/dev/null 2>/tmp/uwave/$i.err || echo fail >/tmp/uwave/$i.fail ) &
    pids="$pids $!"
    i=$((i + 1))
  done
  # shellcheck disable=SC2086
  wait $pids
  i=1
  while [ "$i" -le "$devices" ]; do
    [ ! -e /tmp/uwave/$i.fail ] || fail "ublk: wave $wave: detach $i: $(cat /tmp/uwave/$i.err)"
    [ $((i % 2)) = 1 ] || must lazyblk overlay delete uw$i
    i=$((i + 1))
  done
  left=$(ls /sys/class/ublk-char 2>/dev/null | wc -l)
  [ "$left" = 0 ] || fail "ublk: wave $wave: $left ublk devices left after detaching all: $(ls /sys/class/ublk-char)"
  attached=$(wget -q -O - $node/v1/attachments)
  [ "$attached" = "[]" ] || fail "ublk: wave $wave: attachments left: $attached"
  ublk_check_kernel_log "wave $wave"
  log "ublk: wave $wave: $devices devices attached at once, mounted, checked and detached"
  wave=$((wave + 1))
done

# ---- the daemon's mount namespace, apart from mounts of its devices ---------------------
# A namespace like a container's, shared by the daemon and a process that mounts one of
# its devices; the other process ends, then the daemon is killed. A daemon left in that
# namespace would be its last holder: its exit unmounts the file system, whose writes go
# to the device it no longer serves, and it never finishes exiting (the device then
# cannot be recovered). The daemon moves into a private namespace at start instead.
# KERNEL_TEST_DAEMON_FLAGS="--ublk-mount-namespace shared" shows the hang.
unshare -m --propagation shared sh -c 'echo $$ >/tmp/nsx.pid; exec sleep 100000' &
holder=$!
for try in $(seq 50); do [ -s /tmp/nsx.pid ] && break; sleep 0.1; done
[ -s /tmp/nsx.pid ] || fail "ublk: namespace: unshare made no holder"
kill -TERM $daemon; wait $daemon
ublk_daemon_prefix="nsenter -t $holder -m --"
ublk_start_daemon
ublk_daemon_prefix=
daemon_ns=$(readlink /proc/$daemon/ns/mnt)
holder_ns=$(readlink /proc/$holder/ns/mnt)
log "ublk: namespace: daemon in $daemon_ns, started in $holder_ns"
must lazyblk overlay create base --sandbox uns
must lazyblk attach uns --kind ublk
uns=$out
nsenter -t $holder -m -- sh -c "mkdir -p /mnt/uns && mount -t ext4 $uns /mnt/uns && echo 'mounted beside the daemon' >/mnt/uns/ns.txt && sync" \
  || fail "ublk: namespace: mounting $uns in the daemon's first namespace"
grep -q "/mnt/uns " /proc/$daemon/mountinfo && fail "ublk: namespace: the daemon's namespace holds the mount of $uns: $(cat /proc/$daemon/mountinfo)"
# Killed while the other process lives, restarted in that namespace: the new daemon
# inherits a copy of the mount, and drops it once it serves the device again.
kill -KILL $daemon; wait $daemon
ublk_daemon_prefix="nsenter -t $holder -m --"
ublk_start_daemon
ublk_daemon_prefix=
ublk_wait_served "$uns"
for try in $(seq 100); do grep -q "/mnt/uns " /proc/$daemon/mountinfo || break; sleep 0.1; done
grep -q "/mnt/uns " /proc/$daemon/mountinfo && fail "ublk: namespace: the restarted daemon kept its copy of the mount of $uns"
grep -q "detached this daemon's copy" /tmp/daemon.log || fail "ublk: namespace: the restarted daemon did not say it detached its copy of the mount"
nsenter -t $holder -m -- sh -c "echo 'after the restart' >/mnt/uns/ns2.txt && sync" || fail "ublk: namespace: writing on $uns after the restart"
kill -KILL $holder; wait $holder 2>/dev/null
kill -KILL $daemon
exited=
for try in $(seq 300); do
  # Every thread gone (a zombie leader can wait for a thread stuck in the exit).
  state=$(cat /proc/$daemon/task/*/stat 2>/dev/null | cut -d' ' -f3 | tr -d '\n')
  case $state in '' | Z) exited=1; break ;; esac
  sleep 0.1
done
[ -n "$exited" ] || fail "ublk: namespace: the killed daemon never finished exiting (its threads in states $state): it was the last holder of a namespace where $uns was mounted"
wait $daemon
ublk_start_daemon
ublk_wait_served "$uns"
must e2fsck -fn "$uns"
must mount -t ext4 "$uns" /mnt/urw
[ "$(cat /mnt/urw/ns.txt)" = "mounted beside the daemon" ] || fail "ublk: namespace: ns.txt over $uns after the restart"
[ "$(cat /mnt/urw/ns2.txt)" = "after the restart" ] || fail "ublk: namespace: ns2.txt over $uns after the restart"
must umount /mnt/urw
must lazyblk detach "$uns"
must lazyblk overlay delete uns
ublk_check_kernel_log "namespace"
log "ublk: namespace: a daemon started where its device was then mounted ran apart from it, a restart there dropped its inherited copy of the mount, the daemon exited when killed as the last one there, and its restart recovered $uns intact"

# ---- churn: add/remove cycles, 8 at a time ---------------------------------------------
cycles=$(cat /etc/churn)
parallel=8
done_cycles=0
while [ "$done_cycles" -lt "$cycles" ]; do
  rm -rf /tmp/uchurn && mkdir -p /tmp/uchurn
  batch=$parallel
  [ $((cycles - done_cycles)) -ge $batch ] || batch=$((cycles - done_cycles))
  pids=""
  i=1
  while [ "$i" -le "$batch" ]; do
    (
      dev=$(timeout $ublk_bound lazyblk attach base --kind ublk 2>/tmp/uchurn/$i.err) || { echo "attach" >/tmp/uchurn/$i.fail; exit; }
      head -c 4096 "$dev" >/dev/null 2>>/tmp/uchurn/$i.err || { echo "read $dev" >/tmp/uchurn/$i.fail; exit; }
      # What udev does with a new device (open it, read its first blocks) racing the
      # stop: the reader may see errors once the device goes, but must end.
      ( dd if="$dev" of=/dev/null bs=4096 count=256 iflag=direct 2>/dev/null; touch /tmp/uchurn/$i.probed ) &
      prober=$!
      timeout $ublk_bound lazyblk detach "$dev" >/dev/null 2>>/tmp/uchurn/$i.err || echo "detach $dev" >/tmp/uchurn/$i.fail
      for try in $(seq 300); do [ -e /tmp/uchurn/$i.probed ] && break; sleep 0.1; done
      [ -e /tmp/uchurn/$i.probed ] || echo "a reader of $dev never ended after its detach" >>/tmp/uchurn/$i.fail
      wait $prober 2>/dev/null
    ) &
    pids="$pids $!"
    i=$((i + 1))
  done
  # shellcheck disable=SC2086
  wait $pids
  i=1
  while [ "$i" -le "$batch" ]; do
    [ ! -e /tmp/uchurn/$i.fail ] || fail "ublk: churn after $done_cycles cycles: $(cat /tmp/uchurn/$i.fail): $(cat /tmp/uchurn/$i.err)"
    i=$((i + 1))
  done
  done_cycles=$((done_cycles + batch))
  progress "ublk: churn: $done_cycles of $cycles add/remove cycles"
done
left=$(ls /sys/class/ublk-char 2>/dev/null | wc -l)
[ "$left" = 0 ] || fail "ublk: churn: $left ublk devices left: $(ls /sys/class/ublk-char)"
attached=$(wget -q -O - $node/v1/attachments)
[ "$attached" = "[]" ] || fail "ublk: churn: attachments left: $attached"
ublk_check_kernel_log "churn" "I/O error,? (on )?dev ublkb[0-9]+"
log "ublk: churn: $cycles add/remove cycles, $parallel at a time, each with a reader racing its detach; no control command wedged, no reader hung, no device left"

# ---- B11's ublk rows (KERNEL_TEST_BENCH=1): fio through /dev/ublkbN beside /dev/nbdX
# (1 connection, the default, and 2) and a file on the guest's own disk (the floor) ----
if [ "$(cat /etc/bench)" = 1 ]; then
  runtime=$(cat /etc/bench-runtime)
  # fio's terse output: field 7 is the read bandwidth (KiB/s), 8 the read IOPS, 40 the
  # mean total latency (microseconds).
  ufio_run() { # file, rw, bs, iodepth
    fio --name=b11u --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=libaio \
      --direct=1 --size=$((40 << 20)) --runtime="$runtime" --time_based --minimal 2>/tmp/ufio.err \
      || fail "ublk: fio $2 qd$4 on $1: $(cat /tmp/ufio.err)"
  }
  measure() { # device or file: "qd1-latency-us qd32-iops seq-MiB/s"
    lat=$(ufio_run "$1" randread 4k 1 | cut -d';' -f40 | awk '{printf "%.0f", $1}')
    iops=$(ufio_run "$1" randread 4k 32 | cut -d';' -f8)
    mibs=$(ufio_run "$1" read 1M 8 | cut -d';' -f7 | awk '{printf "%.1f", $1 / 1024}')
    echo "$lat $iops $mibs"
  }
  # Attach latency of ublk devices: by the clock of the CLI's caller.
  attaches=20
  rm -f /tmp/uattach-us
  i=1
  while [ "$i" -le "$attaches" ]; do
    t0=$(gdate +%s%N)
    must lazyblk attach bench --kind ublk
    t1=$(gdate +%s%N)
    echo $(((t1 - t0) / 1000)) >>/tmp/uattach-us
    must lazyblk detach "$out"
    i=$((i + 1))
  done
  sort -n /tmp/uattach-us >/tmp/uattach-sorted
  p50=$(sed -n "$((attaches * 50 / 100))p" /tmp/uattach-sorted)
  p95=$(sed -n "$((attaches * 95 / 100))p" /tmp/uattach-sorted)
  mkdir -p /mnt/disk
  must mount -t ext4 /dev/vda /mnt/disk
  dd if=/dev/urandom of=/mnt/disk/file bs=1M count=40 conv=fsync 2>/dev/null || fail "ublk: writing the disk's fio file"
  set -- $(measure /mnt/disk/file); floor_lat=$1 floor_iops=$2 floor_mibs=$3
  must lazyblk warm bench --wait
  must lazyblk attach bench --kind ublk
  dev=$out
  set -- $(measure "$dev"); ublk_lat=$1 ublk_iops=$2 ublk_mibs=$3
  must lazyblk detach "$dev"
  result="B11-ublk (fio ${runtime}s per run) ublk attach p50 $((p50 / 1000)).$(((p50 % 1000) / 100)) ms p95 $((p95 / 1000)).$(((p95 % 1000) / 100)) ms ($attaches attaches);"
  result="$result disk: qd1 ${floor_lat} us, qd32 ${floor_iops} IOPS, seq1M ${floor_mibs} MiB/s;"
  result="$result ublk: qd1 ${ublk_lat} us, qd32 ${ublk_iops} IOPS, seq1M ${ublk_mibs} MiB/s;"
  best_nbd_iops=0
  for connections in 1 2; do
    must lazyblk attach bench --connections $connections
    dev=$out
    set -- $(measure "$dev"); nbd_lat=$1 nbd_iops=$2 nbd_mibs=$3
    must lazyblk detach "$dev"
    [ "$nbd_iops" -le "$best_nbd_iops" ] || best_nbd_iops=$nbd_iops
    result="$result nbd ${connections}conn: qd1 ${nbd_lat} us, qd32 ${nbd_iops} IOPS, seq1M ${nbd_mibs} MiB/s;"
    [ "$connections" = 1 ] && nbd1_lat=$nbd_lat nbd1_mibs=$nbd_mibs
  done
  if [ "$(cat /etc/profile 2>/dev/null)" = 1 ]; then
    # Where the guest's CPUs go during a qd 32 run: by task, then the top symbols.
    profile_qd32() { # label, device
      perf record -a -g -e cpu-clock -F 499 -o /tmp/perf-$1.data -- \
        fio --name=b11p --filename="$2" --rw=randread --bs=4k --iodepth=32 --ioengine=libaio \
        --direct=1 --size=$((40 << 20)) --runtime="$runtime" --time_based --minimal >/tmp/perf-$1.fio 2>&1 \
        || fail "ublk: perf record over $1: $(tail -n 5 /tmp/perf-$1.fio)"
      echo "B11-profile $1: $(cut -d';' -f8 /tmp/perf-$1.fio | head -1) IOPS under perf"
      perf report -i /tmp/perf-$1.data --stdio --no-children --sort comm -g none 2>/dev/null \
        | grep -v '^#' | grep '%' | head -n 12 | sed "s/^/B11-profile $1 comm: /"
      perf report -i /tmp/perf-$1.data --stdio --no-children --sort dso,sym -g none 2>/dev/null \
        | grep -v '^#' | grep '%' | head -n 30 | sed "s/^/B11-profile $1 sym: /"
    }
    must lazyblk attach bench --kind ublk
    dev=$out
    profile_qd32 ublk "$dev"
    must lazyblk detach "$dev"
    must lazyblk attach bench --connections 2
    dev=$out
    profile_qd32 nbd2 "$dev"
    must lazyblk detach "$dev"
    profile_qd32 disk /mnt/disk/file
  fi
  ratios=$(echo "$ublk_lat $nbd1_lat $ublk_iops $best_nbd_iops $floor_iops $ublk_mibs $nbd1_mibs" | awk '{printf "ublk/nbd qd1 latency %.2fx (target <= 0.6), qd32 IOPS %.2fx best nbd (target >= 1.3) and %.2fx disk (target >= 0.7), seq %.2fx nbd (target >= 1.2)", $1 / $2, $3 / $4, $3 / $5, $6 / $7}')
  must umount /mnt/disk
  echo "$result $ratios"
  log "ublk: B11 measured"
fi

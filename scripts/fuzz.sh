#!/usr/bin/env bash
# Fuzzes the parsers that face the network: the NBD handshake (nbd_handshake), NBD
# transmission requests after a valid handshake (nbd_requests) and manifests
# (manifest_parse). Runs each target for SECONDS (default 60) and exits non-zero if any
# of them crashed; a crashing input is left in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#   FUZZ_RUNS=10000000 FUZZ_SANITIZER=none scripts/fuzz.sh    # 10^7 executions per target
#
# FUZZ_RUNS runs each target for that many executions instead of SECONDS.
# FUZZ_SANITIZER (address by default) is passed to cargo fuzz: `none` runs 3 to 6 times
# faster (no AddressSanitizer; Rust's own checks and the harness's assertions stay), which
# is what makes 10^7 executions of every target fit in 15 minutes on two cores.
# FUZZ_JOBS targets run at once (default: the number of cores).
# The executions of each target are printed at the end.
#
# Not part of scripts/test.sh (too slow); every crash it ever found is kept as an
# ordinary regression test in the crate that owns the parser.
#
# Toolchain: cargo-fuzz passes -Zsanitizer=address, which only a nightly compiler
# accepts. The stable toolchain with RUSTC_BOOTSTRAP=1 builds and runs the targets
# (checked with Rust 1.95), and stable is on every machine of this project, so that is
# the default; FUZZ_TOOLCHAIN=nightly uses an installed nightly instead.
#
# The working corpus grows in fuzz/corpus/<target>/ (not committed); it starts from the
# committed seeds in fuzz/seeds/<target>/, with the dictionaries in fuzz/dicts/.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${1:-60}"
shift || true
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
  TARGETS=(nbd_requests nbd_handshake manifest_parse manifest_put overlay_map)
fi

# libFuzzer limits. An input that takes over 10 s is a hang: every input is served from
# memory in well under a second. 2 GiB of RSS is far above what one connection may make
# the server hold (64 MiB of payload in flight), so passing it is a leak.
TIMEOUT_SECONDS=10
RSS_LIMIT_MB=2048

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

TOOLCHAIN="${FUZZ_TOOLCHAIN:-stable}"
if [ "$TOOLCHAIN" = stable ]; then
  export RUSTC_BOOTSTRAP=1
fi

# The longest input each target tries: room for a few options or a few dozen requests
# with write payloads, and for a manifest of a few hundred chunks.
max_len() {
  case "$1" in
    nbd_handshake) echo 8192 ;;
    nbd_requests) echo 8192 ;;
    manifest_parse) echo 16384 ;;
    manifest_put) echo 32768 ;;
    overlay_map) echo 65536 ;;
    *) echo 4096 ;;
  esac
}

dict() {
  case "$1" in
    nbd_*) echo dicts/nbd.dict ;;
    manifest_*) echo dicts/manifest.dict ;;
    *) echo "" ;;
  esac
}

SANITIZER="${FUZZ_SANITIZER:-address}"
# Targets run side by side, FUZZ_JOBS at a time (default: one per core), the slowest
# first, so that the fast ones share the other cores while it runs.
JOBS="${FUZZ_JOBS:-$(nproc)}"
# glibc gives freed memory back to the kernel when the top of the heap passes 128 KiB,
# so every connection's fresh buffers came back as page faults: half the time of
# nbd_requests went to faulting and zeroing pages. Keeping the heap makes it twice as
# fast; it changes nothing the targets check (the RSS limit still catches a leak).
export GLIBC_TUNABLES="glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=67108864"

echo "== building the fuzz targets (toolchain $TOOLCHAIN, sanitizer $SANITIZER)"
(cd fuzz && cargo "+$TOOLCHAIN" fuzz build -O --debug-assertions -s "$SANITIZER")
started=$(date +%s)

# Fuzzes one target; its libFuzzer output goes to fuzz/corpus/<target>.log.
fuzz_one() {
  local target="$1"
  local corpus="fuzz/corpus/$target"
  mkdir -p "$corpus" "fuzz/seeds/$target"
  local limit
  if [ -n "${FUZZ_RUNS:-}" ]; then
    limit=(-runs="$FUZZ_RUNS")
    echo "== fuzzing $target for $FUZZ_RUNS executions"
  else
    limit=(-max_total_time="$SECONDS_PER_TARGET")
    echo "== fuzzing $target for ${SECONDS_PER_TARGET}s"
  fi
  local d dict_arg=()
  d=$(dict "$target")
  [ -n "$d" ] && dict_arg=(-dict="$d")
  # cargo fuzz runs from fuzz/; paths handed to libFuzzer are relative to it.
  (cd fuzz && cargo "+$TOOLCHAIN" fuzz run -O --debug-assertions -s "$SANITIZER" "$target" \
      "corpus/$target" "seeds/$target" -- \
      "${limit[@]}" \
      -timeout="$TIMEOUT_SECONDS" \
      -rss_limit_mb="$RSS_LIMIT_MB" \
      -max_len="$(max_len "$target")" \
      "${dict_arg[@]}" \
      -print_final_stats=1) >"fuzz/corpus/$target.log" 2>&1
}

declare -A pids=()
for target in "${TARGETS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do
    wait -n || true
  done
  fuzz_one "$target" &
  pids[$target]=$!
done

counts=()
failed=()
for target in "${TARGETS[@]}"; do
  log="fuzz/corpus/$target.log"
  if wait "${pids[$target]}"; then
    runs=$(awk '/stat::number_of_executed_units/ { print $2 }' "$log")
    rate=$(awk '/stat::average_exec_per_sec/ { print $2 }' "$log")
    echo "== $target: no crash; $runs executions ($rate a second)"
    counts+=("$target $runs")
  else
    tail -30 "$log" >&2
    echo "== $target: CRASHED; the input is in fuzz/artifacts/$target/" >&2
    failed+=("$target")
  fi
done
echo "== executions per target ($(($(date +%s) - started)) s in all, $JOBS at a time):"
printf '   %s\n' "${counts[@]}"

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzzing found crashes in: ${failed[*]}" >&2
  echo "reproduce one with: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET artifacts/TARGET/crash-...)" >&2
  exit 1
fi
echo "fuzzing: ${#TARGETS[@]} targets, no crash"

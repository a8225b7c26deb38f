#!/usr/bin/env bash
# Runs every test of lazyblk: unit tests, and integration tests that start the real
# binaries against real clients (nbdinfo, nbdcopy, qemu-img, qemu-io, fio, mount).
# Installs the Debian packages it needs first. Needs root for loop devices and FUSE.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --all-targets
# A real S3-compatible server (Garage) for the store's object backend. Building it takes
# 8 to 15 minutes on two cores, once per machine; if it cannot be installed the S3 test
# says it is skipped and the rest still runs.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v garage >/dev/null; then
  echo "test: installing garage (cargo install garage --locked) for the S3 backend test"
  cargo install garage --locked --quiet || echo "test: garage could not be installed; the S3 test will be skipped"
fi
# Integration tests start servers and mount file systems; two at a time keeps a
# two-core machine responsive.
# LAZYBLK_KERNEL_TEST=1 runs the kernel NBD client test in a qemu guest (scripts/kernel-test.sh).
# --no-fail-fast: every test binary runs even after one fails, and cargo lists every
# binary that failed at the end; each failed test is also listed below.
failed=()
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! LAZYBLK_KERNEL_TEST=1 cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"; then
  failed+=("cargo test")
fi
# The Debian package: built, installed on this machine, checked (units, config files,
# man pages, readiness), removed.
if ! scripts/package-test.sh; then
  failed+=("scripts/package-test.sh")
fi
if ((${#failed[@]})); then
  echo
  echo "test: FAILED: ${failed[*]}"
  # libtest prints "test NAME ... FAILED" per failed test; cargo names the binaries.
  grep -E '^test .* \.\.\. FAILED$|^    `|^error: [0-9]+ targets? failed' "$log" | sed 's/^/test:   /' || true
  exit 1
fi
echo "test: every test passed"

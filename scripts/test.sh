#!/usr/bin/env bash
# Runs every test of lazyblk: unit tests, and integration tests that start the real
# binaries against real clients (nbdinfo, nbdcopy, qemu-img, qemu-io, fio, mount).
# Installs the Debian packages it needs first. Needs root for loop devices and FUSE.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --all-targets
# Integration tests start servers and mount file systems; two at a time keeps a
# two-core machine responsive.
# LAZYBLK_KERNEL_TEST=1 runs the kernel NBD client test in a qemu guest (scripts/kernel-test.sh).
LAZYBLK_KERNEL_TEST=1 cargo test --workspace -- --test-threads=2

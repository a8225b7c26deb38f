#!/usr/bin/env bash
# Installs what lazyblk's tests, demo and benchmark need on a fresh Debian machine:
# the real NBD peers (libnbd, qemu, nbdkit, fio), e2fsprogs, fuse3, nginx, and a real
# container registry with skopeo and htpasswd (tests/build_registry.rs), and libclang
# (libublk generates its kernel bindings with bindgen when the ublk crate builds).
# Safe to run again; it installs only what is missing.
set -euo pipefail

packages=(libnbd-bin python3-libnbd nbdkit qemu-utils e2fsprogs fio fuse3 nginx-light curl util-linux openssl jq systemd zstd docker-registry skopeo apache2-utils faketime libclang1-14)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo is needed (https://rustup.rs)"; exit 1; }
echo "setup: ok"

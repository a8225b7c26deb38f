# Shared by the scripts that boot Debian's cloud kernel under qemu (scripts/bench/boot.sh;
# scripts/kernel-test.sh does the same steps): packages, qemu unpacked beside the
# project, the kernel, and an initramfs's binaries, libraries and modules.
#
# Source it with $work (the download and build directory) set; `say` prints.
#
# qemu-system-x86 is not installed as a package: Debian 12's qemu-system-common (7.2)
# conflicts with the qemu-utils 10 the other tests use, and installing it would remove
# that. Its libraries are installed, and the two qemu packages are unpacked into
# $work/pkg instead (the kernel too: it is never installed over the host's).

say() { echo "${GUEST_SAY:-guest}: $*" >&2; }

apt_updated=""
apt_update_once() {
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
}
apt_install() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  apt_update_once
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Unpacks package $1 (its candidate version) into $work/pkg/$1, once.
unpack() {
  local package=$1 dir=$work/pkg/$1
  [ -e "$dir/.unpacked" ] && return 0
  apt_update_once
  rm -rf "$dir" && mkdir -p "$dir"
  (cd "$work/pkg" && rm -f "${package}"_*.deb && apt-get download -qq "$package" >/dev/null 2>&1) \
    || { say "apt-get download $package failed"; return 1; }
  dpkg-deb -x "$work/pkg/${package}"_*.deb "$dir"
  touch "$dir/.unpacked"
}

# Sets the array `qemu` to a qemu-system-x86_64 command line's start.
guest_qemu() {
  mkdir -p "$work/pkg"
  if command -v qemu-system-x86_64 >/dev/null; then
    qemu=(qemu-system-x86_64)
    return 0
  fi
  apt_update_once
  local deps
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
}

# Sets `vmlinuz` and `modules` for the cloud kernel that meta package $1 names
# (linux-image-cloud-amd64: Debian 12's 6.1; linux-image-6.12-cloud-amd64: 6.12).
guest_kernel() {
  local meta=$1 dir=$work/pkg/kernel-$1 package
  if [ ! -e "$dir/.unpacked" ]; then
    apt_update_once
    package=$(apt-cache depends "$meta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$package" ] || { say "cannot resolve $meta"; return 1; }
    unpack "$package"
    rm -rf "$dir" && mv "$work/pkg/$package" "$dir"
  fi
  vmlinuz=$(ls "$dir"/boot/vmlinuz-* | head -1)
  modules=$(ls -d "$dir"/lib/modules/* | head -1)
}

# Copies the shared libraries (and the loader) of dynamic binaries into the initramfs
# $root, at their host paths.
initramfs_libs() {
  local binary lib
  for binary in "$@"; do
    ldd "$binary" | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  done
}

# Adds module $1 of $modules and what it depends on (modinfo's "depends=") to the
# initramfs $root, uncompressed, in load order in $root/lib/modules/order.
initramfs_module() {
  local name=$1 file deps dep
  [ -e "$root/lib/modules/$name.ko" ] && return 0
  mkdir -p "$root/lib/modules"
  file=$(find "$modules" -name "$name.ko*" | head -1)
  [ -n "$file" ] || { say "module $name not found in $modules"; return 1; }
  case $file in
    *.xz) xz -dc "$file" >"$root/lib/modules/$name.ko" ;;
    *.zst) zstd -qdc "$file" >"$root/lib/modules/$name.ko" ;;
    *) cp "$file" "$root/lib/modules/$name.ko" ;;
  esac
  deps=$(strings "$root/lib/modules/$name.ko" | sed -n 's/^depends=//p' | tr ',' ' ')
  for dep in $deps; do initramfs_module "$dep"; done
  echo "$name" >>"$root/lib/modules/order"
}

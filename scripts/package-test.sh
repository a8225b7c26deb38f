#!/usr/bin/env bash
# Builds the Debian package (scripts/package.sh), installs it on this machine and checks
# it: every file in place, `systemd-analyze verify` on both units, the packaged config
# files read by `--print-config`, the man pages and completions usable; then runs the
# store and the daemon as their units do (`--config /etc/lazyblk/*.toml`, readiness
# through $NOTIFY_SOCKET) and serves a template; then removes the package. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(scripts/package.sh | tail -1)
echo "== installing $deb"
# apt installs what the package depends on (e2fsprogs, fuse3) as a user's install would.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "./$deb" >/dev/null
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  dpkg --purge lazyblk >/dev/null 2>&1 || true
}
trap cleanup EXIT

fail() { echo "package-test: FAIL: $*" >&2; exit 1; }
for f in /usr/bin/lazyblk /etc/lazyblk/daemon.toml /etc/lazyblk/store.toml \
         /lib/systemd/system/lazyblk-daemon.service /lib/systemd/system/lazyblk-store.service \
         /usr/share/man/man1/lazyblk-daemon.1.gz /usr/share/bash-completion/completions/lazyblk \
         /usr/share/zsh/vendor-completions/_lazyblk /usr/share/doc/lazyblk/README.md \
         /usr/share/doc/lazyblk/docs/README.md /usr/share/doc/lazyblk/docs/commands.md; do
  [ -e "$f" ] || fail "$f is not installed"
done
dpkg-query -W -f='${Conffiles}\n' lazyblk | grep -q /etc/lazyblk/daemon.toml \
  || fail "/etc/lazyblk/daemon.toml is not a conffile"

echo "== systemd-analyze verify"
systemd-analyze verify --man=no /lib/systemd/system/lazyblk-store.service \
  /lib/systemd/system/lazyblk-daemon.service || fail "systemd-analyze verify"
for unit in store daemon; do
  grep -q '^Type=notify' "/lib/systemd/system/lazyblk-$unit.service" || fail "$unit: not Type=notify"
done

echo "== the packaged config files"
lazyblk daemon --config /etc/lazyblk/daemon.toml --print-config \
  | grep -q '^cache = "/var/lib/lazyblk/cache"  # config file' || fail "daemon.toml not read"
lazyblk store --config /etc/lazyblk/store.toml --print-config \
  | grep -q '^root = "/var/lib/lazyblk-store"  # config file' || fail "store.toml not read"

echo "== man pages and completions"
man -w lazyblk-daemon >/dev/null 2>&1 || zcat /usr/share/man/man1/lazyblk-daemon.1.gz | grep -q -- '--nbd-max-connections' \
  || fail "the daemon's man page"
bash -c 'source /usr/share/bash-completion/completions/lazyblk && complete -p lazyblk' >/dev/null \
  || fail "the bash completion does not load"

echo "== the store and the daemon as their units run them"
work=$(mktemp -d)
export LAZYBLK_LOG=info
# Readiness: a datagram socket standing in for systemd's.
python3 - "$work" <<'PY' &
import socket, sys, os
path = os.path.join(sys.argv[1], "notify.sock")
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
s.settimeout(60)
with open(os.path.join(sys.argv[1], "notified"), "w") as out:
    for _ in range(2):
        msg = s.recv(4096).decode()
        out.write(msg.replace("\n", " ") + "\n")
        out.flush()
PY
notifier=$!
pids+=("$notifier")
for _ in $(seq 50); do [ -S "$work/notify.sock" ] && break; sleep 0.1; done
sed -e "s#/var/lib/lazyblk-store#$work/store#" -e 's#127.0.0.1:7070#127.0.0.1:17070#' \
  /etc/lazyblk/store.toml > "$work/store.toml"
sed -e "s#/var/lib/lazyblk/cache#$work/cache#" -e 's#127.0.0.1:7070#127.0.0.1:17070#' \
  -e 's#127.0.0.1:7071#127.0.0.1:17071#' /etc/lazyblk/daemon.toml > "$work/daemon.toml"
NOTIFY_SOCKET="$work/notify.sock" lazyblk store --config "$work/store.toml" 2>"$work/store.log" &
store=$!
pids+=("$store")
for _ in $(seq 100); do grep -qs READY=1 "$work/notified" && break; sleep 0.1; done
grep -qs READY=1 "$work/notified" || fail "the store never said READY=1"
NOTIFY_SOCKET="$work/notify.sock" lazyblk daemon --config "$work/daemon.toml" 2>"$work/daemon.log" &
daemon=$!
pids+=("$daemon")
for _ in $(seq 100); do [ "$(grep -c READY=1 "$work/notified" 2>/dev/null)" -ge 2 ] && break; sleep 0.1; done
[ "$(grep -c READY=1 "$work/notified")" -ge 2 ] || fail "the daemon never said READY=1"
mkdir -p "$work/root" && echo "packaged" > "$work/root/hello"
lazyblk build --from-dir "$work/root" --template pkg --store http://127.0.0.1:17070 --work-dir "$work" >/dev/null
size=$(nbdinfo --size "nbd+unix:///pkg?socket=$work/cache/nbd.sock")
[ "$size" -gt 0 ] || fail "the daemon does not serve the template"
kill "$daemon" "$store"
wait "$daemon" "$store" 2>/dev/null || true
kill "$notifier" 2>/dev/null || true
rm -rf "$work"

echo "== removing the package"
dpkg --purge lazyblk >/dev/null
[ ! -e /usr/bin/lazyblk ] || fail "/usr/bin/lazyblk is still there after a purge"
pids=()
trap - EXIT
echo "package-test: ok ($deb)"

#!/usr/bin/env bash
# Builds the Debian package: the release binary, man pages and shell completions
# generated from it (`lazyblk manpages`, `lazyblk completions`), then `cargo deb`.
# Installs cargo-deb first if it is missing. Prints the .deb's path last.
#
#   scripts/package.sh            # -> target/debian/lazyblk_<version>-1_<arch>.deb
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo deb --version >/dev/null 2>&1; then
  echo "== installing cargo-deb"
  cargo install cargo-deb --locked --quiet
fi
echo "== building the release binary"
cargo build --release --bin lazyblk
bin=target/release/lazyblk
rm -rf target/assets
mkdir -p target/assets/man target/assets/completions
"$bin" manpages target/assets/man
gzip -9nf target/assets/man/*.1
"$bin" completions bash > target/assets/completions/lazyblk
"$bin" completions zsh > target/assets/completions/_lazyblk
"$bin" completions fish > target/assets/completions/lazyblk.fish
echo "== cargo deb"
cargo deb --no-build --no-strip --quiet
ls -1t target/debian/lazyblk_*.deb | head -1

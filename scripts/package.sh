#!/usr/bin/env bash
# Builds the Debian package: release binaries, man pages and completions
# (`cargo xtask dist`), then `cargo deb`. Needs no root. Prints the path of
# the .deb (target/debian/steer_VERSION-1_ARCH.deb).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo deb --version >/dev/null 2>&1; then
    echo "package.sh: cargo-deb is missing: cargo install --locked cargo-deb --version 3.8.0" >&2
    exit 1
fi
nice -n 10 cargo build --release --quiet -p steerctl -p sockmap-update -p sk-lookup-attach
cargo xtask dist >/dev/null
rm -rf target/debian
nice -n 10 cargo deb -p steerctl --no-build --quiet >/dev/null
ls target/debian/steer_*.deb

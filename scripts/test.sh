#!/usr/bin/env bash
# Runs every check and test: formatting and lints, the committed BPF object
# against its source, unit tests, and the real-kernel tests (each in a
# network namespace of its own).
set -euo pipefail
source "$(dirname "$0")/common.sh"

cargo fmt --all --check
cargo fmt --manifest-path dispatch-ebpf/Cargo.toml --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The BPF crate builds with the nightly pinned in dispatch-ebpf/rust-toolchain.toml.
(cd dispatch-ebpf && cargo clippy --quiet --release --target bpfel-unknown-none -Z build-std=core -- -D warnings)
cargo xtask build-ebpf --check

cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run: cargo's last line is some crate's
# (often empty) doc-test summary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

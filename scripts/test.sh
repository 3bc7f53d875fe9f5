#!/usr/bin/env bash
# Runs every test: the committed BPF object against its source, unit tests,
# and the real-kernel tests (each in a network namespace of its own).
set -euo pipefail
source "$(dirname "$0")/common.sh"
if rustup toolchain list | grep -q '^nightly'; then
    cargo xtask build-ebpf --check
elif [ -n "${CI:-}" ]; then
    echo "test.sh: CI needs the nightly toolchain to check dispatch-ebpf/dispatch.bpf.o" >&2
    exit 1
else
    echo "test.sh: no nightly toolchain, skipping the BPF object freshness check" >&2
fi
cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run: cargo's last line is some crate's
# (often empty) doc-test summary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

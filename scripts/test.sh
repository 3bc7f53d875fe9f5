#!/usr/bin/env bash
# Runs every check and test: formatting and lints, the committed BPF object
# against its source, unit tests, the real-kernel tests (each in a network
# namespace of its own), and the script checks: the quick start as root and
# as a user, the Debian package built, installed, tried and purged, and each
# fuzz target for FUZZ_SECONDS (20 by default; docs/fuzzing.md).
# The benchmark's smoke run is a check of its own, not counted as a test.
set -euo pipefail
source "$(dirname "$0")/common.sh"
scripts/setup.sh --test

cargo fmt --all --check
cargo fmt --manifest-path dispatch-ebpf/Cargo.toml --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The BPF crate builds with the nightly pinned in dispatch-ebpf/rust-toolchain.toml.
(cd dispatch-ebpf && cargo clippy --quiet --release --target bpfel-unknown-none -Z build-std=core -- -D warnings)
# The fuzz crate builds with the nightly pinned in fuzz/rust-toolchain.toml.
cargo fmt --manifest-path fuzz/Cargo.toml --check
(cd fuzz && cargo clippy --quiet --all-targets -- -D warnings)
cargo xtask build-ebpf --check

cargo build --workspace --all-targets
scripts/fuzz.sh --build
log=$(mktemp)
bench_log=$(mktemp)
trap 'rm -f "$log" "$bench_log"' EXIT
status=0
# The benchmark's smoke run (bench/tests/smoke.rs: steer-bench --quick
# measures every row) is a benchmark, not a test: it runs below as a check
# of its own, outside the count. steer-bench's unit tests are counted.
cargo test --workspace --exclude steer-bench --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
cargo test -p steer-bench --bins --no-fail-fast "$@" 2>&1 | tee -a "$log" || status=$?
if cargo test -p steer-bench --test smoke >"$bench_log" 2>&1; then
    bench="bench smoke: ok"
else
    cat "$bench_log" >&2
    bench="bench smoke: FAILED (cargo test -p steer-bench --test smoke)"
    status=1
fi
# The script checks and the fuzz runs, each counted as one test.
checks_passed=0
checks_failed=0
check() {
    if "$@"; then
        checks_passed=$((checks_passed + 1))
    else
        echo "FAILED: $*" >&2
        checks_failed=$((checks_failed + 1))
        status=1
    fi
}
check scripts/quickstart-test.sh
check scripts/package-test.sh
for target in $(scripts/fuzz.sh --list); do
    check scripts/fuzz.sh "$target" "${FUZZ_SECONDS:-20}"
done
echo "$bench"
# One closing line for the whole run: cargo's last line is some crate's
# (often empty) doc-test summary.
awk -v p="$checks_passed" -v f="$checks_failed" \
    '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

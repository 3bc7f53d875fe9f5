#!/usr/bin/env bash
# Runs steer's fuzz targets (cargo-fuzz and libFuzzer, in fuzz/): see
# docs/fuzzing.md. Needs no root.
#
#   scripts/fuzz.sh TARGET [SECONDS] [-- LIBFUZZER_FLAGS...]   one target (60 s by default)
#   scripts/fuzz.sh all [SECONDS] [-- LIBFUZZER_FLAGS...]      every target, SECONDS each
#   scripts/fuzz.sh --build     build the targets
#   scripts/fuzz.sh --install   install the pinned cargo-fuzz and nightly (scripts/setup.sh --test calls it)
#   scripts/fuzz.sh --list      the targets
#
# A run starts from the committed seeds (fuzz/seeds/TARGET) and what earlier
# runs found (fuzz/corpus/TARGET, not committed), writes libFuzzer's output
# to fuzz/logs/TARGET.log and prints one summary line. A crash (a panic, a
# failed assertion, a timeout or running out of memory) is saved under
# fuzz/artifacts/TARGET/, the end of the log is printed, and it exits 1.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# Pinned like cargo-deb in scripts/setup.sh. The nightly is pinned in
# fuzz/rust-toolchain.toml, which rustup reads in fuzz/.
CARGO_FUZZ_VERSION=0.13.2
TARGETS=(bindings_file config prefix diag_decode)
# One build for every run: optimised, with debug assertions and overflow
# checks (cargo-fuzz's default), and no sanitizer: the code fuzzed is safe
# Rust, where AddressSanitizer has nothing to find, and it would slow the
# build and halve the runs.
BUILD=(--sanitizer none)

install() {
    local out
    if ! out=$(cd fuzz && rustup toolchain install 2>&1); then
        echo "$out" >&2
        exit 1
    fi
    if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
        cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
    fi
}

build() {
    install
    (cd fuzz && cargo fuzz build "${BUILD[@]}")
}

# final_stat LOG NAME: a number from libFuzzer's -print_final_stats.
final_stat() {
    awk -v k="stat::$2:" '$1 == k { print $2 }' "$1" | tail -n 1
}

# run TARGET SECONDS [LIBFUZZER_FLAGS...]
run() {
    local target=$1 seconds=$2
    shift 2
    local log="fuzz/logs/$target.log"
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target" fuzz/logs
    local status=0
    # -timeout: an input that takes 10 s is a hang; libFuzzer stops at the
    # first crash and saves the input.
    (cd fuzz && cargo fuzz run "${BUILD[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "$@") >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$log" >&2
        echo "fuzz $target: FAILED (exit $status) after $(final_stat "$log" number_of_executed_units) runs; the input is in fuzz/artifacts/$target/, the log in $log" >&2
        return 1
    fi
    echo "fuzz $target: $(final_stat "$log" number_of_executed_units) runs in ${seconds} s ($(final_stat "$log" average_exec_per_sec) exec/s), corpus of $(find "fuzz/corpus/$target" -type f | wc -l) inputs, no crash"
}

case "${1:-}" in
    --install)
        install
        ;;
    --build)
        build
        ;;
    --list)
        printf '%s\n' "${TARGETS[@]}"
        ;;
    all | bindings_file | config | prefix | diag_decode)
        which=$1
        seconds=${2:-60}
        shift $(($# < 2 ? $# : 2))
        [ "${1:-}" != -- ] || shift
        [[ $seconds =~ ^[0-9]+$ ]] || { echo "fuzz.sh: SECONDS must be a number, not '$seconds'" >&2; exit 2; }
        if ! out=$(build 2>&1); then
            echo "$out" >&2
            exit 1
        fi
        failed=0
        if [ "$which" = all ]; then
            for target in "${TARGETS[@]}"; do run "$target" "$seconds" "$@" || failed=1; done
        else
            run "$which" "$seconds" "$@" || failed=1
        fi
        exit "$failed"
        ;;
    *)
        sed -n '2,15s/^# \{0,1\}//p' "$0" >&2
        exit 2
        ;;
esac

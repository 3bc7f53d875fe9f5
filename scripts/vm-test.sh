#!/usr/bin/env bash
# Runs the real-kernel integration tests on the kernels users run: Debian's
# own kernel packages (5.10 bullseye, 6.1 bookworm, 6.12 trixie), each booted
# under qemu (KVM when it works, TCG emulation otherwise) from an initramfs
# holding this build's release binaries, the test executables and the tools
# they use. Prints a table kernel -> passed/failed/skipped and a last line
# `kernels: N passed, N failed`; exits non-zero if any kernel failed.
#
# Usage: scripts/vm-test.sh [--bench] [KERNEL...]    (default: 5.10 6.1 6.12)
#   Runs tests/walkthrough.rs, bad_input.rs, control_plane.rs, lookup.rs,
#   security.rs, diag.rs, metrics.rs and follow.rs (but its nginx test: the
#   guests carry no nginx); --bench adds the benchmark's smoke
#   test (bench/tests/smoke.rs: it checks the benchmark runs there, but under
#   emulation its many grace periods take about 10 minutes a kernel, and CI
#   runs it natively). tests/lab.rs is not run in the guests: scripts/lab.sh
#   is the lab's VM form.
#
# Kernel packages are cached in ~/.cache/steer-vm (STEER_VM_CACHE); images
# and logs of the last run are in target/vm/ (KERNEL.out is the guest's test
# output, KERNEL.console its kernel console). scripts/vm-common.sh lists the
# other settings (STEER_VM_ACCEL, STEER_VM_TIMEOUT, ...).
set -euo pipefail
source "$(dirname "$0")/common.sh"
source scripts/vm-common.sh

# STEER_VM_TESTS="trace follow" runs only those suites.
tests=(${STEER_VM_TESTS:-walkthrough bad_input control_plane lookup security diag metrics follow trace})
# Arguments for a test executable in the guest.
# The guests carry no nginx. Under TCG a member leaving its reuseport group
# has reset one connection in 12,000 (6.12): that test runs natively only.
declare -A test_args=([follow]="--skip nginx --skip reuseport_members_leaving")
kernels=()
for arg in "$@"; do
    case $arg in
        --bench) tests+=(smoke) ;;
        -h | --help)
            sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "vm-test.sh: unknown option $arg" >&2
            exit 2
            ;;
        *)
            vm_suite "$arg" >/dev/null || { echo "vm-test.sh: unknown kernel $arg (known: 5.10 6.1 6.12)" >&2; exit 2; }
            kernels+=("$arg")
            ;;
    esac
done
[ ${#kernels[@]} -gt 0 ] || kernels=(5.10 6.1 6.12)

vm_install_deps || vm_die "cannot install qemu-system-x86 and cpio (see $vm_install_log)"
mkdir -p "$vm_out"

echo "== building release binaries and test executables"
cargo build --release --workspace --bins --quiet
cargo test --release -p steer-tests -p steer-bench --no-run --message-format=json --quiet >"$vm_out/artifacts.json"
exes=()
for name in "${tests[@]}"; do
    exe=$(grep '"reason":"compiler-artifact"' "$vm_out/artifacts.json" \
        | grep "\"kind\":\[\"test\"\],[^}]*\"name\":\"$name\"" \
        | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -n 1) || true
    [ -n "$exe" ] && [ -x "$exe" ] || vm_die "no test executable for $name in cargo's output"
    exes+=("$exe${test_args[$name]:+ ${test_args[$name]}}")
done

echo "== fetching kernels ${kernels[*]} (cache: $vm_cache)"
declare -A kdir=()
for k in "${kernels[@]}"; do
    kdir[$k]=$(vm_kernel "$k")
done

echo "== building the initramfs"
shared=$vm_out/shared.cpio
vm_build_rootfs "$shared" "${exes[@]}"
vm_log "shared part: $(du -h "$shared" | cut -f1)"

declare -A initrd=()
for k in "${kernels[@]}"; do
    initrd[$k]=$(vm_initrd "$shared" "${kdir[$k]}")
done
vm_detect_accel "${kdir[${kernels[0]}]}" "${initrd[${kernels[0]}]}"

declare -A result=() npass=() nfail=() nskip=() secs=() release=()
kernels_passed=0
kernels_failed=0
for k in "${kernels[@]}"; do
    release[$k]=$(cat "${kdir[$k]}/release")
    out=$vm_out/$k.out
    console=$vm_out/$k.console
    rm -f "$out" "$console"
    echo "== Linux ${release[$k]} ($vm_accel): booting and running ${tests[*]}"
    start=$(date +%s)
    status=0
    vm_qemu "${STEER_VM_TIMEOUT:-1800}" "${kdir[$k]}" "${initrd[$k]}" steer.mode=test \
        -serial "file:$console" -serial "file:$out" || status=$?
    secs[$k]=$(($(date +%s) - start))
    touch "$out"
    tr -d '\r' <"$out" | sed "s/^/[$k] /"

    # libtest's counts; a test that a feature probe skipped passed there.
    read -r p f < <(tr -d '\r' <"$out" | awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
        END { print p + 0, f + 0 }')
    # tests/src/lib.rs's require_feature prints one such line per skip.
    s=$(tr -d '\r' <"$out" | { grep -o 'SKIPPED: .*' || true; } | wc -l)
    npass[$k]=$((p - s))
    nfail[$k]=$f
    nskip[$k]=$s
    why=""
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        why="timed out after ${STEER_VM_TIMEOUT:-1800} s"
    elif ! grep -q '^@@done' "$out"; then
        why="guest stopped before the tests finished (qemu exit $status; see $console)"
    elif grep -q '^@@end .* rc=[1-9]' "$out"; then
        why="a test executable failed"
    elif [ "$f" -ne 0 ] || [ "$p" -eq 0 ]; then
        why="$f failed, $p passed"
    fi
    if [ -z "$why" ]; then
        result[$k]=passed
        kernels_passed=$((kernels_passed + 1))
    else
        result[$k]="FAILED: $why"
        kernels_failed=$((kernels_failed + 1))
        echo "[$k] $why" >&2
        tail -n 30 "$console" | sed "s/^/[$k console] /" >&2
    fi
done

echo
echo "Kernel matrix ($vm_accel, ${tests[*]}):"
printf '%-6s %-26s %-7s %-7s %-7s %-8s %s\n' kernel release passed failed skipped seconds result
for k in "${kernels[@]}"; do
    printf '%-6s %-26s %-7s %-7s %-7s %-8s %s\n' "$k" "${release[$k]}" "${npass[$k]}" "${nfail[$k]}" "${nskip[$k]}" "${secs[$k]}" "${result[$k]}"
done
for k in "${kernels[@]}"; do
    tr -d '\r' <"$vm_out/$k.out" | grep -o 'SKIPPED: .*' | sed "s/^/$k /" || true
done
echo "kernels: $kernels_passed passed, $kernels_failed failed"
[ "$kernels_failed" -eq 0 ]

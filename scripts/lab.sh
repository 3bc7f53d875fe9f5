#!/usr/bin/env bash
# The seed's lab over a real wire: a guest is reached from the host side
# through a tap (or veth) interface, the walkthrough runs inside the guest,
# and the host scans the guest's address with
#   nmap -sT -p 1-1000 GUEST_IP
# before steering (nothing open) and after (exactly 7, 77 and 777), and
# echoes through each port with ncat, as in the seed.
#
# Usage: scripts/lab.sh [--vm [KERNEL] | --netns]
#   (default)      a qemu guest running Debian's KERNEL (6.1, Debian 12's and
#                  the Vagrant box's); if no VM can be had, a network
#                  namespace instead, and the output says so
#   --vm [KERNEL]  the VM or fail (KERNEL: 5.10, 6.1 or 6.12)
#   --netns        the guest is a network namespace joined by a veth pair
#
# Safety: the host side of the wire lives in a network namespace this script
# creates (steer-lab-host-PID), holding only the tap/veth and the addresses
# 192.0.2.1/30 (host) and 192.0.2.2/30 (guest) from TEST-NET-1, so no scan or
# echo can reach any address the script did not create, and the machine's
# own interfaces and routes are never touched. Everything is removed on exit,
# pass or fail.
#
# Environment: STEER_BIN_DIR  directory with steerctl for --netns (default:
# a release build in target/release); the VM settings in vm-common.sh.
# Exit status 0 only if every check passed; the last line says which way.
# Guest command lines are single-quoted on purpose: they expand in the guest.
# shellcheck disable=SC2016
set -euo pipefail
source "$(dirname "$0")/common.sh"
source scripts/vm-common.sh

mode=auto
kernel=6.1
while [ $# -gt 0 ]; do
    case $1 in
        --vm)
            mode=vm
            if [ $# -ge 2 ] && vm_suite "$2" >/dev/null; then
                kernel=$2
                shift
            fi
            ;;
        --netns) mode=netns ;;
        -h | --help)
            sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "lab.sh: unknown argument $1" >&2
            exit 2
            ;;
    esac
    shift
done

host_ip=192.0.2.1
guest_ip=192.0.2.2
hns=steer-lab-host-$$
gns=steer-lab-guest-$$
work=$(mktemp -d /tmp/steer-lab.XXXXXX)
qemu_pid=""
loop_pid=""
failures=0

cleanup() {
    set +e
    [ -n "${to_guest:-}" ] && { echo poweroff >&"$to_guest"; } 2>/dev/null
    for pid in $qemu_pid $loop_pid; do
        kill "$pid" 2>/dev/null
    done
    for ns in "$gns" "$hns"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    done
    for pid in $qemu_pid $loop_pid; do
        wait "$pid" 2>/dev/null
    done
    ip netns del "$gns" 2>/dev/null
    ip netns del "$hns" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '%s\n' "$*"; }
check() { # DESCRIPTION EXPECTED ACTUAL
    if [ "$2" = "$3" ]; then
        say "lab: $1: $3 (as expected)"
    else
        say "lab: FAILED: $1: expected '$2', got '$3'"
        failures=$((failures + 1))
    fi
}

# Runs one shell command line in the guest and prints its output; returns
# its exit status. Every read is bounded, so a dead guest fails the lab.
guest() {
    local line
    say "guest \$ $*"
    printf '%s\n' "$*" >&"$to_guest"
    while IFS= read -r -t 120 line <&"$from_guest"; do
        line=${line%$'\r'}
        case $line in
            @@rc=*)
                say ""
                return "${line#@@rc=}"
                ;;
        esac
        say "$line"
    done
    say "lab: FAILED: the guest did not answer within 120 s"
    exit 1
}
guest_ok() { guest "$@" || { say "lab: FAILED: guest command failed: $*"; exit 1; }; }

# The open TCP ports 1-1000 on the guest, as the host sees them.
scan() {
    local ports
    say "host \$ nmap -sT -p 1-1000 $guest_ip"
    ports=$(scripts/verify-nmap.sh --netns "$hns" "$guest_ip" 1-1000 | awk '{ print $3 }' | paste -sd' ') \
        || { say "lab: FAILED: the nmap scan failed"; exit 1; }
    say "${ports:-(no open ports)}"
    say ""
    scanned=${ports:-none}
}

# Echoes a line through PORT from the host, as the seed does.
echo_through() {
    local port=$1 reply
    say "host \$ echo 'hello $port' | ncat --no-shutdown -i 2 $guest_ip $port"
    reply=$(echo "hello $port" | ip netns exec "$hns" timeout 20 ncat --no-shutdown -i 2 "$guest_ip" "$port" 2>/dev/null || true)
    say "$reply"
    [ "$reply" = "hello $port" ]
}

# Waits for the first line from the guest, `@@ready RELEASE`: at most
# LIMIT seconds, and no longer than process PID lives.
wait_ready() {
    local limit=$1 pid=$2 line deadline=$((SECONDS + $1))
    while [ "$SECONDS" -lt "$deadline" ] && kill -0 "$pid" 2>/dev/null; do
        IFS= read -r -t 5 line <&"$from_guest" || continue
        line=${line%$'\r'}
        case $line in
            @@ready*)
                guest_release=${line#@@ready }
                return 0
                ;;
        esac
    done
    return 1
}

# The host side: a namespace of its own with loopback up.
ip netns add "$hns"
ip -n "$hns" link set lo up
mkfifo "$work/ctl.in" "$work/ctl.out"
exec {to_guest}<>"$work/ctl.in" {from_guest}<>"$work/ctl.out"

start_vm() {
    local kdir initrd
    # (set -e does not apply in here: start_vm runs as a condition.)
    vm_install_deps || { vm_reason="qemu cannot be installed (see $vm_install_log)"; return 1; }
    [ -c /dev/net/tun ] || { vm_reason="no /dev/net/tun for the tap interface"; return 1; }
    mkdir -p "$vm_out"
    kdir=$(vm_kernel "$kernel") || { vm_reason="no $kernel kernel (offline and nothing cached?)"; return 1; }
    cargo build --release --workspace --bins --quiet || vm_die "cargo build failed"
    vm_build_rootfs "$vm_out/lab-shared.cpio" || vm_die "building the initramfs failed"
    initrd=$(vm_initrd "$vm_out/lab-shared.cpio" "$kdir") || vm_die "building the initramfs failed"
    vm_detect_accel "$kdir" "$initrd"
    ip -n "$hns" tuntap add dev steer-tap0 mode tap &&
        ip -n "$hns" addr add "$host_ip/30" dev steer-tap0 &&
        ip -n "$hns" link set steer-tap0 up || { vm_reason="cannot create the tap interface"; return 1; }
    # qemu runs inside the host namespace, where the tap is.
    vm_wrap=(ip netns exec "$hns")
    vm_qemu "${STEER_VM_TIMEOUT:-900}" "$kdir" "$initrd" "steer.mode=lab steer.addr=$guest_ip/30" \
        -serial "file:$vm_out/lab.console" -chardev "pipe,id=ctl,path=$work/ctl" -serial chardev:ctl \
        -netdev tap,id=n0,ifname=steer-tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,romfile= \
        >"$work/qemu.log" 2>&1 &
    qemu_pid=$!
    vm_wrap=()
    if ! wait_ready 300 "$qemu_pid"; then
        vm_reason="the guest did not come up within 300 s: $(tail -n 3 "$work/qemu.log" "$vm_out/lab.console" 2>/dev/null | tr '\n' ' ')"
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
        qemu_pid=""
        ip -n "$hns" link del steer-tap0 2>/dev/null || true
        return 1
    fi
    say "lab: guest is a qemu VM ($vm_accel) running Linux $guest_release, reached through tap steer-tap0"
}

start_netns() {
    local bin=${STEER_BIN_DIR:-}
    if [ -z "$bin" ]; then
        cargo build --release --workspace --bins --quiet
        bin=$PWD/target/release
    fi
    [ -x "$bin/steerctl" ] || { say "lab: FAILED: no steerctl in $bin"; exit 1; }
    ip netns add "$gns"
    ip -n "$gns" link set lo up
    # Made inside the namespaces, never in the machine's own.
    ip -n "$hns" link add steer-lab-h type veth peer name steer-lab-g netns "$gns"
    ip -n "$hns" addr add "$host_ip/30" dev steer-lab-h
    ip -n "$gns" addr add "$guest_ip/30" dev steer-lab-g
    ip -n "$hns" link set steer-lab-h up
    ip -n "$gns" link set steer-lab-g up
    # The same command loop as the VM's, in the guest namespace (with bpffs
    # mounted in the mount namespace `ip netns exec` gives it).
    PATH="$bin:$PATH" ip netns exec "$gns" bash scripts/lab-guest.sh <"$work/ctl.in" >"$work/ctl.out" 2>&1 &
    loop_pid=$!
    wait_ready 30 "$loop_pid" || { say "lab: FAILED: the guest namespace did not start"; exit 1; }
    say "lab: guest is network namespace $gns (Linux $guest_release, this machine's kernel), reached through veth steer-lab-h"
}

vm_reason=""
case $mode in
    vm) start_vm || { say "lab: FAILED: VM unavailable: $vm_reason"; exit 1; } ;;
    netns) start_netns ;;
    auto)
        if ! start_vm; then
            say "lab: VM unavailable ($vm_reason); running the guest in a network namespace instead"
            start_netns
        fi
        ;;
esac
say "lab: host $host_ip, guest $guest_ip"
say ""

# The seed's walkthrough, the service first: one ncat echo socket on
# 127.0.0.1:7777, which nothing from the wire can reach by itself.
guest_ok 'ncat -4kle /bin/cat 127.0.0.1 7777 >/dev/null 2>&1 & ncat_pid=$!; i=0; while ! ncat -z 127.0.0.1 7777 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done; echo "ncat pid $ncat_pid on 127.0.0.1:7777"'
scan
check "nmap before steering" none "$scanned"
guest_ok steerctl load
guest_ok steerctl attach
scan
check "nmap with the program attached, no port steered yet" none "$scanned"

guest_ok steerctl ports add 7 77 777
guest_ok 'steerctl socket set --pid $ncat_pid'
guest_ok steerctl status
scan
check "nmap after steering" "7 77 777" "$scanned"
echoed=()
for port in 7 77 777; do
    echo_through "$port" && echoed+=("$port")
done
check "echo through each steered port" "7 77 777" "${echoed[*]}"

# Labels over the wire: every port of the guest's address to the same socket.
guest_ok steerctl bind echo tcp "$guest_ip/32" 4242
guest_ok 'steerctl register-pid echo $ncat_pid'
echo_through 4242 && ok=yes || ok=no
check "echo through a labelled binding (port 4242)" yes "$ok"
guest_ok steerctl bindings
guest_ok steerctl list
guest_ok steerctl metrics
guest_ok steerctl upgrade
echo_through 7 && ok=yes || ok=no
check "echo after upgrade" yes "$ok"
guest_ok steerctl unbind echo tcp "$guest_ip/32" 4242
guest_ok steerctl unregister echo
guest_ok steerctl ports del 777
scan
check "nmap after ports del 777" "7 77" "$scanned"
guest_ok steerctl detach
scan
check "nmap after detach" none "$scanned"
guest_ok steerctl unload
guest_ok 'kill $ncat_pid'

if [ "$failures" -eq 0 ]; then
    say "lab: passed"
else
    say "lab: FAILED ($failures checks)"
    exit 1
fi

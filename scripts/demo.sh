#!/usr/bin/env bash
# Sets up and runs the walkthrough: one ncat echo socket on 127.0.0.1:7777
# serves ports 7, 77 and 777 through sk_lookup, in a throwaway network
# namespace `steer-demo`, checked with nmap. Leaves nothing behind.
set -euo pipefail
source "$(dirname "$0")/common.sh"
# STEER_BIN_DIR: run the tools from there (scripts/package-test.sh runs the
# installed package's) instead of building them.
if [ -z "${STEER_BIN_DIR:-}" ]; then
    cargo build --workspace --quiet
fi
export PATH="${STEER_BIN_DIR:-$PWD/target/debug}:$PATH"

ns=steer-demo
cleanup() {
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add "$ns"
ip -n "$ns" link set lo up

# `ip netns exec` gives the shell a mount namespace of its own, so bpffs is
# mounted inside it; pins live as long as that shell.
ip netns exec "$ns" bash -s <<'DEMO'
set -euo pipefail
run() { echo "\$ $*"; "$@"; echo; }
mount -t bpf bpf /sys/fs/bpf
# Its fresh /sys also hides the host's cgroup v2 hierarchy, where following
# attaches; mounted back as a systemd host has it, so steerctl runs as
# steer.service would (without it, steerctl mounts one of its own).
grep -q ' - cgroup2 ' /proc/self/mountinfo || mount -t cgroup2 none /sys/fs/cgroup

run steerctl load
ncat -4kle /bin/cat 127.0.0.1 7777 2>/dev/null &
ncat_pid=$!
while ! ncat -z 127.0.0.1 7777 2>/dev/null; do sleep 0.1; done
echo "\$ ncat -4kle /bin/cat 127.0.0.1 7777 &    # pid $ncat_pid"
echo
run steerctl attach
run steerctl ports add 7 77 777
run steerctl socket set --pid "$ncat_pid"
run steerctl status
for port in 7 77 777; do
    echo "\$ echo 'hello $port' | ncat --no-shutdown -i 1 127.0.0.1 $port"
    echo "hello $port" | ncat --no-shutdown -i 1 127.0.0.1 "$port" 2>/dev/null || true
done
echo
echo '$ scripts/verify-nmap.sh 127.0.0.1 1-1000'
scripts/verify-nmap.sh 127.0.0.1 1-1000
echo
# The same socket under a label: every port of 127.0.0.0/8 with one binding.
run steerctl bind echo tcp 127.0.0.0/8 0
run steerctl register-pid echo "$ncat_pid"
echo "\$ echo 'hello label' | ncat --no-shutdown -i 1 127.0.0.53 4242"
echo 'hello label' | ncat --no-shutdown -i 1 127.0.0.53 4242 2>/dev/null || true
echo
run steerctl bindings
run steerctl list
run steerctl metrics
# Followed by the kernel: a restarted server is steered from its first listen().
run steerctl register echo tcp 127.0.0.1 7777 --follow
kill "$ncat_pid"
wait "$ncat_pid" 2>/dev/null || true
ncat -4kle /bin/cat 127.0.0.1 7777 2>/dev/null &
ncat_pid=$!
while ! ncat -z 127.0.0.1 7777 2>/dev/null; do sleep 0.1; done
echo "\$ kill %1; ncat -4kle /bin/cat 127.0.0.1 7777 &    # restarted: pid $ncat_pid"
echo "\$ echo 'hello again' | ncat --no-shutdown -i 1 127.0.0.53 4242"
echo 'hello again' | ncat --no-shutdown -i 1 127.0.0.53 4242 2>/dev/null || true
echo
run steerctl list
# The seed socket is not followed: give it the new one.
run steerctl socket set --pid "$ncat_pid"
run steerctl unbind echo tcp 127.0.0.0/8 0
run steerctl unregister echo

run steerctl ports del 777
echo '$ scripts/verify-nmap.sh 127.0.0.1 1-1000'
scripts/verify-nmap.sh 127.0.0.1 1-1000
echo
run steerctl detach
echo '$ scripts/verify-nmap.sh 127.0.0.1 1-1000    # nothing steered once detached'
scripts/verify-nmap.sh 127.0.0.1 1-1000
echo
run steerctl unload
kill "$ncat_pid"
DEMO

#!/bin/sh
# /init of the guests that scripts/vm-test.sh and scripts/lab.sh boot (busybox
# sh; not run on the host). The kernel console is ttyS0; results and the
# lab's commands go over ttyS1. Kernel command line:
#   steer.mode=probe   print a marker and power off (the KVM probe)
#   steer.mode=test    run /steer/tests.list's test executables, then power off
#   steer.mode=lab     configure eth0 with steer.addr=ADDR/LEN and run
#                      scripts/lab-guest.sh on ttyS1: the commands lab.sh sends
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run/netns
# What udev makes on a real system; tools write to /dev/stderr.
ln -sf /proc/self/fd /dev/fd
for i in 0:stdin 1:stdout 2:stderr; do ln -sf "/proc/self/fd/${i%%:*}" "/dev/${i#*:}"; done
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# /tmp stays on the initramfs (writable already): a tmpfs there would hide
# this repository's files when it was built under /tmp.
chmod 1777 /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/netns
mount -t bpf bpf /sys/fs/bpf
# Following attaches in the cgroup v2 hierarchy, where a systemd host mounts it.
mount -t cgroup2 none /sys/fs/cgroup
ip link set lo up
hostname steer-vm

arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
mode=$(arg steer.mode)

if [ "$mode" = probe ]; then
    echo STEER-VM-PROBE-OK >/dev/console
    poweroff -f
fi

for m in $(cat /lib/modules/load.list 2>/dev/null); do
    insmod "/lib/modules/$m" || echo "insmod $m failed" >/dev/console
done

out=/dev/ttyS1
stty -F "$out" raw -echo 2>/dev/null
repo=$(cat /steer/repo)
if ! cd "$repo"; then
    echo "vm-init: this build's files are not at $repo in the initramfs" >/dev/console
    poweroff -f
fi

if [ "$mode" = test ]; then
    {
        echo "@@kernel $(uname -r)"
        while read -r exe args; do
            [ -n "$exe" ] || continue
            name=$(basename "$exe")
            echo "@@begin ${name%-*}"
            start=$(date +%s)
            # shellcheck disable=SC2086 # args: words to split
            timeout "${STEER_TEST_TIMEOUT:-600}" "$exe" --test-threads=2 $args </dev/null 2>&1
            rc=$?
            echo "@@end ${name%-*} rc=$rc seconds=$(($(date +%s) - start))"
        done </steer/tests.list
        echo "@@done"
    } >"$out" 2>&1
    sync
    poweroff -f
fi

if [ "$mode" = lab ]; then
    addr=$(arg steer.addr)
    for _ in $(seq 1 50); do
        [ -e /sys/class/net/eth0 ] && break
        sleep 0.1
    done
    ip addr add "$addr" dev eth0
    ip link set eth0 up
    # scripts/lab-guest.sh runs the host's commands; as a child of this
    # shell, which stays PID 1 and reaps orphans.
    bash /steer/lab-guest.sh <"$out" >"$out" 2>&1
    poweroff -f
fi

echo "vm-init: unknown steer.mode '$mode'" >/dev/console
poweroff -f

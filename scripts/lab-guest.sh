#!/usr/bin/env bash
# The guest side of scripts/lab.sh (run by the VM's /init, or inside the
# guest network namespace): reads one shell command a line from stdin, runs
# it in this shell (so variables such as $ncat_pid persist), and prints its
# output and then `@@rc=STATUS`. `poweroff` ends it. Not for direct use.
#
# bash, not busybox sh: busybox's `read` can return half a line when a
# signal (SIGCHLD from an exiting child) arrives mid-line.
grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf || exit 1
echo "@@ready $(uname -r)"
while IFS= read -r line; do
    [ "$line" = poweroff ] && break
    eval "$line" </dev/null 2>&1
    echo "@@rc=$?"
done

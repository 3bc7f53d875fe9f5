#!/usr/bin/env bash
# steer in containers, on this kernel, with podman and the image that
# scripts/image.sh builds:
#   host-agent      the host-agent shape: load, attach and apply from
#                   one-shot containers, watch and metrics from long-running
#                   ones (host network and PID namespaces, the host's bpffs as
#                   a volume); steering goes on after every container is gone
#   other-netns     steering inside another container's network namespace,
#                   with --netns /proc/PID/ns/net and from inside it; gc
#                   removes the state once that container is gone
#   preflight-*     a container without bpffs, capabilities, a writable bpffs,
#                   a seccomp profile that allows bpf(), or with a user
#                   namespace: the error names the flag or mount, and nothing
#                   changes
#   kube            deploy/kubernetes' DaemonSet pod template and ConfigMap
#                   under `podman kube play` (as a Deployment: podman 4.3 has no
#                   DaemonSet): init containers, probes, a rolling replace that
#                   runs `upgrade` with no connection lost, removal keeping
#                   the pins, and removal on purpose
#
# Safety: the "host" of every test is a network namespace this script makes,
# with its own bpffs mount; no container joins the machine's network namespace
# or sees its /sys/fs/bpf (their /sys/fs/bpf is a fresh sysfs or a test bpffs).
# Traffic goes only to loopback and to 192.0.2.0/24 routed locally inside a
# test namespace. Every loop is bounded in count and time. Containers, pods,
# images, namespaces, mounts and processes made here are removed on exit,
# pass or fail.
#
# Run as root (it re-runs itself under sudo); it installs podman, runc and
# busybox-static. podman runs with cgroupfs, runc and explicit ulimits (a
# containers.conf of its own, for this script only): crun refuses hybrid
# cgroup hierarchies, and the default ulimits cannot be set everywhere.
# Last line: `container tests: N passed, N failed`; exit status 0 only if all
# passed.
# Commands run in namespaces are single-quoted on purpose: they expand there.
# shellcheck disable=SC2016
set -euo pipefail
source "$(dirname "$0")/common.sh"

started=$(date +%s)
say() { echo "container-test: $*"; }
id=$$
tmp=$(mktemp -d /tmp/steer-ct.XXXXXX)
chmod 755 "$tmp"
hns=steer-ct-$id-host
cns=steer-ct-$id-c
kns=steer-ct-$id-kube
bpffs_host=$tmp/bpffs-host
bpffs_c=$tmp/bpffs-c
bpffs_k=$tmp/bpffs-kube
server_image=localhost/steer-ct-$id-busybox:1
kube_file=$tmp/kube.yaml
pause_image=
image=
version=

cleanup() {
    set +e
    [ -e "$kube_file" ] && podman kube down "$kube_file" >/dev/null 2>&1
    local ids
    ids=$(podman ps -aq --filter "label=steer-ct=$id" 2>/dev/null)
    # shellcheck disable=SC2086 # one id a word
    [ -n "$ids" ] && podman rm -f -t 2 $ids >/dev/null 2>&1
    if [ -e "$tmp/pids" ]; then
        while read -r pid; do kill "$pid" 2>/dev/null; done <"$tmp/pids"
    fi
    for ns in "$hns" "$cns" "$kns"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    for mnt in "$bpffs_host" "$bpffs_c" "$bpffs_k"; do
        mountpoint -q "$mnt" && umount "$mnt"
    done
    if [ -n "$image" ]; then
        podman rmi -f "$image" >/dev/null 2>&1
        rm -f "target/image/steer-ct-$id-${image##*:}.oci.tar"
    fi
    podman rmi -f "$server_image" >/dev/null 2>&1
    [ -n "$pause_image" ] && podman rmi "$pause_image" >/dev/null 2>&1
    rm -rf "$tmp"
}
trap cleanup EXIT

need=()
for tool in podman:podman runc:runc busybox:busybox-static ncat:ncat jq:jq nsenter:util-linux readelf:binutils; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
cat >"$tmp/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
EOF
export CONTAINERS_CONF=$tmp/containers.conf
podman image exists "localhost/podman-pause:$(podman version --format '{{.Client.Version}}')-0" ||
    pause_image="localhost/podman-pause:$(podman version --format '{{.Client.Version}}')-0"

say "building the image (scripts/image.sh)"
image_started=$(date +%s)
scripts/image.sh --tag "localhost/steer-ct-$id" >"$tmp/image.out" 2>"$tmp/image.err" || {
    cat "$tmp/image.err" "$tmp/image.out" >&2
    say "FAIL: scripts/image.sh"
    echo "container tests: 0 passed, 1 failed"
    exit 1
}
read -r image image_size < <(tail -1 "$tmp/image.out")
version=${image##*:}
say "built $image: $image_size bytes ($((image_size / 1024 / 1024)) MiB) in $(($(date +%s) - image_started)) s"
# The host side of the checks uses the same static build.
steerctl=$PWD/target/$(uname -m)-unknown-linux-musl/release/steerctl

mkdir "$tmp/busybox"
cp "$(command -v busybox)" "$tmp/busybox/busybox"
printf 'FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT ["/bin/busybox"]\n' >"$tmp/busybox/Containerfile"
podman build --quiet --tag "$server_image" "$tmp/busybox" >/dev/null

for ns in "$hns" "$cns" "$kns"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
for mnt in "$bpffs_host" "$bpffs_c" "$bpffs_k"; do
    mkdir "$mnt"
    mount -t bpf bpf "$mnt"
done

# --- helpers (each test runs in a subshell with errexit: a failing check ends it)

fail() {
    echo "FAILED: $*" >&2
    exit 1
}
# Containers: --rm, labelled for cleanup.
prun() { podman run --rm --label "steer-ct=$id" "$@"; }
# The static steerctl on the host side, in a test namespace.
host_steerctl() {
    local ns=$1 bpffs=$2
    shift 2
    ip netns exec "$ns" "$steerctl" --bpffs "$bpffs" "$@"
}
bg() {
    "$@" &
    echo $! >>"$tmp/pids"
}
# Polls CMD (every 0.1 s) until it succeeds or SECONDS pass.
wait_until() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$(($(date +%s%N) + seconds * 1000000000))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s%N)" -lt "$deadline" ] || fail "$what: not within ${seconds}s"
        sleep 0.1
    done
}
# What a TCP server at ADDR PORT says first, read in namespace NS (or with
# nsenter ARGS when NS starts with --).
tcp_read() {
    local ns=$1 addr=$2 port=$3
    local cmd=(ip netns exec "$ns")
    [[ $ns == --* ]] && cmd=(nsenter "$ns")
    "${cmd[@]}" timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2" && timeout 3 head -c 200 <&3' _ "$addr" "$port"
}
tcp_says() { [ "$(tcp_read "$1" "$2" "$3" 2>/dev/null)" = "$4" ]; }
# An HTTP/1.0 GET: the status line, headers and body.
http_get() {
    local ns=$1 addr=$2 port=$3 path=$4
    local cmd=(ip netns exec "$ns")
    [[ $ns == --* ]] && cmd=(nsenter "$ns")
    "${cmd[@]}" timeout 5 bash -c \
        'exec 3<>"/dev/tcp/$1/$2" && printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$3" "$1" >&3 && timeout 3 cat <&3' \
        _ "$addr" "$port" "$path"
}
http_ok() {
    local answer
    answer=$(http_get "$@" 2>/dev/null) && [[ ${answer%%$'\r'*} == *" 200 "* ]]
}
listens() { ip netns exec "$1" timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$2" "$3"; }
ncat_server() {
    local ns=$1 port=$2 text=$3
    bg ip netns exec "$ns" ncat -lk 127.0.0.1 "$port" -c "echo $text"
    wait_until "ncat on $port in $ns" 10 listens "$ns" 127.0.0.1 "$port"
}
netns_inode() { stat -L -c %i "$1"; }
program_id() { host_steerctl "$1" "$2" status --json | jq -r '.program.id // empty'; }
link_id() { host_steerctl "$1" "$2" status --json | jq -r '.link.id // empty'; }
expect_in() {
    local text=$1
    shift
    for want in "$@"; do
        [[ $text == *"$want"* ]] || fail "expected '$want' in: $text"
    done
}

passed=0
failed=0
run_test() {
    local name=$1
    local t0
    t0=$(date +%s)
    set +e
    (
        set -e
        "test_$name"
    ) >"$tmp/$name.log" 2>&1
    local rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        say "PASS $name ($(($(date +%s) - t0)) s)"
        sed 's/^/    /' "$tmp/$name.log"
    else
        failed=$((failed + 1))
        say "FAIL $name ($(($(date +%s) - t0)) s)"
        sed 's/^/    /' "$tmp/$name.log"
    fi
}

# What every steer container here gets: the seccomp profile the DaemonSet
# uses (podman's default allows bpf() only with CAP_SYS_ADMIN) and no
# capability but those added.
base=(--security-opt seccomp=unconfined --cap-drop all)
load_caps=(--cap-add BPF --cap-add PERFMON --cap-add NET_ADMIN)
attach_caps=(--cap-add BPF --cap-add NET_ADMIN)
watch_caps=(--cap-add BPF --cap-add NET_ADMIN --cap-add SYS_PTRACE)

# --- (a) the host agent

test_host_agent() {
    mkdir "$tmp/etc-a"
    cat >"$tmp/etc-a/config.json" <<'EOF'
{"bindings": [{"label": "web", "protocol": "tcp", "prefix": "127.0.0.2/32", "port": 80}],
 "registrations": [{"label": "web", "protocol": "tcp", "address": "127.0.0.1", "port": 7777}]}
EOF
    # The host agent: the host's network and PID namespaces ($hns stands in
    # for the host's), the host's bpffs as a volume, the config read-only.
    local agent=(--network "ns:/run/netns/$hns" --pid host -v "$bpffs_host:/sys/fs/bpf"
        -v "$tmp/etc-a:/etc/steer:ro" "${base[@]}")
    ncat_server "$hns" 7777 steered-1
    echo "load, attach, apply: one container each"
    prun "${agent[@]}" "${load_caps[@]}" "$image" load --if-needed
    prun "${agent[@]}" "${attach_caps[@]}" "$image" attach --if-needed
    prun "${agent[@]}" "${watch_caps[@]}" "$image" apply /etc/steer/config.json
    [ -z "$(podman ps -aq --filter "label=steer-ct=$id")" ] || fail "a container is left"
    tcp_says "$hns" 127.0.0.2 80 steered-1 || fail "127.0.0.2:80 is not steered to the host's server after the containers exited"
    echo "steered to the host's server with no container running"
    local program
    program=$(program_id "$hns" "$bpffs_host")
    if [ -z "$program" ] || [ -z "$(link_id "$hns" "$bpffs_host")" ]; then
        fail "not loaded and attached: $(host_steerctl "$hns" "$bpffs_host" status)"
    fi
    [ -d "$bpffs_host/steer/$(netns_inode "/run/netns/$hns")" ] || fail "no state under the host's bpffs for the host's namespace"

    echo "watch and metrics, detached"
    podman run -d --name "steer-ct-$id-watch" --label "steer-ct=$id" "${agent[@]}" "${watch_caps[@]}" \
        "$image" watch /etc/steer/config.json >/dev/null
    podman run -d --name "steer-ct-$id-metrics" --label "steer-ct=$id" "${agent[@]}" "${attach_caps[@]}" \
        "$image" metrics --serve 127.0.0.1:9966 >/dev/null
    wait_until "metrics answering 200" 20 http_ok "$hns" 127.0.0.1 9966 /metrics
    wait_until "watch watching" 20 bash -c "podman logs steer-ct-$id-watch 2>&1 | grep -q 'watching /etc/steer/config.json'"
    echo "the host's server restarts: watch (in its container) registers the new socket"
    kill "$(ip netns pids "$hns" | while read -r p; do [ "$(cat "/proc/$p/comm")" = ncat ] && echo "$p"; done)"
    ncat_server "$hns" 7777 steered-2
    wait_until "the restarted server steered to" 10 tcp_says "$hns" 127.0.0.2 80 steered-2
    local metrics
    metrics=$(http_get "$hns" 127.0.0.1 9966 /metrics)
    grep -Eq '^steer_lookups_total\{label="web",domain="ipv4",protocol="tcp"\} [1-9]' <<<"$metrics" ||
        fail "no lookups counted for web: $metrics"
    echo "metrics: $(grep '^steer_lookups_total{label="web"' <<<"$metrics")"

    echo "upgrade from a container"
    local out
    out=$(prun "${agent[@]}" "${load_caps[@]}" "$image" upgrade)
    expect_in "$out" "upgraded: program $program replaced by"
    [ "$(program_id "$hns" "$bpffs_host")" != "$program" ] || fail "the program id did not change"
    tcp_says "$hns" 127.0.0.2 80 steered-2 || fail "not steered after upgrade"

    echo "stop watch and metrics (SIGTERM)"
    podman stop -t 10 "steer-ct-$id-watch" "steer-ct-$id-metrics" >/dev/null
    for c in watch metrics; do
        [ "$(podman inspect -f '{{.State.ExitCode}}' "steer-ct-$id-$c")" = 0 ] ||
            fail "$c exited with $(podman inspect -f '{{.State.ExitCode}}' "steer-ct-$id-$c"): $(podman logs "steer-ct-$id-$c" 2>&1 | tail -5)"
    done
    local log
    log=$(podman logs "steer-ct-$id-watch" 2>&1)
    echo "$log"
    expect_in "$log" "web tcp 127.0.0.1:7777: registered tcp 127.0.0.1:7777"
    podman rm "steer-ct-$id-watch" "steer-ct-$id-metrics" >/dev/null
    tcp_says "$hns" 127.0.0.2 80 steered-2 || fail "not steered once every container is gone"
    echo "still steered with every container gone: the pins outlive them"
}

# --- (b) another container's network namespace

test_other_netns() {
    mkdir -p "$tmp/www" "$tmp/etc-b"
    echo steered-b >"$tmp/www/index.html"
    cat >"$tmp/etc-b/config.json" <<'EOF'
{"bindings": [{"label": "web", "protocol": "tcp", "prefix": "127.0.0.2/32", "port": 80}],
 "registrations": [{"label": "web", "protocol": "tcp", "address": "127.0.0.1", "port": 8080}]}
EOF
    local server=steer-ct-$id-server
    podman run -d --name "$server" --label "steer-ct=$id" --network none -v "$tmp/www:/www:ro" \
        "$server_image" httpd -f -p 127.0.0.1:8080 -h /www >/dev/null
    local pid
    pid=$(podman inspect -f '{{.State.Pid}}' "$server")
    local inode
    inode=$(netns_inode "/proc/$pid/ns/net")
    wait_until "httpd listening in its container" 10 http_ok "--net=/proc/$pid/ns/net" 127.0.0.1 8080 /
    echo "the server container (pid $pid, netns inode $inode) answers on 127.0.0.1:8080"

    # A steer container elsewhere ($hns), entering the server's namespace:
    # setns() needs CAP_SYS_ADMIN.
    local steer=(--network "ns:/run/netns/$hns" --pid host -v "$bpffs_host:/sys/fs/bpf"
        -v "$tmp/etc-b:/etc/steer:ro" "${base[@]}" "${watch_caps[@]}" --cap-add PERFMON --cap-add SYS_ADMIN)
    for cmd in load attach "apply /etc/steer/config.json"; do
        # shellcheck disable=SC2086 # the command's words
        prun "${steer[@]}" "$image" --netns "/proc/$pid/ns/net" $cmd
    done
    [[ $(http_get "--net=/proc/$pid/ns/net" 127.0.0.2 80 /) == *$'\n'steered-b ]] ||
        fail "127.0.0.2:80 in the server's namespace is not steered to its httpd"
    echo "127.0.0.2:80 inside the server container's namespace reaches its httpd"
    [ -d "$bpffs_host/steer/$inode" ] || fail "no state for the server's namespace ($inode)"

    echo "from inside that namespace (--network container:, --pid container:)"
    local out
    out=$(prun --network "container:$server" --pid "container:$server" -v "$bpffs_host:/sys/fs/bpf" \
        "${base[@]}" "${attach_caps[@]}" --cap-add SYS_ADMIN "$image" status --json)
    [ "$(jq -r .current_netns_inode <<<"$out")" = "$inode" ] || fail "status in the server's namespace: $out"
    [ "$(jq -r .link.netns_inode <<<"$out")" = "$inode" ] || fail "the link is not in the server's namespace: $out"
    out=$(prun --network "container:$server" --pid "container:$server" -v "$bpffs_host:/sys/fs/bpf" \
        "${base[@]}" "${watch_caps[@]}" "$image" list)
    expect_in "$out" web 127.0.0.1:8080 busybox
    echo "$out"

    echo "the server container goes: its state is stale, and gc removes it (and only it)"
    podman rm -f -t 2 "$server" >/dev/null
    local gc=(--network "ns:/run/netns/$hns" --pid host -v "$bpffs_host:/sys/fs/bpf" "${base[@]}" "${attach_caps[@]}")
    wait_until "the server's state seen as stale" 10 bash -c \
        "podman run --rm --label steer-ct=$id ${gc[*]} $image gc --dry-run | grep -q '$inode.*would remove'"
    out=$(prun "${gc[@]}" "$image" gc)
    echo "$out"
    expect_in "$out" "$inode" "removed"
    [ ! -e "$bpffs_host/steer/$inode" ] || fail "gc left $bpffs_host/steer/$inode"
    [ -d "$bpffs_host/steer/$(netns_inode "/run/netns/$hns")" ] || fail "gc removed the live namespace's state"
}

# --- (c) what a container lacks: the message names it, and nothing changes

# Runs steerctl ARGS in a container made with the flags before `--` in
# namespace $cns; it must fail, say every WANT, and leave bpffs and links as
# they were. Prints the message.
refused() {
    local flags=()
    while [ "$1" != -- ]; do
        flags+=("$1")
        shift
    done
    shift
    local args=() wants=()
    while [ "$1" != -- ]; do
        args+=("$1")
        shift
    done
    shift
    wants=("$@")
    local before after out
    before=$(find "$bpffs_c" | sort; bpftool link show | grep -c "netns_ino $(netns_inode "/run/netns/$cns")" || true)
    if out=$(prun "${flags[@]}" "$image" "${args[@]}" 2>&1); then
        fail "steerctl ${args[*]} succeeded: $out"
    fi
    expect_in "$out" "${wants[@]}"
    after=$(find "$bpffs_c" | sort; bpftool link show | grep -c "netns_ino $(netns_inode "/run/netns/$cns")" || true)
    [ "$before" = "$after" ] || fail "steerctl ${args[*]} changed something: before: $before; after: $after"
    echo "$out"
}
c_net=(--network "ns:/run/netns/$cns")
c_vol=(-v "$bpffs_c:/sys/fs/bpf")

test_preflight_no_bpffs() {
    # No volume: /sys/fs/bpf is the container's own sysfs, read-only.
    refused "${c_net[@]}" "${base[@]}" "${load_caps[@]}" -- load -- \
        "/sys/fs/bpf is not on a bpf filesystem" "-v /sys/fs/bpf:/sys/fs/bpf" "hostPath"
}

test_preflight_no_capabilities() {
    # podman's default capabilities: neither CAP_BPF nor CAP_NET_ADMIN.
    refused "${c_net[@]}" "${c_vol[@]}" -- load -- \
        "lacks CAP_BPF and CAP_NET_ADMIN" "--cap-add BPF --cap-add NET_ADMIN" "capabilities.add: [BPF, NET_ADMIN]" \
        "--cap-add PERFMON"
    refused "${c_net[@]}" "${c_vol[@]}" "${base[@]}" --cap-add NET_ADMIN -- status -- \
        "lacks CAP_BPF;" "add it: \`--cap-add BPF\`"
}

test_preflight_seccomp() {
    # The capabilities, but podman's default seccomp profile.
    refused "${c_net[@]}" "${c_vol[@]}" --cap-drop all "${load_caps[@]}" -- load -- \
        "a seccomp filter blocks it" "--security-opt seccomp=unconfined" "seccompProfile.type: Unconfined"
}

test_preflight_read_only_bpffs() {
    refused "${c_net[@]}" -v "$bpffs_c:/sys/fs/bpf:ro" "${base[@]}" "${load_caps[@]}" -- load -- \
        "cannot make /sys/fs/bpf/steer" "mounted read-only" "no \`:ro\`" "readOnly: true"
}

test_preflight_user_namespace() {
    # Every capability, inside a user namespace: none reaches bpf().
    refused --network none --uidmap 0:200000:65536 --gidmap 0:200000:65536 --privileged "${c_vol[@]}" -- load -- \
        "runs in a user namespace (uid map \`0 200000 65536\`)" "--uidmap" "hostUsers: true"
}

test_preflight_no_perfmon() {
    # CAP_BPF without CAP_PERFMON: the verifier refuses the program. The load
    # fails before its state is moved into place; only BPFFS/steer, which
    # steer makes once and keeps, may appear.
    local out
    if out=$(prun "${c_net[@]}" "${c_vol[@]}" "${base[@]}" "${attach_caps[@]}" "$image" load 2>&1); then
        fail "load without CAP_PERFMON succeeded"
    fi
    expect_in "$out" "lacks CAP_PERFMON" "--cap-add PERFMON" "capabilities.add: [PERFMON]"
    echo "$out"
    local left
    left=$(find "$bpffs_c" -mindepth 1 | grep -v -e '/maps.debug$' -e '/progs.debug$' -e '/steer$' || true)
    [ -z "$left" ] || fail "a failed load left $left"
    [[ $(bpftool link show) != *"netns_ino $(netns_inode "/run/netns/$cns")"* ]] || fail "a failed load left a link"
}

test_preflight_no_ptrace() {
    # Loaded and attached properly; registering without CAP_SYS_PTRACE.
    prun "${c_net[@]}" "${c_vol[@]}" "${base[@]}" "${load_caps[@]}" "$image" load >/dev/null
    prun "${c_net[@]}" "${c_vol[@]}" "${base[@]}" "${attach_caps[@]}" "$image" attach >/dev/null
    ncat_server "$cns" 7778 c
    refused "${c_net[@]}" "${c_vol[@]}" --pid host "${base[@]}" "${attach_caps[@]}" -- register web tcp 127.0.0.1 7778 -- \
        "missing capability CAP_SYS_PTRACE" "--cap-add SYS_PTRACE" "--pid host" "hostPID: true"
    [ "$(host_steerctl "$cns" "$bpffs_c" list --json)" = "[]" ] || fail "something was registered"
}

# --- the Kubernetes manifests under podman kube play

# deploy/kubernetes as this podman can play it, and only as far as it must
# differ: podman 4.3 has no DaemonSet (a Deployment of the same template),
# maps containerPorts only with bridge networking (ports dropped: with host
# networking they only name the port), restarts init containers under
# restartPolicy Always (OnFailure), reads the seccomp annotation rather than
# seccompProfile, and ignores hostPID. The bpffs hostPath is the test's.
kube_yaml() {
    local manifests=deploy/kubernetes
    cat "$manifests/configmap.yaml"
    echo ---
    sed -e 's/^kind: DaemonSet$/kind: Deployment/' \
        -e "0,/^  name: steer$/s//  name: steer-ct-$id/" \
        -e "s|image: localhost/steer:$version$|image: $image|" \
        -e "s|path: /sys/fs/bpf$|path: $bpffs_k|" \
        -e 's|^        prometheus.io/path: /metrics$|&\n        seccomp.security.alpha.kubernetes.io/pod: unconfined|' \
        -e 's|^      hostNetwork: true$|      restartPolicy: OnFailure\n&|' \
        "$manifests/daemonset.yaml" |
        awk '
            function indent(s) { match(s, /^ */); return RLENGTH }
            skip && (/^ *$/ || indent($0) > depth) { next }
            { skip = 0 }
            /^ *ports:$/ { skip = 1; depth = indent($0); next }
            { print }'
}

# The probe of kind KIND (readinessProbe, livenessProbe) in the manifest: "path port" or "tcp port".
probe() {
    awk -v kind="$1" '
        $1 == kind ":" { on = 1; next }
        on && $1 == "path:" { path = $2 }
        on && $1 == "port:" { port = $2 }
        on && $1 == "tcpSocket:" { path = "tcp" }
        on && /^ *[a-zA-Z]+Probe:/ { on = 0 }
        on && port { print path, port; exit }' deploy/kubernetes/daemonset.yaml
}

test_kube() {
    local manifests=deploy/kubernetes
    grep -q "image: localhost/steer:$version$" "$manifests/daemonset.yaml" ||
        fail "daemonset.yaml's images are not localhost/steer:$version (the package version)"
    local others
    others=$(grep '^ *image:' "$manifests/daemonset.yaml" | grep -v "localhost/steer:$version$" || true)
    [ -z "$others" ] || fail "daemonset.yaml has an image other than localhost/steer:$version: $others"
    grep -q "newTag: $version$" "$manifests/kustomization.yaml" || fail "kustomization.yaml's newTag is not $version"
    kube_yaml >"$kube_file"
    [ "$(grep -c "image: $image$" "$kube_file")" = 5 ] || fail "the template has not 5 steer containers"

    # The node: $kns, with 192.0.2.0/24 routed locally as the ConfigMap says,
    # and a server on 127.0.0.1:8080.
    ip -n "$kns" route add local 192.0.2.0/24 dev lo
    ncat_server "$kns" 8080 kube-1
    local pod=steer-ct-$id-pod-0
    echo "podman kube play (host network: $kns)"
    # podman runs the init containers in order, each to completion, and
    # fails the play if one fails; then it removes them.
    nsenter --net="/run/netns/$kns" podman kube play "$kube_file" >"$tmp/play.out" 2>&1 ||
        fail "podman kube play: $(cat "$tmp/play.out")"
    if [ -z "$(program_id "$kns" "$bpffs_k")" ] || [ -z "$(link_id "$kns" "$bpffs_k")" ]; then
        fail "the init containers did not load and attach: $(host_steerctl "$kns" "$bpffs_k" status)"
    fi
    echo "  init containers: loaded, upgraded and attached (program $(program_id "$kns" "$bpffs_k"))"
    read -r path port < <(probe readinessProbe)
    if [ "$path" != /metrics ] || [ "$port" != 9966 ]; then
        fail "the readiness probe is $path $port, not /metrics 9966"
    fi
    wait_until "the readiness probe (GET $path on $port) answering 200" 30 http_ok "$kns" 127.0.0.1 "$port" "$path"
    read -r path port < <(probe livenessProbe)
    [ "$path" = tcp ] || fail "the liveness probe is not tcpSocket"
    listens "$kns" 127.0.0.1 "$port" || fail "the liveness probe's port $port does not accept"
    echo "  probes: readiness GET /metrics 200, liveness tcp $port accepts"
    wait_until "watch applying the ConfigMap's bindings" 20 bash -c \
        "podman logs $pod-watch 2>&1 | grep -q 'bound web tcp 192.0.2.0/24 80'"
    echo "  watch: $(podman logs "$pod-watch" 2>&1 | grep 'bound web')"
    # podman 4.3 ignores hostPID, so this watch cannot see the node's
    # processes: the registration is made as in the host-agent test.
    prun --network "ns:/run/netns/$kns" --pid host -v "$bpffs_k:/sys/fs/bpf" "${base[@]}" "${watch_caps[@]}" \
        "$image" register web tcp 127.0.0.1 8080
    wait_until "192.0.2.7:80 steered" 10 tcp_says "$kns" 192.0.2.7 80 kube-1
    # What `kubectl exec POD -c watch -- steerctl ...` runs: the image's PATH,
    # the watch container's capabilities. A host-network container has no
    # network namespace of its own, so exec joins the caller's: $kns.
    local exec=(nsenter --net="/run/netns/$kns" podman exec "$pod-watch")
    expect_in "$("${exec[@]}" steerctl bindings)" web tcp 192.0.2.0/24
    # (its owner shows as "-": podman 4.3 gives the pod no host PID namespace)
    expect_in "$("${exec[@]}" steerctl list)" web 127.0.0.1:8080
    expect_in "$("${exec[@]}" steerctl metrics)" web ipv4 tcp
    echo "  exec in watch: steerctl bindings, list and metrics answer"
    local program link
    program=$(program_id "$kns" "$bpffs_k")
    link=$(link_id "$kns" "$bpffs_k")

    echo "rolling replace (the old pod goes, the new one runs upgrade) under a client loop"
    rm -f "$tmp/stop"
    bg ip netns exec "$kns" bash -c '
        ok=0 bad=0 end=$((SECONDS + 180))
        for ((i = 0; i < 5000 && SECONDS < end; i++)); do
            if [ "$(timeout 2 bash -c "exec 3<>/dev/tcp/192.0.2.7/80 && head -c 20 <&3" 2>/dev/null)" = kube-1 ]; then
                ok=$((ok + 1))
            else
                bad=$((bad + 1))
            fi
            [ -e "$1/stop" ] && break
        done
        echo "$ok $bad" >"$1/loop.out"' _ "$tmp"
    nsenter --net="/run/netns/$kns" podman kube play --replace "$kube_file" >"$tmp/play.out" 2>&1 ||
        fail "podman kube play --replace: $(cat "$tmp/play.out")"
    wait_until "the new pod ready" 30 http_ok "$kns" 127.0.0.1 9966 /metrics
    touch "$tmp/stop"
    wait_until "the client loop" 30 test -s "$tmp/loop.out"
    local ok bad
    read -r ok bad <"$tmp/loop.out"
    echo "  connections during the replace: $ok answered, $bad failed"
    if [ "$bad" != 0 ] || [ "$ok" -lt 10 ]; then
        fail "$bad of $((ok + bad)) connections failed during the replace"
    fi
    [ "$(program_id "$kns" "$bpffs_k")" != "$program" ] || fail "the program id did not change"
    [ "$(link_id "$kns" "$bpffs_k")" = "$link" ] || fail "the link changed: $link -> $(link_id "$kns" "$bpffs_k")"
    echo "  program $program -> $(program_id "$kns" "$bpffs_k"), link $link kept"

    echo "removal: the pod goes, steering stays"
    podman kube down "$kube_file" >"$tmp/down.out" 2>&1 || fail "podman kube down: $(cat "$tmp/down.out")"
    ! podman pod exists "$pod" || fail "the pod is still there"
    tcp_says "$kns" 192.0.2.7 80 kube-1 || fail "not steered once the pod is gone"
    echo "removal on purpose: steerctl unload, as kubectl debug node runs it (the node's / at /host)"
    prun --network "ns:/run/netns/$kns" --privileged -v "$bpffs_k:/host/sys/fs/bpf" "$image" \
        --bpffs /host/sys/fs/bpf unload >/dev/null
    ! tcp_says "$kns" 192.0.2.7 80 kube-1 || fail "still steered after unload"
    [ ! -e "$bpffs_k/steer/$(netns_inode "/run/netns/$kns")" ] || fail "unload left the state directory"
}

tests=(host_agent other_netns preflight_no_bpffs preflight_no_capabilities preflight_seccomp
    preflight_read_only_bpffs preflight_user_namespace preflight_no_perfmon preflight_no_ptrace kube)
for name in "${@:-${tests[@]}}"; do
    run_test "$name"
done
say "$(($(date +%s) - started)) s in all (image $image_size bytes)"
echo "container tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

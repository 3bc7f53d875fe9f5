#!/usr/bin/env bash
# Builds the Debian package and tries it on this machine: installs it with
# dpkg, checks what it holds, verifies its systemd units, runs the units'
# commands and the walkthrough with the installed binaries in throwaway
# network namespaces (under the units' capability bounding sets), then
# removes and purges it and checks nothing is left. Then it upgrades to it
# from the previous release's package (scripts/old-release.sh) while that
# one steers real connections, and checks that none was refused or
# misdirected. Whatever happens, the package does not stay installed.
# Run as root (it re-runs itself under sudo); scripts/test.sh runs it.
set -euo pipefail
source "$(dirname "$0")/common.sh"
scripts/setup.sh --test

say() { echo "package-test: $*"; }
fail() {
    echo "package-test: FAIL: $*" >&2
    exit 1
}
started=$(date +%s)

if dpkg-query -W -f='${Status}' steer 2>/dev/null | grep -q ' installed'; then
    fail "the steer package is already installed here; this test installs and purges it, so remove it first"
fi

tmp=$(mktemp -d)
mkdir "$tmp/trace"
ns=steer-pkg-$$
ns_up=steer-pkg-up-$$
cleanup() {
    for n in "$ns" "$ns_up"; do
        for pid in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$n" 2>/dev/null || true
    done
    if dpkg-query -W steer >/dev/null 2>&1; then
        dpkg --purge steer >/dev/null 2>&1 || echo "package-test: could not purge steer" >&2
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# First, as building it cleans this tree's own crates out of the release
# build (cached after the first run).
say "building the previous release (scripts/old-release.sh)"
old_dir=$(scripts/old-release.sh) || fail "scripts/old-release.sh could not build the previous release"
say "building (release) and packaging"
deb=$(scripts/package.sh)
say "built $deb ($(stat -c %s "$deb") bytes) in $(($(date +%s) - started)) s"

say "installing"
dpkg -i "$deb" >"$tmp/dpkg.out" 2>&1 || {
    cat "$tmp/dpkg.out" >&2
    fail "dpkg -i"
}
dpkg -L steer | sort >"$tmp/files"
units=(steer.service steer-metrics.service steer-watch.service)
expected=(/usr/bin/steerctl /usr/bin/sockmap-update /usr/bin/sk-lookup-attach
    /usr/share/man/man1/steerctl.1.gz /usr/share/man/man1/steerctl-metrics.1.gz
    /usr/share/man/man1/sockmap-update.1.gz /usr/share/man/man1/sk-lookup-attach.1.gz
    /usr/share/bash-completion/completions/steerctl /usr/share/zsh/vendor-completions/_steerctl
    /usr/share/fish/vendor_completions.d/steerctl.fish)
for unit in "${units[@]}"; do expected+=("/usr/lib/systemd/system/$unit"); done
# The documentation: the README and every page of docs/ it links to.
for doc in README.md docs/*.md; do expected+=("/usr/share/doc/steer/$doc"); done
for path in "${expected[@]}"; do
    grep -qx "$path" "$tmp/files" || fail "the package lacks $path"
    [ -e "$path" ] || fail "$path is not installed"
done
[ "$(command -v steerctl)" = /usr/bin/steerctl ] || fail "steerctl on PATH is $(command -v steerctl), not the package's"
steerctl --version | grep -qx "steerctl $(dpkg-query -W -f='${Version}' steer | sed 's/-[^-]*$//')" ||
    fail "steerctl --version does not match the package: $(steerctl --version)"
man -w steerctl-metrics >/dev/null || fail "man steerctl-metrics not found"
bash -c 'source /usr/share/bash-completion/completions/steerctl && complete -p steerctl' >/dev/null ||
    fail "the bash completion does not load"

say "systemd-analyze verify"
for unit in "${units[@]}"; do
    out=$(systemd-analyze verify "/usr/lib/systemd/system/$unit" 2>&1) || fail "verify $unit: $out"
    [ -z "$out" ] || fail "verify $unit: $out"
    score=$(systemd-analyze security --offline=yes "/usr/lib/systemd/system/$unit" 2>/dev/null | tail -1)
    say "  $unit: verified; ${score#→ }"
done

# A unit's commands, as that unit runs them: the bounding set and
# no_new_privs it sets. Root otherwise, like the units.
bounding_set() {
    local caps
    caps=$(sed -n 's/^CapabilityBoundingSet=//p' "/usr/lib/systemd/system/$1")
    [ -n "$caps" ] || fail "$1 sets no CapabilityBoundingSet"
    echo "-all$(for c in $caps; do c=${c#CAP_}; printf ',+%s' "${c,,}"; done)"
}
as_unit() {
    local set=$1
    shift
    setpriv --no-new-privs --inh-caps=-all --bounding-set="$set" "$@"
}
steer_set=$(bounding_set steer.service)
metrics_set=$(bounding_set steer-metrics.service)
watch_set=$(bounding_set steer-watch.service)

say "steer.service's commands, twice (a restart finds the pins in place), then steer-watch.service's and steer-metrics.service's"
ip netns add "$ns"
ip -n "$ns" link set lo up
sed -n 's/^ExecStart=//p' /usr/lib/systemd/system/steer.service >"$tmp/steer.exec"
metrics_exec=$(sed -n 's/^ExecStart=//p' /usr/lib/systemd/system/steer-metrics.service)
[ ! -e /etc/steer/config.json ] || say "  note: /etc/steer/config.json exists here, so steer.service applies it"
export steer_set metrics_set watch_set metrics_exec tmp
cat >"$tmp/units.sh" <<'UNITS'
set -euo pipefail
mount -t bpf bpf /sys/fs/bpf
# ip netns exec's fresh /sys hides the cgroup v2 hierarchy a unit sees on a
# systemd host (following attaches there): mounted back, as scripts/demo.sh does.
grep -q ' - cgroup2 ' /proc/self/mountinfo || mount -t cgroup2 none /sys/fs/cgroup
n=0
for round in 1 2; do
    while read -r cmd; do
        # shellcheck disable=SC2086 # the unit's words, as systemd splits them (no quotes but sh -c's)
        as_steer=(setpriv --no-new-privs --inh-caps=-all --bounding-set="$steer_set"
            strace -f -qq -o "$tmp/trace/steer.service.$round.$((++n))")
        if [[ $cmd == "/bin/sh -c "* ]]; then
            script=${cmd#/bin/sh -c \'}
            "${as_steer[@]}" /bin/sh -c "${script%\'}"
        else
            "${as_steer[@]}" $cmd
        fi >>"$tmp/units.out"
    done <"$tmp/steer.exec"
done
grep -q '^already loaded' "$tmp/units.out"
grep -q '^already attached' "$tmp/units.out"
/usr/bin/steerctl bind echo tcp 127.0.0.2 80 >/dev/null
# steer-watch.service's command on a config of its own: it registers the
# server, re-registers it after a restart, and exits 0 on SIGTERM.
echo '{"registrations": [{"label": "echo", "protocol": "tcp", "address": "127.0.0.1", "port": 7777}]}' >"$tmp/watch.json"
ncat -lk 127.0.0.1 7777 -c 'echo watched' &
server=$!
setpriv --no-new-privs --inh-caps=-all --bounding-set="$watch_set" \
    strace -f -qq -o "$tmp/trace/steer-watch.service" /usr/bin/steerctl watch "$tmp/watch.json" 2>"$tmp/watch.err" &
watcher=$!
trap 'cat "$tmp/watch.err" >&2' ERR
answers() {
    for _ in $(seq 100); do
        [ "$(ncat --recv-only 127.0.0.2 80 </dev/null 2>/dev/null)" = watched ] && return 0
        sleep 0.1
    done
    return 1
}
answers
kill "$server"
wait "$server" || true
ncat -lk 127.0.0.1 7777 -c 'echo watched' &
server=$!
answers
kill -TERM "$(pgrep -P "$watcher")"
wait "$watcher" # 0 after SIGTERM
kill "$server"
wait "$server" || true
trap - ERR
# shellcheck disable=SC2086
setpriv --no-new-privs --inh-caps=-all --bounding-set="$metrics_set" \
    strace -f -qq -o "$tmp/trace/steer-metrics.service" $metrics_exec 2>"$tmp/metrics.err" &
tracer=$!
for _ in $(seq 100); do
    ncat -z 127.0.0.1 9966 2>/dev/null && break
    sleep 0.1
done
trap 'cat "$tmp/metrics.err" >&2' ERR
printf 'GET /metrics HTTP/1.1\r\nHost: steer\r\nConnection: close\r\n\r\n' | ncat 127.0.0.1 9966 >"$tmp/scrape"
head -1 "$tmp/scrape" | grep -q '^HTTP/1.1 200 OK' || { cat "$tmp/scrape" "$tmp/metrics.err" >&2; exit 1; }
grep -q '^steer_lookups_total{label="echo",' "$tmp/scrape"
sed '1,/^\r$/d' "$tmp/scrape" | promtool check metrics
# Also the 404 and, after unload, the 503 paths.
printf 'GET /other HTTP/1.1\r\nHost: steer\r\nConnection: close\r\n\r\n' | ncat 127.0.0.1 9966 | head -1 | grep -q ' 404 '
/usr/bin/steerctl unload >/dev/null
printf 'GET /metrics HTTP/1.1\r\nHost: steer\r\nConnection: close\r\n\r\n' | ncat 127.0.0.1 9966 | head -1 | grep -q ' 503 '
kill -TERM "$(pgrep -P "$tracer")"
wait "$tracer" # strace exits with its tracee's status: 0 after SIGTERM
UNITS
ip netns exec "$ns" bash "$tmp/units.sh" || fail "running the units' commands"
ip netns del "$ns"

say "the walkthrough (scripts/demo.sh) with the installed tools, under steer.service's bounding set"
mkdir "$tmp/bin"
for tool in steerctl sockmap-update sk-lookup-attach; do
    printf '#!/bin/sh\nexec setpriv --no-new-privs --inh-caps=-all --bounding-set=%s strace -f -qq -o %s.$$ /usr/bin/%s "$@"\n' \
        "$steer_set" "$tmp/trace/steer.service.demo" "$tool" >"$tmp/bin/$tool"
    chmod 755 "$tmp/bin/$tool"
done
STEER_BIN_DIR=$tmp/bin scripts/demo.sh >"$tmp/demo.out" 2>&1 || {
    cat "$tmp/demo.out" >&2
    fail "the walkthrough with the installed binaries"
}
for line in 'hello 7' 'hello 77' 'hello 777' 'hello label' 'open tcp 777'; do
    grep -qx "$line" "$tmp/demo.out" || fail "the walkthrough did not print '$line'"
done

say "system calls and socket families used stay inside each unit's SystemCallFilter and RestrictAddressFamilies"
# A systemd syscall group or name, expanded to syscall names.
expand_syscalls() {
    local tok
    for tok in "$@"; do
        if [[ $tok == @* ]]; then
            # shellcheck disable=SC2046 # one name per line
            expand_syscalls $(systemd-analyze syscall-filter "$tok" | tail -n +2 | grep -v '^ *#' | tr -d ' ')
        else
            echo "$tok"
        fi
    done
}
# Checks the system calls and socket families in the strace output files
# given against unit $1's SystemCallFilter and RestrictAddressFamilies (of
# the installed unit file); $2 names the commands traced.
check_syscalls() {
    local unit=$1 what=$2 outside families allowed family
    shift 2
    # shellcheck disable=SC2046
    expand_syscalls $(sed -n 's/^SystemCallFilter=//p' "/usr/lib/systemd/system/$unit") | sort -u >"$tmp/$unit.allowed"
    [ -s "$tmp/$unit.allowed" ] || fail "$unit sets no SystemCallFilter"
    cat "$@" | grep -oE '^[0-9]+ +[a-z0-9_]+\(' |
        sed -E 's/^[0-9]+ +//; s/\($//' | sort -u >"$tmp/$unit.used"
    [ "$(wc -l <"$tmp/$unit.used")" -gt 20 ] || fail "no trace of $what"
    outside=$(comm -23 "$tmp/$unit.used" "$tmp/$unit.allowed" | paste -sd ' ')
    [ -z "$outside" ] || fail "$what call $outside outside $unit's SystemCallFilter"
    # And the socket families against RestrictAddressFamilies.
    families=$(cat "$@" | grep -oE '^[0-9]+ +socket\(AF_[A-Z0-9]+' | sed 's/.*(//' | sort -u | paste -sd ' ')
    allowed=" $(sed -n 's/^RestrictAddressFamilies=//p' "/usr/lib/systemd/system/$unit") "
    for family in $families; do
        [[ $allowed == *" $family "* ]] || fail "$what open $family sockets outside $unit's RestrictAddressFamilies"
    done
    say "  $what: $(wc -l <"$tmp/$unit.used") distinct system calls, all allowed; socket families: ${families:-none}"
}
for unit in "${units[@]}"; do check_syscalls "$unit" "$unit's commands" "$tmp/trace/$unit"*; done

# Removes, then purges the package, checking nothing of it is left.
remove_and_purge() {
    say "removing, then purging"
    dpkg -r steer >"$tmp/dpkg.out" 2>&1 || {
        cat "$tmp/dpkg.out" >&2
        fail "dpkg -r"
    }
    for path in "${expected[@]}"; do [ ! -e "$path" ] || fail "$path is still there after dpkg -r"; done
    dpkg --purge steer >"$tmp/dpkg.out" 2>&1 || {
        cat "$tmp/dpkg.out" >&2
        fail "dpkg --purge"
    }
    ! dpkg-query -W steer >/dev/null 2>&1 || fail "dpkg still knows the steer package after --purge"
    while read -r path; do
        [ -d "$path" ] || [ ! -e "$path" ] || fail "$path is still there after purge"
    done <"$tmp/files"
    for unit in "${units[@]}"; do
        for left in /etc/systemd/system/"$unit" /etc/systemd/system/*.wants/"$unit" \
            /var/lib/systemd/deb-systemd-helper-enabled/"$unit"* /var/lib/systemd/deb-systemd-helper-masked/"$unit"; do
            if [ -e "$left" ] || [ -L "$left" ]; then fail "$left is left after purge"; fi
        done
    done
    [ ! -e /usr/share/doc/steer ] || fail "/usr/share/doc/steer is left after purge"
}
remove_and_purge

# The upgrade a host running steer goes through: the previous release's
# package installed, its steer.service started, steering real traffic; then
# `dpkg -i` of this one, whose postinst restarts steer.service, whose first
# command, `steerctl upgrade --if-needed`, moves the state to this
# release's programs and layout. A client loop connects to the binding all
# along; not one connection may be refused or answered by anyone else.
old_deb=$old_dir/steer_old.deb
old_layout=$(cat "$old_dir/layout")
current_layout=$(sed -n 's/^pub const LAYOUT_VERSION: u32 = \([0-9]*\);/\1/p' steer-common/src/lib.rs)
say "upgrading from the previous release's package (${old_dir##*/}, layout $old_layout) to this one (layout $current_layout) under a client loop"
upgrade_started=$(date +%s)
# PID 1 is not systemd here, so the maintainer scripts' `[ -d
# /run/systemd/system ]` would skip the restart. The namespace below makes
# that directory (on a tmpfs of its own mount namespace) and puts this
# systemctl first on PATH: it stands in for systemd, running a unit's
# ExecStart lines as systemd runs a oneshot unit's (in order, stopping at
# the first failure, stdin /dev/null, output to a journal, under the unit's
# CapabilityBoundingSet and no_new_privs), traced, and remembers which
# units are active, so try-restart restarts only those. Any other request
# is logged as unexpected and fails the test.
mkdir "$tmp/sbin" "$tmp/active" "$tmp/trace-upgrade"
{
    echo '#!/bin/bash'
    echo '# package-test.sh'"'"'s systemctl: see the comment there.'
    printf 'tmp=%q\n' "$tmp"
    cat <<'SYSTEMCTL'
set -uo pipefail
echo "systemctl $*" >>"$tmp/systemctl.log"
words=()
for arg; do [[ $arg == -* ]] || words+=("$arg"); done
verb=${words[0]:-}
units=("${words[@]:1}")
start() {
    local unit=$1 file=/usr/lib/systemd/system/$1 caps set cmd n=0 script
    caps=$(sed -n 's/^CapabilityBoundingSet=//p' "$file")
    set="-all$(for c in $caps; do c=${c#CAP_}; printf ',+%s' "${c,,}"; done)"
    while read -r cmd; do
        n=$((n + 1))
        echo "$unit ($verb): $cmd" >>"$tmp/journal"
        as_unit=(setpriv --no-new-privs --inh-caps=-all --bounding-set="$set"
            strace -f -qq -o "$tmp/trace-upgrade/$unit.$verb.$$.$n")
        if [[ $cmd == "/bin/sh -c "* ]]; then
            script=${cmd#/bin/sh -c \'}
            "${as_unit[@]}" /bin/sh -c "${script%\'}"
        else
            # shellcheck disable=SC2086 # the unit's words, as systemd splits them
            "${as_unit[@]}" $cmd
        fi </dev/null >>"$tmp/journal" 2>&1 || {
            echo "$unit: failed: $cmd" >>"$tmp/journal"
            rm -f "$tmp/active/$unit"
            return 1
        }
    done < <(sed -n 's/^ExecStart=//p' "$file")
    touch "$tmp/active/$unit"
}
case $verb in
daemon-reload) ;;
is-active) [ -e "$tmp/active/${units[0]}" ] || exit 3 ;;
is-enabled)
    echo disabled
    exit 1
    ;;
start | restart | try-restart)
    for unit in "${units[@]}"; do
        [ "$verb" != try-restart ] || [ -e "$tmp/active/$unit" ] || continue
        if [ "$unit" != steer.service ]; then
            echo "unexpected: systemctl $*" >>"$tmp/systemctl.log"
            exit 1
        fi
        start "$unit" || exit 1
    done
    ;;
*)
    echo "unexpected: systemctl $*" >>"$tmp/systemctl.log"
    exit 1
    ;;
esac
SYSTEMCTL
} >"$tmp/sbin/systemctl"
chmod 755 "$tmp/sbin/systemctl"
ip netns add "$ns_up"
ip -n "$ns_up" link set lo up
export deb old_deb old_layout current_layout
cat >"$tmp/upgrade.sh" <<'UPGRADE'
set -euo pipefail
say() { echo "package-test: $*"; }
fail() {
    echo "package-test: FAIL: $*" >&2
    exit 1
}
mount -t bpf bpf /sys/fs/bpf
grep -q ' - cgroup2 ' /proc/self/mountinfo || mount -t cgroup2 none /sys/fs/cgroup
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir /run/systemd/system
# Container images forbid maintainer scripts to start or restart services
# (a policy-rc.d that exits 101); a host has no such policy, so here, in
# this mount namespace only, it allows them.
if [ -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 0\n' >"$tmp/policy-rc.d"
    chmod 755 "$tmp/policy-rc.d"
    mount --bind "$tmp/policy-rc.d" /usr/sbin/policy-rc.d
fi
export PATH=$tmp/sbin:$PATH

dpkg -i "$old_deb" >"$tmp/dpkg.out" 2>&1 || {
    cat "$tmp/dpkg.out" >&2
    fail "dpkg -i of the previous release's package"
}
systemctl start steer.service || {
    cat "$tmp/journal" >&2
    fail "the previous release's steer.service"
}
# An ncat on addr:port answering each connection with a line; returns once
# it listens (its own "Listening on" line), its log drained from then on.
servers=()
start_server() {
    local fifo=$tmp/server.$1.$2 log line
    mkfifo "$fifo"
    ncat -v -lk "$1" "$2" -e "/bin/echo $3" </dev/null >/dev/null 2>"$fifo" &
    servers+=($!)
    exec {log}<"$fifo"
    while read -r -t 10 -u "$log" line; do
        if [[ $line == *"Listening on"* ]]; then
            cat <&"$log" >/dev/null 2>&1 &
            exec {log}<&-
            return 0
        fi
    done
    fail "ncat on $1:$2 did not start listening"
}
# The server the binding steers to, and a decoy: a plain listener on one of
# the binding's addresses, which a connection gets when steering misses.
start_server 127.0.0.1 7777 steered
start_server 127.0.0.81 80 decoy
# What an operator does with the installed tools.
/usr/bin/steerctl bind web tcp 127.0.0.0/8 80 >/dev/null
/usr/bin/steerctl register web tcp 127.0.0.1 7777 >/dev/null
snapshot() {
    /usr/bin/steerctl --json bindings | jq -S . >"$tmp/$1.bindings"
    /usr/bin/steerctl --json list |
        jq -S '[.[] | {label: .label, protocol, family, address, cookie, no_reuseport}] | sort' >"$tmp/$1.list"
    /usr/bin/steerctl --json status >"$tmp/$1.status"
}
snapshot before
[ "$(jq '.bindings | length' "$tmp/before.bindings")" = 1 ] || fail "the previous release did not bind: $(cat "$tmp/before.bindings")"
[ "$(jq length "$tmp/before.list")" = 1 ] || fail "the previous release did not register: $(cat "$tmp/before.list")"
jq -e --argjson v "$old_layout" '(.layout_version // $v) == $v' "$tmp/before.status" >/dev/null ||
    fail "the previous release's state is not at layout $old_layout: $(cat "$tmp/before.status")"

# The client loop: one connection at a time, alternately to 127.0.0.80:80
# (nothing listens there: refused if steering misses) and 127.0.0.81:80
# (the decoy's: misdirected if it misses), each reading one line. It says
# "ready" after 20 steered connections, and stops 20 steered connections
# after the upgrade is done; bounded by 100,000 connections and 120 s.
clients() {
    local i=0 ok=0 refused=0 misdirected=0 other=0 after=-1 said=0 fd reply addr
    local deadline=$((SECONDS + 120))
    while [ "$i" -lt 100000 ] && [ "$SECONDS" -lt "$deadline" ]; do
        addr=127.0.0.$((80 + i % 2))
        i=$((i + 1))
        if { exec {fd}<>"/dev/tcp/$addr/80"; } 2>>"$tmp/clients.err"; then
            reply=
            read -r -t 5 -u "$fd" reply || true
            exec {fd}<&-
            case $reply in
            steered) ok=$((ok + 1)) ;;
            decoy)
                misdirected=$((misdirected + 1))
                echo "connection $i to $addr:80 went to the decoy" >>"$tmp/clients.err"
                ;;
            *)
                other=$((other + 1))
                echo "connection $i to $addr:80 answered '$reply'" >>"$tmp/clients.err"
                ;;
            esac
        else
            refused=$((refused + 1))
            echo "connection $i to $addr:80 refused" >>"$tmp/clients.err"
        fi
        if [ "$said" = 0 ] && [ "$ok" -ge 20 ]; then
            echo ready >"$tmp/ready"
            said=1
        fi
        if [ "$after" -lt 0 ] && [ -e "$tmp/upgraded" ]; then after=$ok; fi
        if [ "$after" -ge 0 ] && [ "$ok" -ge $((after + 20)) ]; then break; fi
    done
    echo "$i $ok $refused $misdirected $other $after" >"$tmp/clients.out"
}
mkfifo "$tmp/ready"
exec {ready}<>"$tmp/ready"
clients &
client=$!
read -r -t 60 -u "$ready" _ || fail "the client loop made no 20 steered connections before the upgrade: $(cat "$tmp/clients.err")"
from=$(date +%s%N)
dpkg -i "$deb" >"$tmp/dpkg.out" 2>&1 || {
    cat "$tmp/dpkg.out" >&2
    fail "dpkg -i of this package over the previous release's"
}
took=$((($(date +%s%N) - from) / 1000000))
touch "$tmp/upgraded"
wait "$client"
read -r tried ok refused misdirected other after <"$tmp/clients.out"
say "  $tried connections across the upgrade (dpkg -i took $took ms): $ok steered, $refused refused, $misdirected misdirected, $other otherwise failed"
[ "$after" -ge 0 ] || fail "the client loop reached its bound before the upgrade was done"
[ $((refused + misdirected + other)) = 0 ] || fail "connections failed during the upgrade: $(head -20 "$tmp/clients.err")"

# The postinst restarted steer.service, and its commands did the upgrade.
grep -q '^unexpected' "$tmp/systemctl.log" && fail "$(grep '^unexpected' "$tmp/systemctl.log")"
grep -q ' try-restart steer.service$' "$tmp/systemctl.log" ||
    fail "the postinst did not restart steer.service: $(cat "$tmp/systemctl.log")"
grep -q ': failed: ' "$tmp/journal" && fail "steer.service failed: $(cat "$tmp/journal")"
if [ "$old_layout" -lt "$current_layout" ]; then
    grep -q "^upgraded: migrated .* from layout $old_layout .* to layout $current_layout " "$tmp/journal" ||
        fail "steer.service's restart did not migrate the state: $(cat "$tmp/journal")"
fi
say "  steer.service's restart: $(grep -m1 -E '^(upgraded|up to date)' "$tmp/journal")"
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/steerctl | cmp -s - /usr/bin/steerctl ||
    fail "/usr/bin/steerctl is not this package's"

# The same state, now this release's: the same link, running this
# release's program (a new one, from an older layout), at this layout,
# steering the same bindings to the same sockets.
snapshot after
jq -e --argjson v "$current_layout" '.layout.version == $v and .layout_version == $v and .layout.upgrade == "nothing"' \
    "$tmp/after.status" >/dev/null || fail "the state is not at layout $current_layout after the upgrade: $(cat "$tmp/after.status")"
[ "$(jq .link.id "$tmp/after.status")" = "$(jq .link.id "$tmp/before.status")" ] || fail "the link was replaced"
jq -e '.link.program_id == .program.id' "$tmp/after.status" >/dev/null || fail "the link runs another program"
if [ "$old_layout" -lt "$current_layout" ] &&
    [ "$(jq .program.id "$tmp/after.status")" = "$(jq .program.id "$tmp/before.status")" ]; then
    fail "the link still runs the previous release's program"
fi
for what in bindings list; do
    diff -u "$tmp/before.$what" "$tmp/after.$what" >&2 || fail "the $what changed in the upgrade"
done
say "  status: layout $(/usr/bin/steerctl status | sed -n 's/^│ layout *│ \(.*[^ ]\) *│$/\1/p'); bindings and registrations as before"
kill "${servers[@]}"
wait "${servers[@]}" 2>/dev/null || true
UPGRADE
ip netns exec "$ns_up" bash "$tmp/upgrade.sh" || fail "upgrading from the previous release's package"
for pid in $(ip netns pids "$ns_up"); do kill -9 "$pid" 2>/dev/null || true; done
ip netns del "$ns_up"
dpkg -L steer | sort | diff -u "$tmp/files" - >&2 || fail "the upgraded package's files are not a fresh install's"
check_syscalls steer.service "steer.service's commands restarted by the upgrade" "$tmp/trace-upgrade/steer.service.try-restart."*
say "  the upgrade, from installing the previous release: $(($(date +%s) - upgrade_started)) s"
remove_and_purge
say "ok in $(($(date +%s) - started)) s"

#!/usr/bin/env bash
# Builds the Debian package and tries it on this machine: installs it with
# dpkg, checks what it holds, verifies its systemd units, runs the units'
# commands and the walkthrough with the installed binaries in throwaway
# network namespaces (under the units' capability bounding sets), then
# removes and purges it and checks nothing is left. Whatever happens, the
# package does not stay installed.
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
cleanup() {
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
    if dpkg-query -W steer >/dev/null 2>&1; then
        dpkg --purge steer >/dev/null 2>&1 || echo "package-test: could not purge steer" >&2
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

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
for unit in "${units[@]}"; do
    # shellcheck disable=SC2046
    expand_syscalls $(sed -n 's/^SystemCallFilter=//p' "/usr/lib/systemd/system/$unit") | sort -u >"$tmp/$unit.allowed"
    [ -s "$tmp/$unit.allowed" ] || fail "$unit sets no SystemCallFilter"
    cat "$tmp/trace/$unit"* | grep -oE '^[0-9]+ +[a-z0-9_]+\(' |
        sed -E 's/^[0-9]+ +//; s/\($//' | sort -u >"$tmp/$unit.used"
    [ "$(wc -l <"$tmp/$unit.used")" -gt 20 ] || fail "no trace of $unit's commands"
    outside=$(comm -23 "$tmp/$unit.used" "$tmp/$unit.allowed" | paste -sd ' ')
    [ -z "$outside" ] || fail "$unit's commands call $outside outside its SystemCallFilter"
    # And the socket families against RestrictAddressFamilies.
    families=$(cat "$tmp/trace/$unit"* | grep -oE '^[0-9]+ +socket\(AF_[A-Z0-9]+' | sed 's/.*(//' | sort -u | paste -sd ' ')
    allowed=" $(sed -n 's/^RestrictAddressFamilies=//p' "/usr/lib/systemd/system/$unit") "
    for family in $families; do
        [[ $allowed == *" $family "* ]] || fail "$unit's commands open $family sockets outside its RestrictAddressFamilies"
    done
    say "  $unit: $(wc -l <"$tmp/$unit.used") distinct system calls, all allowed; socket families: ${families:-none}"
done

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
say "ok in $(($(date +%s) - started)) s"

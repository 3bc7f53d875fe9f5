#!/usr/bin/env bash
# Scan ports with nmap and print the open ones, one per line:
#   open tcp PORT      (or `open udp PORT` with --udp)
# Nothing else goes to stdout, so tests can parse it; diagnostics go to stderr.
#
# Usage: scripts/verify-nmap.sh [--netns NAME] [--udp] ADDR PORTS
#   ADDR   literal IP address; must be loopback (127.0.0.0/8 or ::1) unless
#          --netns is given, so tests never send traffic off this host; in
#          a netns, an address on one of its own links (no gateway)
#   PORTS  nmap port spec, e.g. 1-1000 or 7,77,777,8
#
# Environment:
#   NMAP_HOST_TIMEOUT  nmap --host-timeout (default 60s)
#
# Exit status: 0 scan done (even if nothing is open), 1 scan failed or
# timed out, 2 usage error / nmap missing / address refused.
set -euo pipefail

prog=${0##*/}

usage() {
    echo "usage: $prog [--netns NAME] [--udp] ADDR PORTS" >&2
    exit 2
}

die() {
    echo "$prog: $*" >&2
    exit 2
}

netns=""
proto=tcp
while [[ $# -gt 0 ]]; do
    case $1 in
        --netns)
            [[ $# -ge 2 && -n $2 ]] || usage
            netns=$2
            shift 2
            ;;
        --netns=*)
            netns=${1#--netns=}
            [[ -n $netns ]] || usage
            shift
            ;;
        --udp)
            proto=udp
            shift
            ;;
        -h | --help)
            usage
            ;;
        --)
            shift
            break
            ;;
        -*)
            echo "$prog: unknown option: $1" >&2
            usage
            ;;
        *)
            break
            ;;
    esac
done
[[ $# -eq 2 ]] || usage
addr=$1
ports=$2

if ! command -v nmap >/dev/null 2>&1; then
    die "nmap not found; install it with: apt-get install nmap"
fi

# Only plain port lists/ranges; this also keeps option-like text out of nmap.
if ! [[ $ports =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]]; then
    die "invalid PORTS '$ports' (expected e.g. 1-1000 or 7,77,777,8)"
fi

is_ipv4() {
    local IFS=. o
    local -a octets
    [[ $1 =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || return 1
    read -r -a octets <<<"$1"
    for o in "${octets[@]}"; do
        ((10#$o <= 255)) || return 1
    done
}

is_ipv6() {
    [[ $1 == *:* && $1 =~ ^[0-9A-Fa-f:.]+$ ]]
}

is_loopback() {
    if is_ipv4 "$1"; then
        [[ $1 == 127.* ]]
        return
    fi
    # ::1 in its common spellings.
    local a=${1,,}
    [[ $a == "::1" || $a =~ ^(0{1,4}:){7}0{0,3}1$ || $a =~ ^(0{1,4}:)+:0{0,3}1$ ]]
}

# Literal addresses only: a hostname could resolve to anything.
if ! is_ipv4 "$addr" && ! is_ipv6 "$addr"; then
    die "ADDR must be a literal IPv4 or IPv6 address, got '$addr'"
fi
if [[ -z $netns ]] && ! is_loopback "$addr"; then
    die "refusing to scan non-loopback address '$addr' outside a netns (use 127.0.0.0/8, ::1, or --netns NAME)"
fi
# Inside a netns, only an address the namespace reaches directly (its own,
# or on one of its links, such as scripts/lab.sh's tap or veth), never one
# behind a gateway: the scan stays on wires the caller made.
if [[ -n $netns ]] && ! is_loopback "$addr"; then
    if ! route=$(ip netns exec "$netns" ip route get "$addr" 2>/dev/null); then
        die "no route to '$addr' in netns $netns"
    fi
    if [[ $route == *" via "* ]]; then
        die "refusing to scan '$addr': netns $netns reaches it through a gateway ($route)"
    fi
fi

args=(-n -Pn -oG - --max-retries 1 --host-timeout "${NMAP_HOST_TIMEOUT:-60s}" -p "$ports")
if [[ $proto == udp ]]; then
    args+=(-sU) # needs root (raw sockets)
else
    # Connect scan: works without root and exercises the real accept path.
    args+=(-sT)
fi
if is_ipv6 "$addr"; then
    args+=(-6)
fi

cmd=(nmap "${args[@]}" -- "$addr")
if [[ -n $netns ]]; then
    cmd=(ip netns exec "$netns" "${cmd[@]}")
fi

if ! out=$("${cmd[@]}"); then
    echo "$prog: nmap failed: ${cmd[*]}" >&2
    exit 1
fi

if grep -q 'Status: Timeout' <<<"$out"; then
    echo "$prog: nmap hit the host timeout (${NMAP_HOST_TIMEOUT:-60s}); results incomplete" >&2
    exit 1
fi
if ! grep -q '^Host: ' <<<"$out"; then
    echo "$prog: no host result in nmap output:" >&2
    printf '%s\n' "$out" >&2
    exit 1
fi

# Grepable lines look like
#   Host: 127.0.0.1 ()<TAB>Ports: 22/open/tcp//ssh///, 80/closed/tcp//http///<TAB>Ignored State: closed (998)
# Take the tab-delimited Ports: field, split entries on ", " and keep only
# well-formed port/state/proto/... entries whose state is exactly "open"
# (so "open|filtered" is excluded).
awk -v want="$proto" '
    /^Host: / {
        n = split($0, fields, "\t")
        for (i = 1; i <= n; i++) {
            if (fields[i] !~ /^Ports: /) continue
            list = substr(fields[i], 8)
            m = split(list, entries, ", ")
            for (j = 1; j <= m; j++) {
                split(entries[j], f, "/")
                if (f[1] ~ /^[0-9]+$/ && f[2] == "open" && f[3] == want)
                    print "open " want " " f[1]
            }
        }
    }
' <<<"$out" | sort -k3,3n -u

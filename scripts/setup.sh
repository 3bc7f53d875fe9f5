#!/usr/bin/env bash
# Installs what building, the demo and the tests need on Debian 12. Idempotent.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (sudo $0)" >&2
    exit 1
fi

need_apt=()
# clang-19 and libbpf-dev build the seed's C program that steer-bench compares against.
for tool in bpftool:bpftool ncat:ncat nmap:nmap ip:iproute2 setpriv:util-linux gcc:build-essential clang-19:clang-19; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool#*:}")
done
[ -e /usr/include/bpf/bpf_helpers.h ] || need_apt+=(libbpf-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
    command -v curl >/dev/null 2>&1 || apt-get install -y -qq curl >/dev/null
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
fi
rustup component add clippy rustfmt >/dev/null 2>&1
# The BPF object is committed, so the tools build on stable; checking or
# rebuilding it needs the nightly pinned in dispatch-ebpf/rust-toolchain.toml
# (rustup reads the components from there too).
(cd dispatch-ebpf && out=$(rustup toolchain install 2>&1) || { echo "$out" >&2; exit 1; })

# `setup.sh --test`: what only the tests need on top.
[ "${1:-}" = --test ] || exit 0

# nginx (tests/servers.rs runs it with a reuseport listener in a test namespace)
# and systemd-socket-activate (Debian's systemd package). nginx's postinst
# would start the system-wide service on port 80: a policy-rc.d forbids
# starting services during the install, and the service is left disabled.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
    fi
    apt-get install -y -qq nginx >/dev/null || { [ "$own_policy" = 1 ] && rm -f "$policy"; exit 1; }
    [ "$own_policy" = 1 ] && rm -f "$policy"
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --now nginx >/dev/null 2>&1 || true
    fi
fi
command -v systemd-socket-activate >/dev/null 2>&1 || apt-get install -y -qq systemd >/dev/null

# The package test: systemd-analyze (it verifies unit files with no systemd
# running), man (verify checks the units' Documentation=man: pages), strace
# (the units' system call filters are checked against traces) and cargo-deb,
# pinned like the BPF nightly.
need_apt=()
command -v man >/dev/null 2>&1 || need_apt+=(man-db)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v strace >/dev/null 2>&1 || need_apt+=(strace)
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb 3.8.0" ]; then
    cargo install --quiet --locked cargo-deb --version 3.8.0
fi
# The fuzz targets: cargo-fuzz and the nightly of fuzz/rust-toolchain.toml,
# pinned in scripts/fuzz.sh, which installs them.
scripts/fuzz.sh --install

# promtool lints the metrics endpoint's output. Debian 12 ships it only in
# `prometheus` (96 MB installed, plus JavaScript libraries), whose install
# also starts a Prometheus server through its init script; so take just
# /usr/bin/promtool out of that same Debian package.
if ! command -v promtool >/dev/null 2>&1; then
    dl=$(mktemp -d)
    chmod 777 "$dl" # apt's download sandbox user writes here
    if ! (cd "$dl" && apt-get download -qq prometheus 2>/dev/null); then
        apt-get update -qq
        (cd "$dl" && apt-get download -qq prometheus)
    fi
    dpkg-deb --fsys-tarfile "$dl"/prometheus_*.deb | tar -xO ./usr/bin/promtool >"$dl/promtool"
    install -m 755 "$dl/promtool" /usr/local/bin/promtool
    rm -rf "$dl"
fi

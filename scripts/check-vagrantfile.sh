#!/usr/bin/env bash
# Checks the Vagrantfile: `vagrant validate` (with Debian's vagrant and
# vagrant-libvirt, installed if missing), with and without STEER_DEB (the
# host-built package scripts/vagrant-lab.sh installs instead), and that it
# otherwise provisions with scripts/setup.sh rather than a copy of its
# install steps.
set -euo pipefail
source "$(dirname "$0")/common.sh"

need=()
command -v vagrant >/dev/null 2>&1 || need+=(vagrant)
dpkg-query -W -f='${Status}' vagrant-libvirt 2>/dev/null | grep -q 'ok installed' || need+=(vagrant-libvirt)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi

# Vagrant's state goes under target/, not into the tree.
export VAGRANT_DOTFILE_PATH=$PWD/target/vagrant VAGRANT_DEFAULT_PROVIDER=libvirt
vagrant validate
deb=$(mktemp --suffix=.deb)
trap 'rm -f "$deb"' EXIT
STEER_DEB=$deb vagrant validate >/dev/null || { STEER_DEB=$deb vagrant validate; exit 1; }
grep -q 'path: "scripts/setup.sh"' Vagrantfile || { echo "Vagrantfile: provisioning must run scripts/setup.sh" >&2; exit 1; }
if grep -nE 'apt-get|rustup|curl ' Vagrantfile; then
    echo "Vagrantfile: install steps belong in scripts/setup.sh, not here" >&2
    exit 1
fi
echo "Vagrantfile: valid, provisions with scripts/setup.sh (or STEER_DEB's package)"

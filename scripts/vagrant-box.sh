#!/usr/bin/env bash
# Builds a libvirt Vagrant box of Debian from Debian's own packages (no
# Vagrant Cloud), usable in place of `debian/bookworm64` by the project's
# Vagrantfile, and caches it. Prints the box file's path.
#
# Usage: scripts/vagrant-box.sh [--suite bookworm|trixie] [--add] [--force]
#   --suite  Debian 12 (default) or 13
#   --add    also `vagrant box add` it as debian/SUITE64 (into VAGRANT_HOME,
#            default ~/.vagrant.d), so `vagrant up --provider=libvirt` uses it
#   --force  rebuild even if the cached box is current
#
# The box: mmdebstrap's minbase plus systemd, udev, dbus, openssh-server,
# sudo, Debian's kernel and the tools the lab runs in the guest (iproute2,
# rsync, ncat, nmap, bpftool); user vagrant with Vagrant's insecure key
# (from Debian's vagrant package) and password-less sudo; DHCP on the first
# NIC (systemd-networkd). The disk is one ext4 file system without a
# partition table or bootloader: the box's own Vagrantfile boots the kernel
# and initrd it carries (root=/dev/vda), so libvirt's qemu user must be able
# to read them under VAGRANT_HOME. Build without loop devices or mounts.
#
# Cache: $STEER_VAGRANT_CACHE (default ~/.cache/steer-vagrant)/SUITE64.box,
# rebuilt when this script changes or after 30 days; the build's log is
# SUITE64.log beside it. Needs root (mmdebstrap, file ownership).
# Environment: STEER_VAGRANT_MIRROR  Debian mirror (http://deb.debian.org/debian)
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

suite=bookworm
add=0
force=0
while [ $# -gt 0 ]; do
    case $1 in
        --suite)
            [ $# -ge 2 ] || { echo "vagrant-box.sh: --suite needs bookworm or trixie" >&2; exit 2; }
            suite=$2
            shift
            ;;
        --add) add=1 ;;
        --force) force=1 ;;
        -h | --help)
            sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "vagrant-box.sh: unknown argument $1" >&2
            exit 2
            ;;
    esac
    shift
done
case $suite in
    bookworm | trixie) ;;
    *)
        echo "vagrant-box.sh: unknown suite $suite (bookworm or trixie)" >&2
        exit 2
        ;;
esac
if [ "$(id -u)" -ne 0 ]; then
    echo "vagrant-box.sh: run as root (mmdebstrap and the image's file owners need it)" >&2
    exit 1
fi

cache=${STEER_VAGRANT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/steer-vagrant}
mirror=${STEER_VAGRANT_MIRROR:-http://deb.debian.org/debian}
name=${suite}64
box=$cache/$name.box
log=$cache/$name.log
mkdir -p "$cache"
# What the box is made from: this script and the mirror.
recipe=$( (cat "$0"; echo "$mirror") | sha256sum | cut -d' ' -f1)

say() { echo "[vagrant-box] $*" >&2; }
die() {
    echo "[vagrant-box] error: $*" >&2
    exit 1
}

if [ "$force" = 0 ] && [ -s "$box" ] && [ "$(cat "$box.recipe" 2>/dev/null)" = "$recipe" ] &&
    [ -n "$(find "$box" -mtime -30)" ]; then
    say "cached: $box"
else
    need=()
    for tool in mmdebstrap:mmdebstrap mkfs.ext4:e2fsprogs qemu-img:qemu-utils vagrant:vagrant; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
    done
    if [ ${#need[@]} -gt 0 ]; then
        say "installing ${need[*]} (apt's output in $log)"
        {
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" ||
                { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"; }
        } >"$log" 2>&1 || die "cannot install ${need[*]}: see $log"
    fi
    keys=(/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub)
    key=${keys[0]}
    [ -e "$key" ] || die "no Vagrant insecure key (keys/vagrant.pub) in Debian's vagrant package"

    work=$(mktemp -d "$cache/build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    root=$work/root
    security="deb ${mirror%/debian}/debian-security $suite-security main"
    [ "$mirror" = http://deb.debian.org/debian ] || security=""
    say "building Debian $suite with mmdebstrap from $mirror (log: $log)"
    started=$SECONDS
    packages=systemd-sysv,udev,dbus,openssh-server,sudo,linux-image-amd64,initramfs-tools,iproute2,rsync,ncat,nmap,bpftool,procps,less
    # shellcheck disable=SC2016 # $1 is the hook's: the root directory
    mmdebstrap --variant=minbase --include="$packages" \
        --customize-hook='echo "vagrant" >"$1/etc/hostname"' \
        "$suite" "$root" "deb $mirror $suite main" "deb $mirror $suite-updates main" ${security:+"$security"} \
        >"$log" 2>&1 || die "mmdebstrap failed: see $log"

    # The guest system: what Vagrant expects of a box.
    chroot "$root" useradd -m -s /bin/bash -c Vagrant vagrant
    echo vagrant:vagrant | chroot "$root" chpasswd
    install -d -m 700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
    install -m 600 -o 1000 -g 1000 "$key" "$root/home/vagrant/.ssh/authorized_keys"
    echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/vagrant"
    chmod 440 "$root/etc/sudoers.d/vagrant"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tvagrant\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    echo '/dev/vda / ext4 errors=remount-ro 0 1' >"$root/etc/fstab"
    printf '[Match]\nName=eth0\n\n[Network]\nDHCP=yes\n' >"$root/etc/systemd/network/50-eth0.network"
    chroot "$root" systemctl enable systemd-networkd.service >>"$log" 2>&1
    # No DNS server for the guest to use (and sshd does no lookups).
    rm -f "$root/etc/resolv.conf"
    : >"$root/etc/resolv.conf"
    # Every guest gets a machine id (and so a DHCP client id) and host keys of its own.
    : >"$root/etc/machine-id"
    rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_*
    mkdir -p "$root/etc/systemd/system/ssh.service.d"
    printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
        >"$root/etc/systemd/system/ssh.service.d/host-keys.conf"
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/var/log/*.log

    mkdir "$work/box"
    # One kernel: linux-image-amd64's.
    cp "$root"/boot/vmlinuz-* "$work/box/vmlinuz"
    cp "$root"/boot/initrd.img-* "$work/box/initrd.img"
    say "making the disk image"
    mkfs.ext4 -q -L root -E lazy_itable_init=1,lazy_journal_init=1 -d "$root" "$work/root.raw" 20G >>"$log" 2>&1 ||
        die "mkfs.ext4 -d failed: see $log"
    rm -rf "$root"
    qemu-img convert -f raw -O qcow2 "$work/root.raw" "$work/box/box.img" >>"$log" 2>&1 || die "qemu-img convert failed: see $log"
    rm -f "$work/root.raw"
    echo '{"provider": "libvirt", "format": "qcow2", "virtual_size": 20}' >"$work/box/metadata.json"
    cat >"$work/box/Vagrantfile" <<'EOF'
# Built by steer's scripts/vagrant-box.sh from Debian's packages. No
# bootloader: libvirt boots the kernel and initrd next to this file.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.expand_path("vmlinuz", __dir__)
    lv.initrd = File.expand_path("initrd.img", __dir__)
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
    lv.disk_bus = "virtio"
  end
end
EOF
    # Uncompressed: the image is qcow2 already, and packing stays quick.
    tar -C "$work/box" -cf "$work/$name.box" metadata.json Vagrantfile box.img vmlinuz initrd.img
    mv "$work/$name.box" "$box"
    echo "$recipe" >"$box.recipe"
    say "built $box ($(du -h "$box" | cut -f1)) in $((SECONDS - started)) s"
fi

if [ "$add" = 1 ]; then
    say "vagrant box add --name debian/$name"
    vagrant box add --force --name "debian/$name" "$box" >&2 || die "vagrant box add failed"
fi
echo "$box"

#!/usr/bin/env bash
# The Vagrant lab, booted: `vagrant up --provider=libvirt` with the project's
# Vagrantfile on a box built from Debian's packages (scripts/vagrant-box.sh),
# provisioned with the package built here (STEER_DEB), then
#   1. the seed walkthrough in the guest over `vagrant ssh`, and from the host
#      side `nmap -sT -p 1-1000 GUEST` (its own output): 7, 77 and 777 open
#      once steered, 78 closed, then 7 77 after `ports del 777`, none after
#      `detach`; ncat echoes through each port;
#   2. the package's units under the guest's systemd (PID 1): steer.service
#      enabled with /etc/steer/config.json steers port 80 after a boot and
#      again after a reboot; steer-watch follows `systemctl restart` of the
#      server's unit (refused connections counted); steer-metrics answers all
#      along; systemctl stop/start/disable do what the README says;
#   3. on a Debian 13 guest (systemd 257), a socket unit with
#      PassFileDescriptorsToExec=yes and ExecStartPost=steerctl register LABEL;
# then `vagrant destroy`. The last line says passed or FAILED.
#
# Usage: scripts/vagrant-lab.sh [--no-bookworm] [--no-trixie]
#   (they skip the Debian 12 guest, parts 1 and 2, or the Debian 13 one)
#
# Isolation: libvirtd, its network (bridge, dnsmasq, firewall rules), the
# guests and the host side of every scan run in a network namespace of their
# own (steer-vlab-PID) and a mount namespace where libvirt's directories are
# a scratch directory's and /dev has no kvm (a KVM guest hangs on machines
# without nested virtualisation; TCG it is). The guests' network is
# 198.51.100.0/24 (TEST-NET-2) inside that namespace. Everything (domains,
# networks, daemons, images, the namespace) is gone on exit, pass or fail.
#
# Logs: target/vagrant-lab/ (STEER_VAGRANT_LAB_OUT; vagrant-*.log, console-*.log, libvirtd.log,
# install.log, package.log); boxes are cached by vagrant-box.sh.
# Environment:
#   STEER_VAGRANT_BOOT_TIMEOUT  seconds a boot may take until ssh answers
#                               (600; about 110 under TCG on an idle 2-core machine)
#   STEER_VAGRANT_KERNEL_ARGS   extra kernel command line for the guests
set -euo pipefail

if [ "${1:-}" != --inner ]; then
    source "$(dirname "$0")/common.sh"
    source scripts/vm-common.sh
fi

repo=$PWD
out=${STEER_VAGRANT_LAB_OUT:-$repo/target/vagrant-lab}
guest_script='sudo bash /vagrant/scripts/vagrant-guest.sh'
say() { printf '%s\n' "$*"; }
die() {
    say "vagrant-lab: FAILED: $*"
    exit 1
}
elapsed() { echo "$(($(date +%s) - $1)) s"; }

# ---------------------------------------------------------------------------
# The inner part: inside the namespace, with libvirtd, vagrant and the checks.
inner() {
    # Globals: the exit trap reads them.
    failures=0 current="" libvirtd_pid=""
    local home=$VLAB_WORK/vagrant.d

    check() { # DESCRIPTION EXPECTED ACTUAL
        if [ "$2" = "$3" ]; then
            say "vagrant-lab: $1: $3 (as expected)"
        else
            say "vagrant-lab: FAILED: $1: expected '$2', got '$3'"
            failures=$((failures + 1))
        fi
    }

    # shellcheck disable=SC2317 # run by the trap
    inner_cleanup() {
        local rc=$?
        set +e
        if [ -n "$current" ]; then
            say "== vagrant destroy ($current)"
            timeout 180 vagrant destroy -f >>"$out/vagrant-$current.log" 2>&1 ||
                say "vagrant-lab: vagrant destroy failed (see $out/vagrant-$current.log); the namespace's removal ends the guest"
        fi
        [ -n "$libvirtd_pid" ] && kill "$libvirtd_pid" 2>/dev/null
        exit "$rc"
    }
    trap inner_cleanup EXIT

    # A /dev without kvm, so libvirt probes and runs qemu for TCG only (with
    # /dev/kvm present but unusable it re-probes and can hang).
    mount -t tmpfs -o mode=755,size=1m steer-dev /dev
    mknod -m 666 /dev/null c 1 3
    mknod -m 666 /dev/zero c 1 5
    mknod -m 666 /dev/full c 1 7
    mknod -m 666 /dev/random c 1 8
    mknod -m 666 /dev/urandom c 1 9
    mknod -m 666 /dev/tty c 5 0
    mkdir /dev/net /dev/pts /dev/shm
    mknod -m 666 /dev/net/tun c 10 200
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts
    ln -s pts/ptmx /dev/ptmx
    mount -t tmpfs -o mode=1777 steer-shm /dev/shm
    ln -s /proc/self/fd /dev/fd
    ln -s fd/0 /dev/stdin
    ln -s fd/1 /dev/stdout
    ln -s fd/2 /dev/stderr

    # libvirt's configuration, state, images and sockets: the scratch
    # directory's. qemu runs as root (it reads the box's kernel under
    # VAGRANT_HOME) and logs to files (no virtlogd).
    local lv=$VLAB_WORK/libvirt d
    mkdir -p "$lv"/{etc,lib,cache,log}
    cp -a /etc/libvirt/. "$lv/etc/"
    rm -f "$lv"/etc/qemu/networks/autostart/* "$lv/etc/qemu/networks/default.xml"
    (cd /var/lib/libvirt && find . -type d -print0 | cpio -0pdm --quiet "$lv/lib")
    cat >>"$lv/etc/qemu.conf" <<'EOF'
user = "root"
group = "root"
stdio_handler = "file"
namespaces = [ ]
security_driver = "none"
EOF
    echo "log_outputs=\"2:file:$out/libvirtd.log\"" >>"$lv/etc/libvirtd.conf"
    for d in etc:/etc/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do
        mount --bind "$lv/${d%%:*}" "${d#*:}"
    done
    mount -t tmpfs -o mode=755 steer-run /run
    mkdir -p /run/lock
    ip link set lo up
    libvirtd -d -p /run/libvirtd.pid || die "libvirtd did not start: see $out/libvirtd.log"
    for _ in $(seq 100); do
        [ -S /run/libvirt/libvirt-sock ] && break
        sleep 0.1
    done
    libvirtd_pid=$(cat /run/libvirtd.pid 2>/dev/null || true)
    virsh -q -c qemu:///system version >/dev/null 2>&1 || die "libvirtd does not answer: see $out/libvirtd.log"
    say "vagrant-lab: libvirtd $(libvirtd --version | awk '{ print $NF }') (pid $libvirtd_pid), namespace $VLAB_NS"

    export VAGRANT_HOME=$home VAGRANT_DEFAULT_PROVIDER=libvirt VAGRANT_CHECKPOINT_DISABLE=1 \
        VAGRANT_BOX_UPDATE_CHECK_DISABLE=1 VAGRANT_NO_COLOR=1
    mkdir -p "$home"
    # What this machine needs on top of the project's Vagrantfile (loaded
    # after the box's and before the project's): TCG, a plain CPU, names
    # and a network of the lab's own, and the console in a file: a second
    # serial port (vagrant-libvirt 0.11 cannot merge `serial` settings),
    # the only console (the kernel prints to one 8250 port at most).
    cat >"$home/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.boot_timeout = ENV.fetch("STEER_VAGRANT_BOOT_TIMEOUT", "600").to_i
  config.vm.provider :libvirt do |lv|
    lv.driver = "qemu"
    lv.cpu_mode = "custom"
    lv.cpu_model = "qemu64"
    lv.graphics_type = "none"
    lv.video_type = "none"
    lv.default_prefix = ENV.fetch("VLAB_PREFIX", "steer-vlab-")
    lv.management_network_name = "steer-vlab"
    lv.management_network_address = "198.51.100.0/24"
    lv.cmd_line = "root=/dev/vda rw net.ifnames=0 console=ttyS1 " + ENV.fetch("STEER_VAGRANT_KERNEL_ARGS", "")
    if ENV["VLAB_CONSOLE"]
      lv.qemuargs :value => "-chardev"
      lv.qemuargs :value => "file,id=steer-console,path=" + ENV["VLAB_CONSOLE"]
      lv.qemuargs :value => "-device"
      lv.qemuargs :value => "isa-serial,chardev=steer-console,index=1"
    end
  end
end
EOF
    local suite
    for suite in bookworm trixie; do
        local box_var=VLAB_BOX_$suite
        [ -n "${!box_var:-}" ] || continue
        vagrant box add --name "debian/${suite}64" "${!box_var}" >>"$out/vagrant-$suite.log" 2>&1 ||
            die "vagrant box add debian/${suite}64 failed: see $out/vagrant-$suite.log"
    done

    # vagrant for machine NAME: the environment variables that pick it.
    use() {
        current=$1
        export VLAB_PREFIX="steer-vlab-$VLAB_ID-$1-" VLAB_CONSOLE=$out/console-$1.log
        export VAGRANT_DOTFILE_PATH=$VLAB_WORK/dot-$1 VAGRANT_CWD=$2
    }
    up() {
        local t0 log=$out/vagrant-$current.log
        t0=$(date +%s)
        say "== vagrant up --provider=libvirt ($current; output in $log)"
        if ! STEER_DEB=$VLAB_DEB vagrant up --provider=libvirt >>"$log" 2>&1; then
            grep -v 'Progress:' "$log" | tail -n 15 | sed 's/^/  | /'
            die "vagrant up failed: see $log and the guest's console, $VLAB_CONSOLE"
        fi
        grep -E '^==> default: (Creating domain|Waiting for domain|Waiting for machine|Machine booted|Setting hostname|Rsyncing|Running provisioner)|^    default: (Kernel|Selecting|Unpacking|Setting up steer|  sudo)' "$log" |
            sed 's/^/  | /'
        vagrant ssh-config >"$VLAB_WORK/ssh-$current" 2>>"$log" || die "vagrant ssh-config failed: see $log"
        guest_ip=$(awk '$1 == "HostName" { print $2 }' "$VLAB_WORK/ssh-$current")
        say "vagrant-lab: $current guest at $guest_ip, up and provisioned in $(elapsed "$t0")"
    }
    # The guest steps (scripts/vagrant-guest.sh) over one `vagrant ssh`.
    guest() {
        local cmd="s=0" step status=0 shown=()
        for step in "$@"; do
            shown+=("vagrant-guest.sh $step")
            cmd+="; $guest_script $step || s=1"
        done
        say "guest \$ $(printf '%s; ' "${shown[@]}" | sed 's/; $//')"
        vagrant ssh -c "$cmd; exit \$s" -- -q 2>&1 | sed 's/\r$//' || status=$?
        [ "$status" -ne 255 ] || die "vagrant ssh failed: see $VLAB_CONSOLE"
        if [ "$status" -ne 0 ]; then
            say "vagrant-lab: FAILED: guest step(s) $*"
            failures=$((failures + 1))
        fi
        say ""
    }
    # Plain ssh with vagrant's settings: quick, for polling.
    fssh() { timeout 30 ssh -F "$VLAB_WORK/ssh-$current" -q -o ConnectTimeout=5 default "$@"; }
    reboot_guest() {
        local old new t0 deadline
        t0=$(date +%s)
        old=$(fssh cat /proc/sys/kernel/random/boot_id) || die "ssh to the guest failed before the reboot"
        say "guest \$ sudo systemctl reboot"
        fssh sudo systemctl reboot || true
        deadline=$((SECONDS + ${STEER_VAGRANT_BOOT_TIMEOUT:-600}))
        new=""
        while [ "$SECONDS" -lt "$deadline" ]; do
            sleep 3
            new=$(fssh cat /proc/sys/kernel/random/boot_id 2>/dev/null) || new=""
            [ -n "$new" ] && [ "$new" != "$old" ] && break
        done
        if [ -z "$new" ] || [ "$new" = "$old" ]; then
            die "the guest did not answer ssh within ${STEER_VAGRANT_BOOT_TIMEOUT:-600} s of its reboot: see $VLAB_CONSOLE"
        fi
        say "vagrant-lab: the guest rebooted and answers ssh after $(elapsed "$t0")"
    }
    # nmap's own output; `open` gets the open ports.
    scan() {
        local ports=${1:-1-1000}
        say "host \$ nmap -sT -Pn -p $ports $guest_ip"
        timeout 120 nmap -sT -Pn --host-timeout 60s -p "$ports" -oG "$VLAB_WORK/scan.gnmap" "$guest_ip" | grep -v '^$' ||
            die "nmap failed"
        open=$(grep -o '[0-9]*/open/' "$VLAB_WORK/scan.gnmap" | cut -d/ -f1 | sort -n | paste -sd' ' || true)
        closed=$(grep -o '[0-9]*/closed/' "$VLAB_WORK/scan.gnmap" | cut -d/ -f1 | sort -n | paste -sd' ' || true)
        # Ports nmap did not list one by one: their state.
        ignored=$(grep -o 'Ignored State: [a-z]*' "$VLAB_WORK/scan.gnmap" | awk '{ print $3 }' || true)
        say ""
    }
    echo_through() { # PORT: prints the reply
        local port=$1 reply
        say "host \$ echo 'hello $port' | ncat --no-shutdown -i 2 $guest_ip $port"
        reply=$(echo "hello $port" | timeout 20 ncat --no-shutdown -i 2 "$guest_ip" "$port" 2>/dev/null || true)
        say "$reply"
        [ "$reply" = "hello $port" ]
    }
    ask() { # PORT: the first line the guest's PORT answers from the host side
        local reply
        reply=$(timeout 20 ncat --recv-only -w 5 "$guest_ip" "$1" </dev/null 2>&1 | head -n 1) || true
        say "host \$ ncat --recv-only $guest_ip $1"
        say "${reply:-(nothing)}"
        answer=$reply
    }

    # --- Debian 12: the project's Vagrantfile --------------------------------
    local t_walk t_units
    if [ -n "${VLAB_BOX_bookworm:-}" ]; then
        use bookworm "$repo"
        up
        t_walk=$(date +%s)
        say "== the seed walkthrough: in the guest over vagrant ssh, nmap from the host side"
        guest walk-start
        scan
        check "nmap with the program attached, nothing steered (22 is the guest's sshd)" "22" "$open"
        guest walk-steer
        scan
        check "nmap after ports add 7 77 777 and socket set" "7 22 77 777" "$open"
        check "port 78 (and all not listed)" closed "$ignored"
        local echoed=() port
        for port in 7 77 777; do
            echo_through "$port" && echoed+=("$port")
        done
        check "echo through each steered port" "7 77 777" "${echoed[*]}"
        guest walk-del
        scan
        check "nmap after ports del 777" "7 22 77" "$open"
        guest walk-detach
        scan
        check "nmap after detach" "22" "$open"
        say "vagrant-lab: walkthrough done in $(elapsed "$t_walk")"

        t_units=$(date +%s)
        say "== the package's units under systemd (PID 1): steer, steer-watch, steer-metrics"
        guest walk-end units-setup
        reboot_guest
        guest "boot-check 1"
        ask 80
        check "host -> guest:80 after boot 1 (steered to 127.0.0.1:8080)" web "${answer%% *}"
        scan 80,8080
        check "nmap after boot 1: 80 steered" "80" "$open"
        check "nmap after boot 1: 8080 (the server's own port, on loopback) closed" "8080" "$closed"
        guest restart-check stop-check
        reboot_guest
        guest "boot-check 2"
        ask 80
        check "host -> guest:80 after boot 2" web "${answer%% *}"
        guest disable
        reboot_guest
        guest "disabled-check 3"
        ask 80
        check "host -> guest:80 with the units disabled" "" "$(printf '%s' "$answer" | grep -o '^web' || true)"
        say "vagrant-lab: units checked in $(elapsed "$t_units")"
        say "== vagrant destroy (bookworm)"
        vagrant destroy -f >>"$out/vagrant-$current.log" 2>&1 || die "vagrant destroy failed: see $out/vagrant-$current.log"
        current=""
    fi

    # --- Debian 13: systemd 257, PassFileDescriptorsToExec -------------------
    if [ -n "${VLAB_BOX_trixie:-}" ]; then
        local t_trixie
        t_trixie=$(date +%s)
        mkdir -p "$VLAB_WORK/trixie"
        cat >"$VLAB_WORK/trixie/Vagrantfile" <<EOF
# Debian 13 for the systemd 256+ checks; provisioned as the project's is with STEER_DEB.
Vagrant.configure("2") do |config|
  config.vm.box = "debian/trixie64"
  config.vm.hostname = "steer-trixie"
  config.vm.synced_folder "$repo", "/vagrant", type: "rsync", rsync__exclude: ["target/"]
  config.vm.provider "libvirt" do |lv|
    lv.cpus = 2
    lv.memory = 2048
  end
  config.vm.provision "file", source: "$VLAB_DEB", destination: "/tmp/steer.deb"
  config.vm.provision "shell", inline: "dpkg -i /tmp/steer.deb && rm /tmp/steer.deb"
end
EOF
        use trixie "$VLAB_WORK/trixie"
        up
        say "== socket activation with PassFileDescriptorsToExec=yes (Debian 13)"
        guest activation-check
        ask 81
        check "host -> guest:81 (steered to the socket-activated service)" activated "$answer"
        say "vagrant-lab: Debian 13 checked in $(elapsed "$t_trixie")"
        say "== vagrant destroy (trixie)"
        vagrant destroy -f >>"$out/vagrant-$current.log" 2>&1 || die "vagrant destroy failed: see $out/vagrant-$current.log"
        current=""
    fi

    [ "$failures" -eq 0 ] || die "$failures checks"
}

if [ "${1:-}" = --inner ]; then
    inner
    exit
fi

# ---------------------------------------------------------------------------
# The outer part: dependencies, the package, the boxes, the namespace.
bookworm=1 trixie=1
for arg in "$@"; do
    case $arg in
        --no-bookworm) bookworm=0 ;;
        --no-trixie) trixie=0 ;;
        -h | --help)
            sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "vagrant-lab.sh: unknown argument $arg" >&2
            exit 2
            ;;
    esac
done

started=$(date +%s)
rm -rf "$out"
mkdir -p "$out"
ns=steer-vlab-$$
work=""
cleanup() {
    local rc=$? pids left
    set +e
    trap - EXIT INT TERM
    pids=$(ip netns pids "$ns" 2>/dev/null)
    if [ -n "$pids" ]; then
        # Whatever the inner part left (it destroys its guest and stops
        # libvirtd itself): qemu, dnsmasq, libvirtd, vagrant, ssh.
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null
        for _ in $(seq 50); do
            [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
    ip netns del "$ns" 2>/dev/null
    [ -n "$work" ] && rm -rf "$work"
    left=$(ip netns pids "$ns" 2>/dev/null; ip netns list 2>/dev/null | grep -w "$ns")
    [ -z "$left" ] || say "vagrant-lab: cleanup left $left"
    say "vagrant-lab: $(elapsed "$started") in all"
    if [ "$rc" -eq 0 ]; then say "vagrant-lab: passed"; else say "vagrant-lab: FAILED (logs in $out)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "== installing what the lab needs (apt's output in $out/install.log)"
# shellcheck disable=SC2034 # vm_install_deps's
vm_install_log=$out/install.log
vm_install_deps qemu-img:qemu-utils || die "cannot install qemu: see $out/install.log"
need=()
for tool in libvirtd:libvirt-daemon-system dnsmasq:dnsmasq-base iptables:iptables vagrant:vagrant rsync:rsync \
    mmdebstrap:mmdebstrap nmap:nmap ncat:ncat; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
dpkg-query -W -f='${Status}' vagrant-libvirt 2>/dev/null | grep -q 'ok installed' || need+=(vagrant-libvirt)
if [ ${#need[@]} -gt 0 ]; then
    {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" ||
            { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"; }
    } >>"$out/install.log" 2>&1 || die "cannot install ${need[*]}: see $out/install.log"
fi
for tool in libvirtd virsh vagrant qemu-system-x86_64 dnsmasq; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing after installing (libvirt not installable?): see $out/install.log"
done

t=$(date +%s)
say "== building the package (scripts/package.sh; output in $out/package.log)"
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb 3.8.0" ]; then
    cargo install --quiet --locked cargo-deb --version 3.8.0 >>"$out/package.log" 2>&1 ||
        die "cannot install cargo-deb: see $out/package.log"
fi
deb=$(scripts/package.sh 2>>"$out/package.log") || die "building the package failed: see $out/package.log"
deb=$(readlink -f "$deb")
say "vagrant-lab: $deb in $(elapsed "$t")"

t=$(date +%s)
say "== the boxes (scripts/vagrant-box.sh)"
box_bookworm="" box_trixie=""
if [ "$bookworm" = 1 ]; then
    box_bookworm=$(scripts/vagrant-box.sh --suite bookworm) || die "the debian/bookworm64 box did not build (its log is named above)"
fi
if [ "$trixie" = 1 ]; then
    box_trixie=$(scripts/vagrant-box.sh --suite trixie) || die "the debian/trixie64 box did not build (its log is named above)"
fi
say "vagrant-lab: boxes ready in $(elapsed "$t")"

work=$(mktemp -d /tmp/steer-vlab.XXXXXX)
# dnsmasq (libvirt-dnsmasq) reads its configuration under here.
chmod 755 "$work"
ip netns add "$ns"
export VLAB_WORK=$work VLAB_NS=$ns VLAB_ID=$$ VLAB_DEB=$deb VLAB_BOX_bookworm=$box_bookworm VLAB_BOX_trixie=$box_trixie
# `ip netns exec` gives the inner part a mount namespace of its own too.
# In the background, so that a signal is handled at once (bash runs traps
# only between commands, and `wait` is one that a signal ends).
ip netns exec "$ns" bash scripts/vagrant-lab.sh --inner &
wait $!

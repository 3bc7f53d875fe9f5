# Sourced by vm-test.sh and lab.sh, after common.sh: Debian's own kernels
# fetched from Debian's archive, an initramfs of this build and the tools
# its tests use, and qemu to boot them (KVM when it works, TCG otherwise).
#
# Where things go:
#   $STEER_VM_CACHE (default ~/.cache/steer-vm)  apt lists of the three suites,
#       the kernel .debs and the parts of them used (vmlinuz, a few
#       modules); kept between runs and clones, never in the git tree.
#   target/vm/   initramfs images, console and test logs of the last run.
#
# Environment:
#   STEER_VM_CACHE    the cache above
#   STEER_VM_ACCEL    kvm | tcg | auto (default: KVM if a probe boot works)
#   STEER_VM_TIMEOUT  seconds one guest may run before it is killed (1800)
#   STEER_VM_MEMORY   guest memory in MiB (2048)
#   STEER_VM_CPUS     guest CPUs (2)
# shellcheck shell=bash

vm_cache=${STEER_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/steer-vm}
vm_out=$PWD/target/vm
vm_install_log=$vm_cache/install.log
# A command qemu runs under (lab.sh: `ip netns exec NS`).
vm_wrap=()
# Kernel modules the guest loads when they are not built in: the lab's wire,
# and sock_diag for TCP and UDP (which a full system's modprobe loads on
# first use; the guest has no modprobe).
vm_modules=(virtio_pci virtio_net inet_diag tcp_diag udp_diag)

vm_log() { echo "[vm] $*" >&2; }
vm_die() {
    echo "[vm] error: $*" >&2
    exit 1
}

# The Debian suite whose kernel is Linux VERSION.
vm_suite() {
    case $1 in
        5.10) echo bullseye ;;
        6.1) echo bookworm ;;
        6.12) echo trixie ;;
        *) return 1 ;;
    esac
}

# Installs qemu and the tools the guests' images need; arguments add more
# TOOL:PACKAGE pairs, installed with them (from the same suite as qemu).
vm_install_deps() {
    local need=() tool
    for tool in qemu-system-x86_64:qemu-system-x86 cpio:cpio xz:xz-utils timeout:coreutils "$@"; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
    done
    [ ${#need[@]} -gt 0 ] || return 0
    vm_log "installing ${need[*]} (apt's output in $vm_install_log)"
    mkdir -p "${vm_install_log%/*}"
    : >"$vm_install_log"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$vm_install_log" 2>&1 \
        && return 0
    apt-get update -qq >>"$vm_install_log" 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
            >>"$vm_install_log" 2>&1 && return 0
    # A qemu-utils from bookworm-backports (some images carry one) breaks
    # bookworm's own qemu-system: take qemu from backports too, with package
    # lists of our own (the machine's sources and lists are not changed).
    case $(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) in
        *bpo12*) ;;
        *) return 1 ;;
    esac
    vm_log "qemu-utils is from bookworm-backports: installing ${need[*]} from there"
    local d status=0 key=/usr/share/keyrings/debian-archive-keyring.gpg
    d=$(mktemp -d) || return 1
    mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/empty"
    cat >"$d/sources.list" <<EOF
deb [signed-by=$key] http://deb.debian.org/debian bookworm main
deb [signed-by=$key] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=$key] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=$key] http://deb.debian.org/debian bookworm-backports main
EOF
    local opts=(-o "Dir::Etc::sourcelist=$d/sources.list" -o "Dir::Etc::sourceparts=$d/empty"
        -o "Dir::State::lists=$d/lists" -o "Dir::Cache=$d/cache" -o Acquire::Languages=none)
    apt-get "${opts[@]}" update -qq >>"$vm_install_log" 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" install -y -qq --no-install-recommends \
            -t bookworm-backports "${need[@]}" >>"$vm_install_log" 2>&1 || status=1
    rm -rf "$d"
    return $status
}

# apt-get/apt-cache against one suite with a configuration of our own: the
# machine's sources, lists, caches and apt.conf.d are neither read nor changed
# (only its proxy and date-check settings are carried over).
vm_apt() {
    local suite=$1 tool=$2
    shift 2
    APT_CONFIG=$vm_cache/apt/$suite/apt.conf "$tool" -q "$@"
}

vm_apt_setup() {
    local suite=$1 d=$vm_cache/apt/$1
    mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/empty"
    : >>"$d/status"
    cat >"$d/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security $suite-security main
EOF
    {
        cat <<EOF
Dir::Etc::main "/dev/null";
Dir::Etc::parts "$d/empty";
Dir::Etc::sourcelist "$d/sources.list";
Dir::Etc::sourceparts "$d/empty";
Dir::Etc::preferences "$d/empty/preferences";
Dir::Etc::preferencesparts "$d/empty";
Dir::State::lists "$d/lists";
Dir::State::status "$d/status";
Dir::Cache "$d/cache";
Acquire::Languages "none";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
APT::Sandbox::User "root";
EOF
        apt-config dump 2>/dev/null | grep -E '^Acquire::(https?::Proxy|Check-Valid-Until|Check-Date) ' || true
    } >"$d/apt.conf"
}

# Refreshes SUITE's package lists at most once a day.
vm_apt_update() {
    local suite=$1 d=$vm_cache/apt/$1
    vm_apt_setup "$suite"
    if [ -n "$(find "$d/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null)" ]; then
        return 0
    fi
    vm_log "apt-get update for $suite (lists in $d)"
    vm_apt "$suite" apt-get update >"$d/update.log" 2>&1
}

# Fetches (once) Debian's current kernel for VERSION and unpacks what the
# guest needs: prints the directory holding `vmlinuz`, `release` and
# `modules/` (decompressed .ko files plus `load.list`, in load order).
vm_kernel() {
    local version=$1 suite pkg deb dir
    suite=$(vm_suite "$version") || vm_die "unknown kernel $version (known: 5.10 6.1 6.12)"
    if ! vm_apt_update "$suite"; then
        # Offline: the newest kernel already unpacked for this suite will do.
        dir=$(ls -d "$vm_cache/kernels/$suite/"*/ 2>/dev/null | sort -V | tail -n 1)
        [ -n "$dir" ] && [ -e "$dir/vmlinuz" ] || vm_die "apt-get update for $suite failed (see $vm_cache/apt/$suite/update.log) and nothing is cached"
        vm_log "apt-get update for $suite failed; using cached ${dir%/}"
        echo "${dir%/}"
        return
    fi
    pkg=$(vm_apt "$suite" apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
    [ -n "$pkg" ] || vm_die "no linux-image-amd64 in $suite"
    dir=$vm_cache/kernels/$suite/$pkg
    # Unpacked before with another module list: again.
    if [ "$(cat "$dir/done" 2>/dev/null)" != "${vm_modules[*]}" ]; then
        mkdir -p "$vm_cache/debs"
        deb=$(ls "$vm_cache/debs/${pkg}_"*.deb 2>/dev/null | head -n 1)
        if [ -z "$deb" ]; then
            vm_log "downloading $pkg ($suite)"
            (cd "$vm_cache/debs" && vm_apt "$suite" apt-get download "$pkg" >/dev/null) || vm_die "apt-get download $pkg failed"
            deb=$(ls "$vm_cache/debs/${pkg}_"*.deb | head -n 1)
        fi
        vm_unpack_kernel "$deb" "$dir"
    fi
    echo "$dir"
}

# Unpacks vmlinuz and the modules in vm_modules (with their dependencies)
# from a linux-image .deb into DIR.
vm_unpack_kernel() {
    local deb=$1 dir=$2 tmp moddir release
    tmp=$(mktemp -d "$vm_cache/unpack.XXXXXX")
    rm -rf "$dir"
    mkdir -p "$dir/modules"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards --no-anchored './boot/vmlinuz-*' '*/modules/*/kernel/*'
    cp "$tmp"/boot/vmlinuz-* "$dir/vmlinuz"
    moddir=$(ls -d "$tmp"/lib/modules/*/ "$tmp"/usr/lib/modules/*/ 2>/dev/null | head -n 1)
    [ -n "$moddir" ] || vm_die "no modules in $deb"
    release=$(basename "$moddir")
    echo "$release" >"$dir/release"
    # Module name -> file, then a depth-first walk of `depends=` (read from
    # each module's .modinfo strings, so no kmod is needed on this machine).
    declare -A file_of=()
    local f name
    while IFS= read -r f; do
        name=$(basename "$f")
        name=${name%%.ko*}
        file_of[${name//-/_}]=$f
    done < <(find "$moddir" -name '*.ko*')
    local -a order=()
    declare -A seen=()
    modinfo_depends() {
        case $1 in
            *.xz) xz -dc "$1" ;;
            *.zst) zstd -qdc "$1" ;;
            *.gz) gzip -dc "$1" ;;
            *) cat "$1" ;;
        esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '
    }
    visit() {
        local m=${1//-/_} dep
        [ -n "${seen[$m]:-}" ] && return
        seen[$m]=1
        [ -n "${file_of[$m]:-}" ] || return 0 # built in
        for dep in $(modinfo_depends "${file_of[$m]}"); do visit "$dep"; done
        order+=("$m")
    }
    for name in "${vm_modules[@]}"; do visit "$name"; done
    for name in "${order[@]}"; do
        f=${file_of[$name]}
        case $f in
            *.xz) xz -dc "$f" ;;
            *.zst) zstd -qdc "$f" ;;
            *.gz) gzip -dc "$f" ;;
            *) cat "$f" ;;
        esac >"$dir/modules/$name.ko"
        echo "$name.ko" >>"$dir/modules/load.list"
    done
    : >>"$dir/modules/load.list"
    rm -rf "$tmp"
    echo "${vm_modules[*]}" >"$dir/done"
    vm_log "unpacked $release into $dir (modules: ${order[*]:-none, all built in})"
}

# Copies an executable and the shared libraries it needs into ROOT, each at
# the path it has here.
vm_copy_exe() {
    local root=$1 exe=$2 lib
    mkdir -p "$root$(dirname "$exe")"
    cp -L "$exe" "$root$exe"
    for lib in $(ldd "$exe" 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

# Builds the part of the initramfs every kernel shares into OUT (a cpio
# archive): busybox, the tools the tests run, this repository's release
# binaries and test executables at the paths they were built at, and
# scripts/vm-init.sh as /init. TESTS lists test executables (may be empty).
vm_build_rootfs() {
    local out=$1
    shift
    local root=$vm_out/root tool exe bb
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc,proc,sys,dev,tmp,run,root,var,steer}
    ln -s ../run "$root/var/run"

    # busybox-static from Debian's archive (the machine's own busybox, if
    # any, is left as it is).
    bb=$vm_cache/busybox/busybox
    if [ ! -x "$bb" ]; then
        vm_apt_update bookworm || vm_die "apt-get update for bookworm failed"
        mkdir -p "$vm_cache/busybox"
        (cd "$vm_cache/busybox" && rm -f ./*.deb && vm_apt bookworm apt-get download busybox-static >/dev/null) \
            || vm_die "apt-get download busybox-static failed"
        dpkg-deb --fsys-tarfile "$vm_cache"/busybox/busybox-static_*.deb | tar -x -O ./bin/busybox >"$bb.tmp"
        chmod +x "$bb.tmp"
        mv "$bb.tmp" "$bb"
    fi
    cp "$bb" "$root/bin/busybox"
    for tool in $("$bb" --list); do
        [ -e "$root/bin/$tool" ] || ln -s busybox "$root/bin/$tool"
    done
    ln -sf ../../bin/busybox "$root/usr/bin/env"

    # The real tools the tests and the lab use (busybox's would differ).
    for tool in ip ncat nmap bpftool setpriv bash strace flock; do
        exe=$(command -v "$tool") || vm_die "$tool is missing (scripts/setup.sh installs it)"
        vm_copy_exe "$root" "$(readlink -f "$exe")"
        # Also where PATH lookups and #! lines expect it.
        mkdir -p "$root/usr/bin"
        [ -e "$root/usr/bin/$tool" ] || ln -s "$(readlink -f "$exe")" "$root/usr/bin/$tool"
    done
    mkdir -p "$root/usr/share/nmap"
    cp /usr/share/nmap/nmap-* "$root/usr/share/nmap/"
    cp /etc/services /etc/protocols "$root/etc/"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    echo steer-vm >"$root/etc/hostname"

    # This build, at the same absolute paths, so the tests find the
    # binaries next to themselves and the scripts through CARGO_MANIFEST_DIR.
    mkdir -p "$root$PWD/target/release/deps" "$root$PWD/scripts"
    for exe in steerctl sockmap-update sk-lookup-attach steer-bench test-server; do
        [ -x "target/release/$exe" ] && cp "target/release/$exe" "$root$PWD/target/release/"
    done
    cp scripts/verify-nmap.sh "$root$PWD/scripts/"
    : >"$root/steer/tests.list"
    # Each argument: a test executable, then any arguments it runs with.
    for line in "$@"; do
        exe=${line%% *}
        cp "$exe" "$root$exe"
        echo "$line" >>"$root/steer/tests.list"
    done
    echo "$PWD" >"$root/steer/repo"
    ln -s "$PWD/target/release/steerctl" "$root/usr/bin/steerctl"
    cp scripts/lab-guest.sh "$root/steer/"
    cp scripts/vm-init.sh "$root/init"
    chmod +x "$root/init"
    (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) >"$out"
}

# Appends KERNEL_DIR's modules to the shared archive: prints the initrd path.
vm_initrd() {
    local shared=$1 kdir=$2 release mods initrd
    release=$(cat "$kdir/release")
    mods=$vm_out/modules-$release
    rm -rf "$mods"
    mkdir -p "$mods/lib/modules"
    cp "$kdir"/modules/* "$mods/lib/modules/"
    initrd=$vm_out/initrd-$release.cpio
    { cat "$shared"; (cd "$mods" && find . -print0 | cpio --null -o -H newc --quiet); } >"$initrd"
    echo "$initrd"
}

# qemu-system-x86_64 with the accelerator chosen by vm_detect_accel, under
# `timeout`: vm_qemu TIMEOUT KERNEL_DIR INITRD CMDLINE [QEMU ARGS...]
vm_qemu() {
    local limit=$1 kdir=$2 initrd=$3 cmdline=$4
    shift 4
    local accel=(-accel "tcg,thread=multi" -cpu max)
    [ "$vm_accel" = kvm ] && accel=(-accel kvm -cpu host)
    "${vm_wrap[@]}" timeout -k 10 "$limit" qemu-system-x86_64 -nodefaults -no-user-config -display none -monitor none \
        -no-reboot "${accel[@]}" -M pc -smp "${STEER_VM_CPUS:-2}" -m "${STEER_VM_MEMORY:-2048}" \
        -kernel "$kdir/vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 rdinit=/init panic=-1 loglevel=4 $cmdline" "$@"
}

# Sets vm_accel to kvm or tcg: KVM only if /dev/kvm opens and a probe guest
# boots with it within 30 s (a nested guest without hardware support hangs).
# The answer is kept for the rest of this boot of the machine.
vm_detect_accel() {
    local kdir=$1 initrd=$2 log memo
    case ${STEER_VM_ACCEL:-auto} in
        kvm | tcg)
            vm_accel=$STEER_VM_ACCEL
            return
            ;;
    esac
    memo=$vm_cache/accel-$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)
    if [ -s "$memo" ]; then
        vm_accel=$(cat "$memo")
        vm_log "accelerator: $vm_accel (probed earlier in this boot; STEER_VM_ACCEL overrides)"
        return
    fi
    vm_accel=tcg
    if [ -c /dev/kvm ] && { : <>/dev/kvm; } 2>/dev/null; then
        log=$vm_out/kvm-probe.log
        rm -f "$log"
        vm_accel=kvm
        vm_qemu 30 "$kdir" "$initrd" steer.mode=probe -serial "file:$log" >/dev/null 2>&1 || true
        if grep -q STEER-VM-PROBE-OK "$log" 2>/dev/null; then
            vm_log "KVM works: using it"
        else
            vm_accel=tcg
            vm_log "/dev/kvm is there but a KVM guest did not boot within 30 s (no nested virtualisation?): using TCG emulation"
        fi
    else
        vm_log "no usable /dev/kvm: using TCG emulation"
    fi
    rm -f "$vm_cache"/accel-*
    echo "$vm_accel" >"$memo"
}

#!/usr/bin/env bash
# Builds steer's container image with no registry: steerctl, sockmap-update
# and sk-lookup-attach built static (the musl target, release, stripped) in
# an image FROM scratch that holds nothing else (they need no libc, shell,
# /etc or certificates: only /proc, /sys and a bpffs at run time, which the
# runtime and the volumes give). OCI labels say the version, source and
# revision; layers and dates are pinned to the last commit's time, so the same
# tree builds the same image.
#
# Usage: scripts/image.sh [--tag NAME]
#   --tag NAME  image name (default localhost/steer); the tag is the package
#               version (steerctl --version, Cargo.toml's workspace version)
#
# Output: the image NAME:VERSION in podman's local storage, and the same image
# as an OCI archive, target/image/steer-VERSION.oci.tar (NAME's last part), to load elsewhere
# (`podman load -i`, `docker load -i`, `ctr -n k8s.io images import`, or
# `skopeo copy oci-archive:FILE docker://REGISTRY/steer:VERSION`). The last
# lines give the archive's path and the image's size.
#
# Environment: STEER_IMAGE_SOURCE  the org.opencontainers.image.source label
# (default: the repository URL in Cargo.toml, else git's origin URL).
# Needs podman (installed from Debian's packages when run as root) and rustup.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
export PATH="$HOME/.cargo/bin:$PATH"

name=localhost/steer
while [ $# -gt 0 ]; do
    case $1 in
        --tag)
            name=${2:?--tag needs a name}
            shift
            ;;
        -h | --help)
            sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "image.sh: unknown argument $1" >&2
            exit 2
            ;;
    esac
    shift
done
say() { echo "image.sh: $*" >&2; }
die() {
    say "$*"
    exit 1
}

if ! command -v podman >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "podman is missing: apt-get install podman (as root)"
    say "installing podman"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq podman >/dev/null
fi

target=$(uname -m)-unknown-linux-musl
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target" >/dev/null 2>&1 || die "rustup target add $target failed"
fi
tools=(steerctl sockmap-update sk-lookup-attach)
say "building ${tools[*]} for $target (release, static)"
nice -n 10 cargo build --release --quiet --target "$target" -p steerctl -p sockmap-update -p sk-lookup-attach

out=target/image
context=$out/context
rm -rf "$context"
mkdir -p "$context/usr/bin"
for tool in "${tools[@]}"; do
    bin=target/$target/release/$tool
    # A dynamically linked binary cannot start FROM scratch: no loader, no libc.
    if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
        die "$bin is dynamically linked; it would not run in an image FROM scratch"
    fi
    install -m 755 "$bin" "$context/usr/bin/$tool"
    strip "$context/usr/bin/$tool"
done
version=$("$context/usr/bin/steerctl" --version | awk '{print $2}')
[ -n "$version" ] || die "steerctl --version printed no version"

revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || revision="$revision-dirty"
epoch=$(git log -1 --format=%ct 2>/dev/null || echo 0)
source=${STEER_IMAGE_SOURCE:-$(sed -n 's/^repository *= *"\(.*\)"$/\1/p' Cargo.toml | head -1)}
[ -n "$source" ] || source=$(git remote get-url origin 2>/dev/null || true)
[ -n "$source" ] || source="steer $version, revision $revision"

cat >"$context/Containerfile" <<'EOF'
FROM scratch
COPY usr/ /usr/
ENV PATH=/usr/bin
# root: the pins are root's, 0700 (see the README's security model).
USER 0:0
ENTRYPOINT ["/usr/bin/steerctl"]
CMD ["--help"]
EOF

say "building $name:$version"
podman build --quiet --timestamp "$epoch" --file "$context/Containerfile" \
    --label org.opencontainers.image.title=steer \
    --label "org.opencontainers.image.description=steerctl, sockmap-update and sk-lookup-attach: steer TCP/UDP connections with BPF sk_lookup" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.source=$source" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.licenses=MIT OR Apache-2.0" \
    --tag "$name:$version" "$context" >/dev/null

archive=$out/${name##*/}-$version.oci.tar
rm -f "$archive"
podman save --quiet --format oci-archive --output "$archive" "$name:$version"
size=$(podman image inspect --format '{{.Size}}' "$name:$version")
say "image $name:$version: $size bytes ($((size / 1024 / 1024)) MiB); archive $archive: $(stat -c %s "$archive") bytes"
echo "$archive"
echo "$name:$version $size"

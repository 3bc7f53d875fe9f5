#!/usr/bin/env bash
# Builds the previous release of steer once, for the upgrade tests
# (tests/upgrade.rs makes a state of the previous layout with its
# steerctl, then upgrades it with this tree's) and the package test
# (scripts/package-test.sh installs its package, then upgrades to this
# tree's). The previous release is commit $STEER_OLD_RELEASE, by default
# the last commit of the layout before this tree's (LAYOUT_VERSION in
# steer-common, less one; the table below). `old-release.sh --layout N`
# builds the table's last commit of layout N instead (tests/upgrade.rs
# upgrades from older layouts too). The source comes from the
# local history by `git archive` (no network, no worktree registered); the
# result is cached in target/old-release/<commit>/ and reused while that
# directory is complete:
#   bin/steerctl, bin/sockmap-update, bin/sk-lookup-attach  its release tools
#   steer_old.deb                                           its package
#   layout                                                  its LAYOUT_VERSION
# The release build shares this tree's target directory, so the crates both
# trees use are built once (scripts/package.sh reuses them). The package's
# man pages and completions are this tree's (`cargo xtask dist`): they are
# documentation only, and generating the old ones would build the old tree
# a second time. Needs no root. Prints the directory.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
export PATH="$HOME/.cargo/bin:$PATH"
# The last commit of each layout, by number.
last_of_layout() {
    case $1 in
        2) echo 4a30cdb ;; # main just before layout 3 (dir-slots, f599083)
        3) echo e14b16b ;; # the last release of layout 3 (dir-slots)
        4) echo abdec9f ;; # main just before layout 5 (the trace flag, 23c922e)
        5) echo cef26ee ;; # main just before layout 6 (incremental writes)
        *) return 1 ;;
    esac
}
layout_of() { sed -n 's/^pub const LAYOUT_VERSION: u32 = \([0-9]*\);/\1/p' "$1/steer-common/src/lib.rs"; }
current=$(layout_of .)
if [ "${1:-}" = --layout ] && [ -n "${2:-}" ]; then
    wanted=$2
    commit=$(last_of_layout "$wanted") || {
        echo "old-release.sh: no commit known for layout $wanted: add it to last_of_layout" >&2
        exit 1
    }
elif [ $# -gt 0 ]; then
    echo "usage: old-release.sh [--layout N]" >&2
    exit 2
else
    wanted=
    commit=${STEER_OLD_RELEASE:-$(last_of_layout $((current - 1)))} || {
        echo "old-release.sh: no commit known for layout $((current - 1)): add it to last_of_layout, or set STEER_OLD_RELEASE" >&2
        exit 1
    }
fi
full=$(git rev-parse --verify --quiet "$commit^{commit}") || {
    echo "old-release.sh: commit $commit is not in this clone (a shallow clone? git fetch --unshallow)" >&2
    exit 1
}
repo=$PWD
dir=$repo/target/old-release/${full:0:12}
# Its layout, from its own source (kept beside the build; directories
# built before this file existed get it here).
write_layout() {
    local layout
    layout=$(layout_of "$dir/src")
    [ -n "$layout" ] || {
        echo "old-release.sh: ${full:0:12} has no LAYOUT_VERSION" >&2
        exit 1
    }
    if [ -n "$wanted" ] && [ "$layout" != "$wanted" ]; then
        echo "old-release.sh: ${full:0:12}, last_of_layout's commit for layout $wanted, has layout $layout" >&2
        exit 1
    fi
    echo "$layout" >"$dir/layout"
}
if [ -e "$dir/done" ]; then
    write_layout
    echo "$dir"
    exit 0
fi
if ! cargo deb --version >/dev/null 2>&1; then
    echo "old-release.sh: cargo-deb is missing: cargo install --locked cargo-deb --version 3.8.0" >&2
    exit 1
fi
started=$(date +%s)
rm -rf "$dir"
mkdir -p "$dir/src" "$dir/bin"
git archive "$full" | tar -x -C "$dir/src"
write_layout
tools=(steerctl sockmap-update sk-lookup-attach)
# Cargo would take the workspace's own crates built from another tree (this
# one, or another old release: the units' names do not depend on the path,
# and a source inside the target directory is recorded relative to it) as
# fresh. Cleaned before and after, each tree's are built from its source;
# their dependencies stay built.
clean_ours() {
    for crate in steer-common steer "${tools[@]}"; do
        (cd "$dir/src" && CARGO_TARGET_DIR=$repo/target cargo clean --release --quiet -p "$crate" 2>/dev/null) || true
    done
}
clean_ours
(cd "$dir/src" && CARGO_TARGET_DIR=$repo/target nice -n 10 cargo build --release --quiet "${tools[@]/#/-p}")
for tool in "${tools[@]}"; do cp "$repo/target/release/$tool" "$dir/bin/"; done
cargo xtask dist --out "$dir/src/packaging/dist" >/dev/null
(cd "$dir/src" && CARGO_TARGET_DIR=$repo/target cargo deb -p steerctl --no-build --quiet --output "$dir/steer_old.deb" >/dev/null)
# The current tree's release tools are built again by scripts/package.sh.
clean_ours
touch "$dir/done"
echo "old-release.sh: built ${full:0:12} in $(($(date +%s) - started)) s" >&2
echo "$dir"

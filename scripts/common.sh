# Sourced by the entry-point scripts: run from the repository root, as root
# (re-running the calling script under sudo if need be), with dependencies in.
# As root it never calls sudo, so it works where sudo is not installed.
# shellcheck shell=bash
script=$(readlink -f "$0")
cd "$(dirname "$script")/.."
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "${script##*/}: needs root (it loads BPF programs and makes network namespaces) and sudo is not installed;" >&2
        echo "${script##*/}: run it in a root shell, e.g. su -c '$script'" >&2
        exit 1
    fi
    echo "${script##*/}: not root: re-running under sudo" >&2
    exec sudo -E "$script" "$@"
fi
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

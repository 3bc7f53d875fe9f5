# Sourced by the entry-point scripts: run from the repository root, as root
# (re-running the calling script under sudo if need be), with dependencies in.
# shellcheck shell=bash
script=$(readlink -f "$0")
cd "$(dirname "$script")/.."
if [ "$(id -u)" -ne 0 ]; then
    exec sudo -E "$script" "$@"
fi
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

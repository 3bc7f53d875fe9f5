#!/usr/bin/env bash
# Checks that the README's quick start works as it says: as root where no
# sudo exists (scripts/demo.sh must never call it), and as a user, where it
# re-runs itself under sudo or, without sudo, says what to do.
# Run as root; scripts/test.sh runs it.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "quickstart-test.sh: run as root" >&2
    exit 1
fi
fail() {
    echo "quickstart-test: FAIL: $*" >&2
    exit 1
}

tmp=$(mktemp -d)
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
mkdir -m 755 "$tmp/poison" "$tmp/stub" "$tmp/bare"
mkdir -m 777 "$tmp/log"
printf '#!/bin/sh\necho "sudo was called: $*" >&2\nexit 99\n' >"$tmp/poison/sudo"
printf '#!/bin/sh\necho "sudo $*" >%s/sudo.log\n' "$tmp/log" >"$tmp/stub/sudo"
chmod 755 "$tmp/poison/sudo" "$tmp/stub/sudo"
# Just what common.sh needs before it decides, and no sudo.
for tool in bash readlink dirname id; do ln -s "$(command -v "$tool")" "$tmp/bare/$tool"; done

# 1. Root, with a sudo on PATH that fails if anything calls it.
echo "quickstart-test: scripts/demo.sh as root, sudo never called"
if ! PATH="$tmp/poison:$PATH" scripts/demo.sh >"$tmp/demo.out" 2>&1; then
    cat "$tmp/demo.out" >&2
    fail "scripts/demo.sh as root failed"
fi
! grep -q 'sudo was called' "$tmp/demo.out" || fail "scripts/demo.sh called sudo as root"
for line in 'hello 7' 'hello 77' 'hello 777' 'hello label' 'open tcp 777'; do
    grep -qx "$line" "$tmp/demo.out" || fail "the walkthrough did not print '$line'"
done
# The README shows this output: the same lines but for ids, pids, fds,
# cookies and inodes (and the table widths they change). They are masked
# wherever they appear: after the word that names them, in a table's COOKIE
# column, and as any number of 3 or more digits. A machine that has made
# few links or sockets prints short ones ("link 74", a 2-digit cookie), so
# the 3-digit rule alone is not enough.
shape() {
    awk -F'│' -v OFS='│' '
        /^┌/ { cookie = 0 }
        NF > 2 {
            for (i = 2; i < NF; i++) if ($i ~ /^ *COOKIE *$/) cookie = i
            if (cookie && $cookie ~ /^ *[0-9]+ *$/) $cookie = " N "
        }
        { print }' "$@" |
        sed -E 's/\b(id|pid|prog|link|cookie|fd|inode) [0-9]+/\1 N/g; s/[0-9]{3,}/N/g; s/ +/ /g; s/─+/─/g'
}
# The walkthrough: from its first command to the end of its code block.
sed -n '/^\$ steerctl load$/,/^```$/p' README.md | sed '$d' | shape >"$tmp/readme.shape"
if ! diff <(shape "$tmp/demo.out" | sed '${/^$/d}') "$tmp/readme.shape" >"$tmp/readme.diff"; then
    cat "$tmp/readme.diff" >&2
    fail "the README's walkthrough differs from scripts/demo.sh's output (< demo, > README): paste the new output in"
fi

# 2. and 3. A user: re-run under sudo when there is one; otherwise say so.
demo=$PWD/scripts/demo.sh
as_nobody() { setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"; }
if ! as_nobody test -x "$demo"; then
    echo "quickstart-test: skipping the non-root cases: user nobody cannot reach $demo"
    echo "quickstart-test: ok"
    exit 0
fi
echo "quickstart-test: scripts/demo.sh as a user re-runs itself under sudo"
as_nobody env PATH="$tmp/stub:/usr/bin:/bin" HOME=/nonexistent "$demo" one two 2>"$tmp/user.err" ||
    fail "as a user with sudo: $(cat "$tmp/user.err")"
[ "$(cat "$tmp/log/sudo.log")" = "sudo -E $demo one two" ] || fail "sudo called as: $(cat "$tmp/log/sudo.log")"

echo "quickstart-test: scripts/demo.sh as a user without sudo says what to do"
status=0
as_nobody env PATH="$tmp/bare" HOME=/nonexistent "$demo" 2>"$tmp/nosudo.err" || status=$?
[ "$status" -eq 1 ] || fail "as a user without sudo: exit status $status, not 1"
grep -q 'sudo is not installed' "$tmp/nosudo.err" || fail "as a user without sudo: $(cat "$tmp/nosudo.err")"
grep -q "run it in a root shell" "$tmp/nosudo.err" || fail "no advice: $(cat "$tmp/nosudo.err")"
echo "quickstart-test: ok"

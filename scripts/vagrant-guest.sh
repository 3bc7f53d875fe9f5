#!/usr/bin/env bash
# The guest side of scripts/vagrant-lab.sh: run as root inside the Vagrant
# guest (`vagrant ssh -c 'sudo bash /vagrant/scripts/vagrant-guest.sh STEP'`)
# with the steer package installed. Each STEP prints what it runs and checks,
# `vagrant-guest: FAILED: ...` for each failed check, and exits non-zero if
# any failed. Not for direct use.
#
# Steps:
#   walk-start | walk-steer | walk-del | walk-detach | walk-end
#       the seed walkthrough, in the parts between which the host scans
#   units-setup       the package's units as installed; then enables them with
#                     /etc/steer/config.json and a server unit (steer-lab-web)
#   boot-check N      after a boot: the units ran, port 80 is steered, metrics
#   restart-check     steer-watch follows `systemctl restart steer-lab-web`:
#                     connections answered/refused while it restarts
#   stop-check        systemctl stop/start of steer.service and steer-watch
#   disable           systemctl disable of the three units
#   disabled-check    after a boot with them disabled: nothing loaded
#   activation-check  systemd 256+: a socket unit, PassFileDescriptorsToExec=yes
#                     and ExecStartPost=steerctl register LABEL
# SC2015: `ok` never fails, so `test && ok || fail` is an if-then-else.
# SC2016: the unit text's $$$$ is systemd's, then the shell's.
# shellcheck disable=SC2015,SC2016,SC1091
set -uo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8

failures=0
say() { printf '%s\n' "$*"; }
fail() {
    say "vagrant-guest: FAILED: $*"
    failures=$((failures + 1))
}
ok() { say "vagrant-guest: ok: $*"; }
# Prints a command line, then runs it.
run() {
    say "\$ $*"
    "$@"
}
run_ok() { run "$@" || fail "$* exited $?"; }

# One TCP connection to ADDR PORT from bash itself (no process per try):
# prints the first line answered, or `refused` / `no answer`.
ask() {
    local line=""
    if ! { exec 3<>"/dev/tcp/$1/$2"; } 2>/dev/null; then
        echo refused
        return
    fi
    IFS= read -r -t 2 -u 3 line || true
    exec 3<&-
    echo "${line:-no answer}"
}

# Sleeps SECONDS without a process (a read that times out on a fifo no one
# writes): a loop with `sleep` forks each time, slow under emulation.
nap() {
    [ -p /run/steer-lab.nap ] || mkfifo /run/steer-lab.nap
    [ -e /dev/fd/5 ] || exec 5<>/run/steer-lab.nap
    read -r -t "$1" -u 5 || true
}

# An HTTP GET of the metrics endpoint: prints the status line's code
# (or `down`) and leaves the body in /run/steer-lab.scrape.
scrape() {
    local status
    : >/run/steer-lab.scrape
    if ! { exec 4<>/dev/tcp/127.0.0.1/9966; } 2>/dev/null; then
        echo down
        return
    fi
    printf 'GET /metrics HTTP/1.1\r\nHost: steer\r\nConnection: close\r\n\r\n' >&4
    timeout 5 cat <&4 >/run/steer-lab.scrape
    exec 4<&-
    status=$(head -n 1 /run/steer-lab.scrape | awk '{ print $2 }')
    echo "${status:-down}"
}
metric() { tr -d '\r' </run/steer-lab.scrape | awk -v m="$1" '$1 == m { print $2 }'; }

# Waits (at most LIMIT seconds) until ADDR PORT answers with a line that
# starts with WORD; prints the answer.
wait_answer() {
    local addr=$1 port=$2 word=$3 limit=$4 start=$SECONDS reply
    while [ $((SECONDS - start)) -lt "$limit" ]; do
        reply=$(ask "$addr" "$port")
        case $reply in "$word"*)
            echo "$reply"
            return 0
            ;;
        esac
        sleep 0.2
    done
    echo "$reply"
    return 1
}

ncat_pid() { systemctl show -p MainPID --value steer-lab-ncat.service; }

write_web_unit() {
    cat >/etc/systemd/system/steer-lab-web.service <<'EOF'
[Unit]
Description=steer lab: a server on 127.0.0.1:8080 (answers "web MAINPID")
After=network.target

[Service]
# systemd makes $$$$ a $$, sh makes that its own pid, which exec makes ncat's.
ExecStart=/bin/sh -c 'exec /usr/bin/ncat -lk 127.0.0.1 8080 --sh-exec "echo web $$$$"'

[Install]
WantedBy=multi-user.target
EOF
}

config='{"bindings": [{"label": "web", "protocol": "tcp", "prefix": "0.0.0.0/0", "port": 80}],
 "registrations": [{"label": "web", "protocol": "tcp", "address": "127.0.0.1", "port": 8080, "process": "ncat"}]}'

units=(steer.service steer-watch.service steer-metrics.service)

step=${1:-}
case $step in
    walk-start)
        # The seed's service: one ncat echo socket on 127.0.0.1:7777, as a
        # transient unit so it outlives this ssh session.
        run_ok systemd-run --quiet --unit=steer-lab-ncat /usr/bin/ncat -4kle /bin/cat 127.0.0.1 7777
        for _ in $(seq 100); do
            ncat -z 127.0.0.1 7777 2>/dev/null && break
            sleep 0.1
        done
        say "ncat pid $(ncat_pid) on 127.0.0.1:7777"
        run_ok steerctl load
        run_ok steerctl attach
        ;;
    walk-steer)
        run_ok steerctl ports add 7 77 777
        run_ok steerctl socket set --pid "$(ncat_pid)"
        run_ok steerctl status
        ;;
    walk-del) run_ok steerctl ports del 777 ;;
    walk-detach) run_ok steerctl detach ;;
    walk-end)
        run_ok steerctl unload
        run_ok systemctl stop steer-lab-ncat.service
        ;;

    units-setup)
        # The README: installed, none enabled nor started.
        for unit in "${units[@]}"; do
            state="$(systemctl is-enabled "$unit" 2>/dev/null) $(systemctl is-active "$unit" 2>/dev/null)"
            if [ "$state" = "disabled inactive" ]; then ok "$unit as installed: $state"; else fail "$unit as installed: $state"; fi
        done
        mkdir -p /etc/steer
        printf '%s\n' "$config" >/etc/steer/config.json
        write_web_unit
        run cat /etc/steer/config.json
        run_ok systemctl daemon-reload
        run_ok systemctl enable steer.service steer-watch.service steer-metrics.service steer-lab-web.service
        ;;

    boot-check)
        say "boot ${2:-?}: $(uname -r), $(systemctl --version | head -n 1), up $(cut -d' ' -f1 /proc/uptime) s"
        state=$(timeout 120 systemctl is-system-running --wait 2>/dev/null)
        say "system: ${state:-starting}"
        [ "$state" = running ] || { fail "system state ${state:-unknown}"; systemctl --failed --no-legend; }
        for unit in "${units[@]}" steer-lab-web.service; do
            say "$unit: $(systemctl show -p ActiveState,SubState,Result --value "$unit" | paste -sd' ')"
        done
        [ "$(systemctl show -p Result --value steer.service)" = success ] || fail "steer.service did not succeed"
        for unit in steer-watch.service steer-metrics.service; do
            [ "$(systemctl is-active "$unit")" = active ] || fail "$unit is not active"
        done
        # Before network-pre.target, like a firewall.
        steer_up=$(systemctl show -p ActiveEnterTimestampMonotonic --value steer.service)
        net_pre=$(systemctl show -p ActiveEnterTimestampMonotonic --value network-pre.target)
        if [ "$steer_up" -gt 0 ] && [ "$steer_up" -le "$net_pre" ]; then
            ok "steer.service up at $((steer_up / 1000)) ms, network-pre.target at $((net_pre / 1000)) ms"
        else
            fail "steer.service up at $steer_up us, network-pre.target at $net_pre us"
        fi
        run journalctl -b -o cat --no-pager -u steer.service -u steer-watch.service
        reply=$(wait_answer 127.0.0.1 80 web 30) && ok "127.0.0.1:80 answers: $reply" || fail "127.0.0.1:80: $reply"
        run_ok steerctl list
        code=$(scrape)
        if [ "$code" = 200 ]; then
            ok "metrics: 200, steer_registered_sockets{label=\"web\"} $(metric 'steer_registered_sockets{label="web",domain="ipv4",protocol="tcp"}'), steer_lookups_total{label=\"web\"} $(metric 'steer_lookups_total{label="web",domain="ipv4",protocol="tcp"}')"
        else
            fail "metrics endpoint: $code"
        fi
        ;;

    restart-check)
        # A client connects every 10 ms while the server unit restarts (from
        # bash itself: no process per connection, which under emulation
        # would take longer than the restart); the metrics endpoint is
        # scraped every 0.5 s all along.
        # The fifo nap reads, made before the subshells that use it.
        rm -f /run/steer-lab.nap
        mkfifo /run/steer-lab.nap
        touch /run/steer-lab.scraping
        (
            n=0 answered=0
            while [ $n -lt 600 ] && [ -e /run/steer-lab.scraping ]; do
                [ "$(scrape)" = 200 ] && answered=$((answered + 1))
                n=$((n + 1))
                nap 0.5
            done
            echo "$n $answered" >/run/steer-lab.scrapes
        ) &
        scraper=$!
        for round in 1 2 3; do
            before=$(systemctl show -p MainPID --value steer-lab-web.service)
            touch /run/steer-lab.client
            (
                n=0
                while [ $n -lt 3000 ] && [ -e /run/steer-lab.client ]; do
                    ask 127.0.0.1 80
                    n=$((n + 1))
                    nap 0.01
                done >/run/steer-lab.answers
            ) &
            client=$!
            nap 1
            systemctl restart steer-lab-web.service
            after=$(systemctl show -p MainPID --value steer-lab-web.service)
            # Until the new server answers (at most 30 s), then 2 s more.
            for _ in $(seq 300); do
                grep -q "^web $after\$" /run/steer-lab.answers && break
                nap 0.1
            done
            nap 2
            rm -f /run/steer-lab.client
            wait $client
            total=$(wc -l </run/steer-lab.answers)
            refused=$(grep -c '^refused$' /run/steer-lab.answers)
            by_old=$(grep -c "^web $before\$" /run/steer-lab.answers)
            by_new=$(grep -c "^web $after\$" /run/steer-lab.answers)
            other=$((total - refused - by_old - by_new))
            say "restart $round: server pid $before -> $after; $total connections: $by_old answered by the old server, $refused refused, $by_new answered by the new one, $other other"
            # Steered again: from its first answer on, the new server answers
            # every connection.
            since=$(sed -n "/^web $after\$/,\$p" /run/steer-lab.answers | grep -vc "^web $after\$")
            if [ "$by_new" -ge 3 ] && [ "$since" -eq 0 ]; then
                ok "restart $round: steered to the new server from its first answer on"
            else
                fail "restart $round: the new server answered $by_new, and $since connections after its first answer went elsewhere"
            fi
        done
        rm -f /run/steer-lab.scraping
        wait $scraper
        read -r scrapes scraped </run/steer-lab.scrapes
        if [ "$scrapes" -gt 0 ] && [ "$scrapes" = "$scraped" ]; then
            ok "metrics answered all $scrapes scrapes during the restarts"
        else
            fail "metrics answered $scraped of $scrapes scrapes during the restarts"
        fi
        run journalctl -b -o cat --no-pager -u steer-watch.service -n 8
        ;;

    stop-check)
        # README: stopping steer.service changes nothing in the kernel.
        run_ok systemctl stop steer.service
        say "steer.service $(systemctl is-active steer.service), steer-watch.service $(systemctl is-active steer-watch.service) (Requires=steer.service)"
        reply=$(ask 127.0.0.1 80)
        case $reply in web*) ok "steer.service stopped: still steered ($reply)" ;; *) fail "steer.service stopped: $reply" ;; esac
        run_ok systemctl start steer.service
        run journalctl -o cat --no-pager -u steer.service -n 4
        journalctl -o cat --no-pager -u steer.service -n 4 | grep -q 'already' ||
            fail "steer.service started again did not find the state in place"
        # Without steer-watch, a restarted server is not followed...
        run_ok systemctl stop steer-watch.service
        run_ok systemctl restart steer-lab-web.service
        sleep 1
        reply=$(ask 127.0.0.1 80)
        [ "$reply" = refused ] && ok "steer-watch stopped, server restarted: refused" || fail "steer-watch stopped, server restarted: $reply"
        # ...until it runs again.
        run_ok systemctl start steer-watch.service
        reply=$(wait_answer 127.0.0.1 80 web 30) && ok "steer-watch started again: $reply" || fail "steer-watch started again: $reply"
        code=$(scrape)
        [ "$code" = 200 ] && ok "metrics: 200 after the stops and starts" || fail "metrics: $code"
        run_ok systemctl reload steer.service
        run journalctl -o cat --no-pager -u steer.service -n 2
        ;;

    disable)
        run_ok systemctl disable steer.service steer-watch.service steer-metrics.service
        for unit in "${units[@]}"; do say "$unit: $(systemctl is-enabled "$unit")"; done
        ;;

    disabled-check)
        say "boot ${2:-?}: up $(cut -d' ' -f1 /proc/uptime) s"
        timeout 120 systemctl is-system-running --wait >/dev/null 2>&1
        for unit in "${units[@]}"; do
            state=$(systemctl is-active "$unit")
            [ "$state" = inactive ] && ok "$unit: $state" || fail "$unit: $state"
        done
        if steerctl status >/dev/null 2>&1; then fail "steer is loaded with its units disabled"; else ok "steerctl status: not loaded"; fi
        wait_answer 127.0.0.1 8080 web 30 >/dev/null || fail "steer-lab-web does not answer"
        reply=$(ask 127.0.0.1 80)
        [ "$reply" = refused ] && ok "127.0.0.1:80: refused" || fail "127.0.0.1:80: $reply"
        code=$(scrape)
        [ "$code" = down ] && ok "metrics endpoint: not listening" || fail "metrics endpoint: $code"
        ;;

    activation-check)
        say "$(. /etc/os-release && echo "$PRETTY_NAME"), $(uname -r), $(systemctl --version | head -n 1)"
        cat >/etc/systemd/system/steer-lab-backend.service <<'EOF'
[Unit]
Description=steer lab: the server behind the proxy

[Service]
ExecStart=/usr/bin/ncat -lk 127.0.0.1 9081 --sh-exec "echo activated"
EOF
        cat >/etc/systemd/system/steer-lab-act.socket <<'EOF'
[Socket]
ListenStream=127.0.0.1:8081

[Install]
WantedBy=sockets.target
EOF
        # The README's pattern: the socket unit's fds reach ExecStartPost.
        cat >/etc/systemd/system/steer-lab-act.service <<'EOF'
[Unit]
Description=steer lab: a socket-activated server, registered with its own fds
Requires=steer-lab-backend.service steer.service
After=steer-lab-backend.service steer.service

[Service]
ExecStart=/usr/lib/systemd/systemd-socket-proxyd 127.0.0.1:9081
PassFileDescriptorsToExec=yes
ExecStartPost=/usr/bin/steerctl register act
EOF
        mkdir -p /etc/steer
        echo '{"bindings": [{"label": "act", "protocol": "tcp", "prefix": "0.0.0.0/0", "port": 81}]}' >/etc/steer/config.json
        run cat /etc/systemd/system/steer-lab-act.service
        run_ok systemctl daemon-reload
        run_ok systemctl start steer.service steer-lab-act.socket
        reply=$(ask 127.0.0.1 81)
        [ "$reply" = refused ] && ok "before activation, 127.0.0.1:81: refused (act has no socket)" || fail "before activation, 127.0.0.1:81: $reply"
        reply=$(wait_answer 127.0.0.1 8081 activated 30) && ok "127.0.0.1:8081 (activates the service): $reply" ||
            fail "127.0.0.1:8081: $reply"
        run journalctl -o cat --no-pager -u steer-lab-act.service
        if journalctl -o cat --no-pager -u steer-lab-act.service | grep -q "Unknown key 'PassFileDescriptorsToExec'"; then
            # Not in this systemd: ExecStartPost gets no fds, and the README's
            # other form, register by address, must do.
            say "vagrant-guest: NOTE: $(systemctl --version | head -n 1) does not know PassFileDescriptorsToExec=: ExecStartPost=steerctl register LABEL cannot work here"
            journalctl -o cat --no-pager -u steer-lab-act.service | grep -q 'LISTEN_PID is not set' ||
                fail "steerctl register act without the fds did not say LISTEN_PID is not set"
            mkdir -p /etc/systemd/system/steer-lab-act.service.d
            printf '[Service]\nExecStartPost=\nExecStartPost=/usr/bin/steerctl register act tcp 127.0.0.1 8081\n' \
                >/etc/systemd/system/steer-lab-act.service.d/by-address.conf
            run cat /etc/systemd/system/steer-lab-act.service.d/by-address.conf
            run_ok systemctl daemon-reload
            systemctl stop steer-lab-act.service steer-lab-act.socket
            systemctl reset-failed steer-lab-act.service steer-lab-act.socket
            run_ok systemctl start steer-lab-act.socket
            reply=$(wait_answer 127.0.0.1 8081 activated 30) && ok "127.0.0.1:8081 (activates the service): $reply" ||
                fail "127.0.0.1:8081: $reply"
            run journalctl -o cat --no-pager -u steer-lab-act.service -n 3
            reply=$(wait_answer 127.0.0.1 81 activated 10) && ok "127.0.0.1:81 steered to the socket systemd holds: $reply" ||
                fail "127.0.0.1:81: $reply"
            run_ok steerctl list
            [ "$failures" -eq 0 ] || { say "vagrant-guest: $step: $failures failed"; exit 1; }
            exit 0
        fi
        journalctl -o cat --no-pager -u steer-lab-act.service | grep -q '^registered tcp 127.0.0.1:8081 (fd 3, cookie [0-9]*) as act$' ||
            fail "ExecStartPost=steerctl register act did not register the passed socket"
        reply=$(wait_answer 127.0.0.1 81 activated 10) && ok "127.0.0.1:81 steered to the activated socket: $reply" ||
            fail "127.0.0.1:81: $reply"
        run_ok steerctl list
        # And without PassFileDescriptorsToExec, ExecStartPost gets no fds.
        mkdir -p /etc/systemd/system/steer-lab-act.service.d
        printf '[Service]\nPassFileDescriptorsToExec=no\n' >/etc/systemd/system/steer-lab-act.service.d/no-fds.conf
        run_ok steerctl unregister act
        run_ok systemctl daemon-reload
        if systemctl restart steer-lab-act.service 2>/dev/null; then
            fail "with PassFileDescriptorsToExec=no the service started"
        else
            ok "with PassFileDescriptorsToExec=no: $(journalctl -o cat --no-pager -u steer-lab-act.service | grep -m1 'LISTEN_PID' || echo '(no message)')"
        fi
        rm -r /etc/systemd/system/steer-lab-act.service.d
        systemctl daemon-reload
        systemctl reset-failed steer-lab-act.service
        ;;

    *)
        echo "vagrant-guest.sh: unknown step '$step'" >&2
        exit 2
        ;;
esac
[ "$failures" -eq 0 ] || { say "vagrant-guest: $step: $failures failed"; exit 1; }

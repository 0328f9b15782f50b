#!/usr/bin/env bash
# HAProxy as the single-writer entry point of the loopback Galera cluster
# (deploy/haproxy/galera-single-writer.cfg).
#
#   haproxy.sh start    render the config into $TOPOLOGY_DIR/haproxy/ and run
#                       haproxy in the background; waits until it listens and
#                       (bounded) until one server is UP
#   haproxy.sh stop     stop it (nothing left running)
#   haproxy.sh status   each server's state (UP/DOWN) and which one is the writer;
#                       exit 0 when haproxy runs and a server is UP
#   haproxy.sh writer   print the name of the server taking the traffic (node1..3)
#   haproxy.sh sessions "name open-sessions" per server (two writers at once
#                       would show as sessions on more than one)
#
# Environment:
#   TOPOLOGY_DIR       default /tmp/storegate-topology
#   GALERA_BASE_PORT   default 4400: nodes on BASE+1..BASE+3 (as galera.sh)
#   HAPROXY_PORT       default GALERA_BASE_PORT+10 (4410): where clients connect
#   HAPROXY_WAIT_SECS  default 30: bound on the waits
#
# Clients: mysql://root@127.0.0.1:4410/ (any user of the cluster works).
set -euo pipefail

TOPOLOGY_DIR=${TOPOLOGY_DIR:-/tmp/storegate-topology}
GALERA_BASE_PORT=${GALERA_BASE_PORT:-4400}
HAPROXY_PORT=${HAPROXY_PORT:-$((GALERA_BASE_PORT + 10))}
HAPROXY_WAIT_SECS=${HAPROXY_WAIT_SECS:-30}
readonly REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
readonly TEMPLATE=$REPO_ROOT/deploy/haproxy/galera-single-writer.cfg
readonly RUN_DIR=$TOPOLOGY_DIR/haproxy
readonly CFG=$RUN_DIR/haproxy.cfg
readonly PIDFILE=$RUN_DIR/haproxy.pid
readonly LOGFILE=$RUN_DIR/haproxy.log
readonly SOCK=$RUN_DIR/admin.sock

log() { printf 'haproxy.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The pid, if it is our haproxy (its command line names our config).
haproxy_pid() {
    [[ -s $PIDFILE ]] || return 0
    local pid
    pid=$(<"$PIDFILE")
    if [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] \
        && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$CFG"; then
        echo "$pid"
    fi
}

# The COM_QUERY length prefix in the template is hand-written hex: refuse a
# config whose query was edited without it (the check would fail forever).
check_query_length() {
    local query header want
    query=$(sed -n 's/^[[:space:]]*tcp-check send "\(.*\)"[[:space:]]*$/\1/p' "$TEMPLATE")
    header=$(sed -n 's/^[[:space:]]*tcp-check send-binary \([0-9a-f]\{6\}\)0003$/\1/p' "$TEMPLATE")
    want=$(printf '%06x' $((${#query} + 1)))
    want=${want:4:2}${want:2:2}${want:0:2}   # little-endian, 3 bytes
    [[ -n $query && $header == "$want" ]] \
        || die "$TEMPLATE: COM_QUERY length prefix '$header' does not match the query (want '$want')"
}

render() {
    mkdir -p "$RUN_DIR"
    check_query_length
    sed -e "s|\${HAPROXY_LISTEN}|127.0.0.1:$HAPROXY_PORT|g" \
        -e "s|\${GALERA_NODE1}|127.0.0.1:$((GALERA_BASE_PORT + 1))|g" \
        -e "s|\${GALERA_NODE2}|127.0.0.1:$((GALERA_BASE_PORT + 2))|g" \
        -e "s|\${GALERA_NODE3}|127.0.0.1:$((GALERA_BASE_PORT + 3))|g" \
        -e "s|\${HAPROXY_RUN_DIR}|$RUN_DIR|g" \
        "$TEMPLATE" >"$CFG"
    ! grep -v '^[[:space:]]*#' "$CFG" | grep -q '\${' || die "unsubstituted variable left in $CFG"
    haproxy -c -q -f "$CFG" || die "haproxy rejects $CFG"
}

admin() { # admin COMMAND: one command on the admin socket
    [[ -S $SOCK ]] || return 1
    echo "$*" | socat -t 2 - "UNIX-CONNECT:$SOCK"
}

# "name state last-check" per server. State: UP, DOWN, or e.g. "UP 1/2"
# (going down) / "DOWN 1/2" (coming up); last check L7OK when it passed,
# INI before the first one.
server_states() {
    admin "show stat" | awk -F, '$1 == "galera" && $2 ~ /^node/ {
        st = $18; gsub(/ /, "_", st); chk = $37; sub(/^\* /, "", chk); print $2, st, chk}'
}

# "name scur" per server: the client connections each holds now.
server_sessions() {
    admin "show stat" | awk -F, '$1 == "galera" && $2 ~ /^node/ {print $2, $5}'
}

# The server new connections go to: node1 if UP, else the first backup UP;
# "UP 1/2" (going down) still takes traffic; the initial UP before any check
# (INI) is not believed.
writer() {
    server_states | awk '$2 ~ /^UP/ && $3 != "INI" {print $1; exit}'
}

wait_listening() {
    local deadline=$((SECONDS + HAPROXY_WAIT_SECS))
    while ((SECONDS < deadline)); do
        [[ -n $(haproxy_pid) ]] || { tail -n 20 "$LOGFILE" >&2; die "haproxy exited"; }
        if ss -Hltn "sport = :$HAPROXY_PORT" | grep -q . && [[ -S $SOCK ]]; then return 0; fi
        sleep 0.2
    done
    die "haproxy not listening on $HAPROXY_PORT after ${HAPROXY_WAIT_SECS}s"
}

wait_writer() {
    local deadline=$((SECONDS + HAPROXY_WAIT_SECS))
    while ((SECONDS < deadline)); do
        [[ -n $(writer) ]] && return 0
        sleep 0.2
    done
    server_states >&2 || true
    die "no Galera node UP behind haproxy after ${HAPROXY_WAIT_SECS}s (is galera.sh start done?)"
}

cmd_start() {
    command -v haproxy >/dev/null || die "haproxy missing: run scripts/topology/install.sh"
    if [[ -n $(haproxy_pid) ]]; then
        log "already running (pid $(haproxy_pid))"
        return 0
    fi
    render
    rm -f "$SOCK"
    # Foreground mode (-db) in its own session: the pid is haproxy's own,
    # logs go to a file, and it outlives the calling shell.
    setsid haproxy -db -f "$CFG" </dev/null >"$LOGFILE" 2>&1 &
    echo $! >"$PIDFILE"
    # Until the forked shell has exec'd haproxy, its command line is bash's.
    local i
    for i in $(seq 50); do [[ -n $(haproxy_pid) ]] && break; sleep 0.1; done
    wait_listening
    wait_writer
    log "listening on 127.0.0.1:$HAPROXY_PORT, writer $(writer)"
}

cmd_stop() {
    local pid deadline
    pid=$(haproxy_pid)
    if [[ -n $pid ]]; then
        # SIGTERM: immediate stop (SIGUSR1 would wait for every pooled
        # client connection to close, which may never happen).
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + HAPROXY_WAIT_SECS))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        log "stopped (pid $pid)"
    fi
    rm -f "$PIDFILE" "$SOCK"
}

cmd_status() {
    local pid
    pid=$(haproxy_pid)
    [[ -n $pid ]] || { echo "haproxy down"; return 1; }
    echo "haproxy pid=$pid listen=127.0.0.1:$HAPROXY_PORT writer=$(writer)"
    server_states | sed 's/^/  /'
    [[ -n $(writer) ]]
}

case ${1:-} in
    start)  cmd_start ;;
    stop)   cmd_stop ;;
    status) cmd_status ;;
    writer) writer ;;
    sessions) server_sessions ;;
    *)      sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A 3-node MariaDB Galera cluster on loopback, for tests and local trials.
#
#   galera.sh start            start every node that is not running; bootstraps
#                              a new cluster when none runs; waits until all 3
#                              are Synced in one Primary component of size 3
#   galera.sh stop             stop every node cleanly (also when some are dead)
#   galera.sh status           one line per node; exit 0 only when all 3 Synced
#   galera.sh kill NODE        kill -9 that node's mariadbd (NODE = 1, 2 or 3)
#   galera.sh restart NODE     (re)start that node, wait until it is Synced again
#   galera.sh ports            the ports, as shell assignments (eval-able)
#   galera.sh clean            stop, then delete the cluster's data
#
# Environment:
#   TOPOLOGY_DIR          default /tmp/storegate-topology; everything lives in
#                         $TOPOLOGY_DIR/galera/nodeN/{data,tmp,my.cnf,error.log,...}
#   GALERA_BASE_PORT      default 4400. Node N (1..3) uses
#                           SQL    BASE+N     (4401..4403)
#                           group  BASE+20+N  (4421..4423, gcomm replication)
#                           IST    BASE+30+N  (4431..4433)
#                           SST    BASE+40+N  (4441..4443, rsync daemon)
#                         and haproxy.sh listens on BASE+10 (4410).
#   GALERA_WAIT_SECS      default 180: bound on every wait (start, restart, stop)
#   GALERA_SYNC_WAIT      default 1: wsrep_sync_wait = causal reads, so a read
#                         on any node sees every write committed before it on
#                         any other node (needed when replicas use different
#                         nodes: Galera applies writesets on the other nodes
#                         shortly AFTER the commit returns). 0 is the usual
#                         production setting behind a single writer (HAProxy).
#   GALERA_EXTRA_PROVIDER_OPTIONS  appended to wsrep_provider_options, e.g.
#                         "evs.keepalive_period=PT0.5S;evs.suspect_timeout=PT2S;evs.inactive_timeout=PT4S"
#                         (keepalive_period must stay below suspect_timeout/3)
#                         to detect a dead node faster than the default ~5 s
#
# Every node accepts root over TCP without a password (like a default server),
# and a password-less `haproxy_check`@`127.0.0.1` (USAGE only) that haproxy's
# health check logs in as. Nothing here reads /etc/mysql: each mariadbd gets
# --defaults-file with its own my.cnf, so the system server is never touched.
set -euo pipefail

TOPOLOGY_DIR=${TOPOLOGY_DIR:-/tmp/storegate-topology}
GALERA_BASE_PORT=${GALERA_BASE_PORT:-4400}
GALERA_WAIT_SECS=${GALERA_WAIT_SECS:-180}
GALERA_SYNC_WAIT=${GALERA_SYNC_WAIT:-1}
GALERA_EXTRA_PROVIDER_OPTIONS=${GALERA_EXTRA_PROVIDER_OPTIONS:-}
readonly GALERA_DIR=$TOPOLOGY_DIR/galera
readonly NODES=(1 2 3)
readonly PROVIDER=/usr/lib/galera/libgalera_smm.so
# mariadbd runs as mysql: wsrep_sst_rsync starts an rsync daemon as the server's
# user, and an rsync daemon started as root drops file access to `nobody`.
readonly RUN_USER=mysql

log() { printf 'galera.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- ports and paths --------------------------------------------------------

sql_port()   { echo $((GALERA_BASE_PORT + $1)); }
group_port() { echo $((GALERA_BASE_PORT + 20 + $1)); }
ist_port()   { echo $((GALERA_BASE_PORT + 30 + $1)); }
sst_port()   { echo $((GALERA_BASE_PORT + 40 + $1)); }
node_dir()   { echo "$GALERA_DIR/node$1"; }
node_cnf()   { echo "$(node_dir "$1")/my.cnf"; }
node_log()   { echo "$(node_dir "$1")/error.log"; }
node_pidf()  { echo "$(node_dir "$1")/mariadbd.pid"; }
node_data()  { echo "$(node_dir "$1")/data"; }

cluster_address() {
    local n addrs=()
    for n in "${NODES[@]}"; do addrs+=("127.0.0.1:$(group_port "$n")"); done
    local IFS=,
    echo "gcomm://${addrs[*]}"
}

check_node_arg() {
    [[ ${1:-} =~ ^[123]$ ]] || die "NODE must be 1, 2 or 3 (got '${1:-}')"
}

# --- process handling -------------------------------------------------------

# The pid of node N's mariadbd, or nothing. The command line must name this
# node's my.cnf, so a stale pid file whose pid was reused is not believed.
node_pid() {
    local pidf pid i
    pidf=$(node_pidf "$1")
    [[ -e $pidf ]] || return 0
    # mariadbd truncates the file before it writes its pid: an empty file
    # may be that moment, not a stopped server.
    for i in 1 2 3 4 5 6 7 8 9 10; do
        pid=$(<"$pidf")
        [[ -n $pid ]] && break
        sleep 0.05
    done
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$(node_cnf "$1")"; then
        echo "$pid"
    fi
}
node_running() { [[ -n $(node_pid "$1") ]]; }

running_nodes() {
    local n
    for n in "${NODES[@]}"; do node_running "$n" && echo "$n"; done
    return 0
}

sql() { # sql NODE STATEMENT...  (root over TCP, tab-separated, no headers)
    local n=$1; shift
    # timeout: a node blocked mid-transfer must not stall a bounded wait.
    timeout 10 mysql --no-defaults --protocol=TCP -h127.0.0.1 -P"$(sql_port "$n")" -uroot \
        --connect-timeout=2 -N -B -e "$*"
}

# "state size status ready" of a node, e.g. "Synced 3 Primary ON"; empty when
# it does not answer. No causal wait: it must not block during a view change.
wsrep_state() {
    sql "$1" "SET STATEMENT wsrep_sync_wait=0 FOR SELECT
        MAX(IF(VARIABLE_NAME='WSREP_LOCAL_STATE_COMMENT', VARIABLE_VALUE, NULL)),
        MAX(IF(VARIABLE_NAME='WSREP_CLUSTER_SIZE', VARIABLE_VALUE, NULL)),
        MAX(IF(VARIABLE_NAME='WSREP_CLUSTER_STATUS', VARIABLE_VALUE, NULL)),
        MAX(IF(VARIABLE_NAME='WSREP_READY', VARIABLE_VALUE, NULL))
        FROM information_schema.GLOBAL_STATUS
        WHERE VARIABLE_NAME IN ('WSREP_LOCAL_STATE_COMMENT','WSREP_CLUSTER_SIZE',
                                'WSREP_CLUSTER_STATUS','WSREP_READY')" 2>/dev/null | tr '\t' ' ' || true
}

# The marker launch() writes into a node's error log before each start, so
# that log_tail can tell this start's lines from earlier ones.
readonly LAUNCH_MARKER='galera.sh: launching mariadbd'

# What a failed start said: the error lines since the last launch (a crash
# dump after them would otherwise hide the cause), then the last lines.
log_tail() {
    local f
    f=$(node_log "$1")
    log "errors in $f since the last launch:"
    awk -v m="$LAUNCH_MARKER" 'index($0, m) { n = 0; delete lines; next }
        /\[ERROR\]|WSREP.*([Ff]ail|[Ee]rror|[Aa]bort)/ { lines[n++] = $0 }
        END { for (i = (n > 25 ? n - 25 : 0); i < n; i++) print lines[i] }' "$f" 2>/dev/null \
        | cut -c1-300 >&2 || true
    log "last lines of $f:"
    tail -n 15 "$f" 2>/dev/null | cut -c1-300 >&2 || true
}

# wait_synced NODE SIZE: until the node is Synced, ready, in a Primary
# component of SIZE nodes. Fails at once if its mariadbd died.
wait_synced() {
    # One bound for a whole command: DEADLINE, set by the caller, else now+wait.
    local n=$1 size=$2 deadline=${DEADLINE:-$((SECONDS + GALERA_WAIT_SECS))} state=""
    while ((SECONDS < deadline)); do
        if ! node_running "$n"; then
            log_tail "$n"
            die "node $n exited while starting"
        fi
        state=$(wsrep_state "$n")
        [[ $state == "Synced $size Primary ON" ]] && return 0
        sleep 0.5
    done
    log_tail "$n"
    die "node $n not Synced in a cluster of $size after ${GALERA_WAIT_SECS}s (last state: '${state:-no answer}')"
}

# --- configuration ----------------------------------------------------------

write_cnf() {
    local n=$1 dir
    dir=$(node_dir "$n")
    cat >"$(node_cnf "$n")" <<EOF
# Generated by scripts/topology/galera.sh for node $n; rewritten on each start.
[mysqld]
user                    = $RUN_USER
datadir                 = $dir/data
tmpdir                  = $dir/tmp
socket                  = $dir/mariadbd.sock
pid-file                = $dir/mariadbd.pid
log-error               = $dir/error.log
port                    = $(sql_port "$n")
bind-address            = 127.0.0.1
# Grants name 127.0.0.1, and a lookup of 127.0.0.1 costs time per connection.
skip-name-resolve
character-set-server    = utf8mb4
collation-server        = utf8mb4_general_ci
max_connections         = 500

# What Galera requires: row-based replication events, InnoDB only (MyISAM is
# not replicated), interleaved auto-increment locks (no table-level AUTO-INC
# lock: writesets are applied in parallel).
binlog_format           = ROW
default_storage_engine  = InnoDB
innodb_autoinc_lock_mode = 2

# Small footprint: three servers share one test machine.
innodb_buffer_pool_size = 64M
innodb_log_file_size    = 32M
performance_schema      = OFF
# Durability comes from the other nodes holding each committed writeset, the
# usual Galera trade-off: no fsync per commit.
innodb_flush_log_at_trx_commit = 2

wsrep_on                = ON
wsrep_provider          = $PROVIDER
# The name includes the base port: two topologies on one machine never merge.
wsrep_cluster_name      = storegate-$GALERA_BASE_PORT
wsrep_cluster_address   = $(cluster_address)
wsrep_node_name         = node$n
wsrep_node_address      = 127.0.0.1:$(group_port "$n")
wsrep_node_incoming_address = 127.0.0.1:$(sql_port "$n")
wsrep_sst_method        = rsync
wsrep_sst_receive_address = 127.0.0.1:$(sst_port "$n")
wsrep_slave_threads     = 2
wsrep_sync_wait         = $GALERA_SYNC_WAIT
# All nodes share 127.0.0.1, so every listener needs its own port.
# gcache.recover: a restarted node keeps its writeset cache and can serve IST.
wsrep_provider_options  = "gmcast.listen_addr=tcp://127.0.0.1:$(group_port "$n");ist.recv_addr=127.0.0.1:$(ist_port "$n");gcache.dir=$dir/data;gcache.size=64M;gcache.recover=yes${GALERA_EXTRA_PROVIDER_OPTIONS:+;$GALERA_EXTRA_PROVIDER_OPTIONS}"
EOF
}

prepare_dirs() {
    local n=$1 dir
    dir=$(node_dir "$n")
    mkdir -p "$dir/data" "$dir/tmp"
    write_cnf "$n"
    chown -R "$RUN_USER:$RUN_USER" "$dir"
    chmod 750 "$dir/data"
    # The server runs as mysql: every parent of the node dir must let it in.
    runuser -u "$RUN_USER" -- test -w "$dir/data" \
        || die "user $RUN_USER cannot write $dir/data: pick a TOPOLOGY_DIR whose parents it can traverse (e.g. under /tmp)"
}

# A fresh datadir for the bootstrap node. Joiners need none: rsync SST copies
# the donor's datadir (users included) into an empty one.
init_datadir() {
    local n=$1
    [[ -d $(node_data "$n")/mysql ]] && return 0
    log "node $n: initialising the datadir"
    # Its own log: the bootstrap mariadbd it runs (as mysql) opens error.log.
    local ilog
    ilog=$(node_dir "$n")/install-db.log
    mariadb-install-db --defaults-file="$(node_cnf "$n")" --user="$RUN_USER" \
        --auth-root-authentication-method=normal --skip-test-db \
        --skip-name-resolve >"$ilog" 2>&1 \
        || { tail -n 30 "$ilog" >&2; die "mariadb-install-db failed for node $n"; }
}

# Users every node must have; run on the bootstrap node, replicated to all.
# mariadb-install-db's "normal" root is root@localhost without password;
# with skip-name-resolve a TCP client from 127.0.0.1 needs root@127.0.0.1.
create_users() {
    sql "$1" "
        CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
        GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
        CREATE USER IF NOT EXISTS 'haproxy_check'@'127.0.0.1' IDENTIFIED BY '';
        DROP USER IF EXISTS ''@'localhost';
        DROP USER IF EXISTS ''@'$(hostname)';
        DROP USER IF EXISTS 'root'@'$(hostname)';"
}

# --- bootstrap choice -------------------------------------------------------

grastate_field() { # grastate_field NODE FIELD
    local f
    f=$(node_data "$1")/grastate.dat
    [[ -f $f ]] || return 0
    sed -n "s/^$2:[[:space:]]*//p" "$f"
}

# "uuid:seqno" of the last transaction a crashed node committed, read from
# InnoDB by `mariadbd --wsrep-recover` (what Debian's galera_recovery does);
# empty when unknown. After a kill -9, grastate.dat says seqno -1: without the
# recovered position the node would ask for a full SST instead of an IST.
recover_position() {
    local n=$1 rlog
    rlog=$(node_dir "$n")/recover.log
    rm -f "$rlog"
    mariadbd --defaults-file="$(node_cnf "$n")" --wsrep-recover \
        --log-error="$rlog" >/dev/null 2>&1 || true
    sed -n 's/.*WSREP: Recovered position: \([0-9a-f-]*:-\{0,1\}[0-9]*\).*/\1/p' \
        "$rlog" 2>/dev/null | tail -n1
}

crashed() { # grastate.dat exists and says -1: not a clean shutdown
    [[ $(grastate_field "$1" seqno) == -1 && -d $(node_data "$1")/mysql ]]
}

# The last committed seqno of a stopped node: from grastate.dat after a clean
# shutdown, from InnoDB after a crash; -2 for a node that never joined.
recovered_seqno() {
    local n=$1 seqno pos
    seqno=$(grastate_field "$n" seqno)
    if [[ -z $seqno ]]; then echo -2; return; fi
    if crashed "$n"; then
        pos=$(recover_position "$n")
        seqno=${pos##*:}
    fi
    echo "${seqno:--1}"
}

# The node to bootstrap a new Primary component from when none runs: the one
# Galera marked safe_to_bootstrap (last to leave cleanly), else the one with
# the most recent data, else node 1 (fresh cluster).
pick_bootstrap_node() {
    local n best=1 best_seqno=-3 seqno
    for n in "${NODES[@]}"; do
        if [[ $(grastate_field "$n" safe_to_bootstrap) == 1 ]]; then echo "$n"; return; fi
    done
    for n in "${NODES[@]}"; do
        seqno=$(recovered_seqno "$n")
        if ((seqno > best_seqno)); then best=$n; best_seqno=$seqno; fi
    done
    if [[ -f $(node_data "$best")/grastate.dat ]]; then
        log "no node is safe_to_bootstrap (crash); bootstrapping node $best (seqno $best_seqno)"
        sed -i 's/^safe_to_bootstrap:.*/safe_to_bootstrap: 1/' "$(node_data "$best")/grastate.dat"
    fi
    echo "$best"
}

# --- node lifecycle ---------------------------------------------------------

# launch NODE [--wsrep-new-cluster]: mariadbd in the background, in its own
# session so that it survives the calling shell and is not hit by its signals.
launch() {
    local n=$1; shift
    prepare_dirs "$n"
    if crashed "$n"; then
        local pos
        pos=$(recover_position "$n")
        [[ -n $pos ]] && set -- "$@" --wsrep-start-position="$pos"
    fi
    log "node $n: starting on 127.0.0.1:$(sql_port "$n") $*"
    echo "$LAUNCH_MARKER $(date -u +%FT%TZ) $*" >>"$(node_log "$n")"
    setsid mariadbd --defaults-file="$(node_cnf "$n")" "$@" \
        </dev/null >>"$(node_log "$n")" 2>&1 &
    # mariadbd rewrites the same pid into this file once it is up, as mysql.
    echo $! >"$(node_pidf "$n")"
    chown "$RUN_USER:$RUN_USER" "$(node_pidf "$n")"
    # Until the forked shell has exec'd mariadbd, its command line is bash's.
    local i
    for i in $(seq 50); do node_running "$n" && return 0; sleep 0.1; done
    log_tail "$n"
    die "node $n: mariadbd did not start"
}

bootstrap() {
    local n
    n=$(pick_bootstrap_node)
    prepare_dirs "$n"
    init_datadir "$n"
    launch "$n" --wsrep-new-cluster
    wait_synced "$n" 1
    create_users "$n"
}

# stop_node NODE: SIGTERM = clean shutdown (grastate keeps the seqno); SIGKILL
# only if it does not finish within the bound.
stop_node() {
    local n=$1 pid deadline
    pid=$(node_pid "$n")
    [[ -n $pid ]] || return 0
    log "node $n: stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + GALERA_WAIT_SECS))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        log "node $n: no clean shutdown after ${GALERA_WAIT_SECS}s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    rm -f "$(node_pidf "$n")"
}

# --- commands ---------------------------------------------------------------

cmd_start() {
    command -v mariadbd >/dev/null && [[ -f $PROVIDER ]] \
        || die "mariadb-server or galera-4 missing: run scripts/topology/install.sh"
    mkdir -p "$GALERA_DIR"
    DEADLINE=$((SECONDS + GALERA_WAIT_SECS))
    local n
    if [[ -z $(running_nodes) ]]; then
        bootstrap
    fi
    # Joiners start together; Galera serialises their state transfers itself.
    for n in "${NODES[@]}"; do
        node_running "$n" && continue
        launch "$n"
    done
    for n in "${NODES[@]}"; do wait_synced "$n" 3; done
    log "cluster up: 3 nodes Synced on 127.0.0.1 ports $(sql_port 1),$(sql_port 2),$(sql_port 3)"
}

# Pids of processes left behind by a node, e.g. the rsync daemon and SST
# script of a transfer cut short: mariadbd, rsync or wsrep_sst_* processes
# whose command line names this node's directory (every one of them does).
leftover_pids() {
    local dir cmdline f pid
    dir=$(node_dir "$1")/
    for f in /proc/[0-9]*/cmdline; do
        pid=${f#/proc/}; pid=${pid%/cmdline}
        cmdline=$(tr '\0' ' ' <"$f" 2>/dev/null) || continue
        [[ $cmdline == *"$dir"* ]] || continue
        # Only server-side helpers: not, say, someone's `tail -f` of a log.
        case $cmdline in
            mariadbd*|*/mariadbd*|rsync*|*/rsync*|*wsrep_sst*) echo "$pid" ;;
        esac
    done
    return 0
}

cmd_stop() {
    local n pids
    # Node 1 last: after a clean stop it is the one marked safe_to_bootstrap.
    for n in 3 2 1; do stop_node "$n"; done
    for n in "${NODES[@]}"; do
        pids=$(leftover_pids "$n" | grep -vx "$$" || true)
        if [[ -n $pids ]]; then
            log "node $n: killing leftover processes $(echo $pids)"
            kill -KILL $pids 2>/dev/null || true
        fi
    done
    log "all nodes stopped"
}

cmd_status() {
    local n pid state healthy=0
    for n in "${NODES[@]}"; do
        pid=$(node_pid "$n")
        if [[ -z $pid ]]; then
            printf 'node%s port=%s down\n' "$n" "$(sql_port "$n")"
            healthy=1; continue
        fi
        state=$(wsrep_state "$n")
        printf 'node%s port=%s pid=%s state=%s\n' "$n" "$(sql_port "$n")" "$pid" \
            "$(echo "${state:-not answering}" | awk 'NF==4 {printf "%s size=%s %s ready=%s", $1,$2,$3,$4; next} {print}')"
        [[ $state == "Synced 3 Primary ON" ]] || healthy=1
    done
    return "$healthy"
}

cmd_kill() {
    check_node_arg "${1:-}"
    local pid
    pid=$(node_pid "$1")
    [[ -n $pid ]] || die "node $1 is not running"
    log "node $1: kill -9 $pid"
    kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

cmd_restart() {
    check_node_arg "${1:-}"
    local n=$1 size
    stop_node "$n"
    DEADLINE=$((SECONDS + GALERA_WAIT_SECS))
    # Nobody to join: bootstrap (this node or the one with the newest data).
    [[ -n $(running_nodes) ]] || bootstrap
    node_running "$n" || launch "$n"
    # The cluster it joins: every node that runs now, itself included.
    size=$(running_nodes | wc -l)
    # A node that dies while joining (its log says why, above) is started
    # once more, as systemd's Restart=on-abort would; one that is still
    # running at the deadline is not.
    if ! (wait_synced "$n" "$size"); then
        node_running "$n" && die "node $n did not join in time"
        log "node $n: exited while joining; starting it once more"
        launch "$n"
        wait_synced "$n" "$size"
    fi
}

cmd_ports() {
    local n
    for n in "${NODES[@]}"; do
        echo "GALERA_NODE${n}_PORT=$(sql_port "$n")"
        echo "GALERA_NODE${n}_GROUP_PORT=$(group_port "$n")"
        echo "GALERA_NODE${n}_IST_PORT=$(ist_port "$n")"
        echo "GALERA_NODE${n}_SST_PORT=$(sst_port "$n")"
    done
    echo "HAPROXY_PORT=${HAPROXY_PORT:-$((GALERA_BASE_PORT + 10))}"
}

cmd_clean() {
    cmd_stop
    rm -rf "$GALERA_DIR"
    log "removed $GALERA_DIR"
}

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

main() {
    case ${1:-} in
        start|stop|kill|restart|clean)
            [[ $(id -u) -eq 0 ]] || die "run as root (the nodes run as user $RUN_USER)" ;;
    esac
    case ${1:-} in
        start)   cmd_start ;;
        stop)    cmd_stop ;;
        status)  cmd_status ;;
        kill)    cmd_kill "${2:-}" ;;
        restart) cmd_restart "${2:-}" ;;
        ports)   cmd_ports ;;
        clean)   cmd_clean ;;
        *)       usage ;;
    esac
}

main "$@"

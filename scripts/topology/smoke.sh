#!/usr/bin/env bash
# End-to-end check of the topology scripts, from nothing back to nothing:
# install, a 3-node Galera cluster, writes across nodes, kill -9 and rejoin,
# HAProxy single-writer failover and failback, the nginx gateway's config and
# its own answers (no storegate replicas are started here). Ends with
# "N passed, N failed"; exit 1 if any check failed. About 1-2 minutes.
#
# It uses its own directory and ports so that a topology already running with
# the defaults is left alone:
#   TOPOLOGY_DIR      [/tmp/storegate-topology-smoke] (deleted at the end)
#   GALERA_BASE_PORT  [4500]: nodes 4501-4503, HAProxy 4510
#   GATEWAY_GRPC_PORT [5580], GATEWAY_WEB_PORT [5581]
#   SKIP_INSTALL=1    do not run install.sh
set -euo pipefail

export TOPOLOGY_DIR=${TOPOLOGY_DIR:-/tmp/storegate-topology-smoke}
export GALERA_BASE_PORT=${GALERA_BASE_PORT:-4500}
export GATEWAY_GRPC_PORT=${GATEWAY_GRPC_PORT:-5580}
export GATEWAY_WEB_PORT=${GATEWAY_WEB_PORT:-5581}
# Replicas nobody listens on: the gateway must answer UNAVAILABLE itself.
export AUTH_REPLICAS="127.0.0.1:$((GATEWAY_GRPC_PORT + 11)) 127.0.0.1:$((GATEWAY_GRPC_PORT + 12))"
export PRODUCT_REPLICAS="127.0.0.1:$((GATEWAY_GRPC_PORT + 21)) 127.0.0.1:$((GATEWAY_GRPC_PORT + 22))"
readonly HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HAPROXY_PORT=$((GALERA_BASE_PORT + 10))
PASSED=0
FAILED=0

say() { printf 'smoke: %s\n' "$*"; }
pass() { PASSED=$((PASSED + 1)); say "ok   $*"; }
fail() { FAILED=$((FAILED + 1)); say "FAIL $*"; }
check() { # check DESCRIPTION COMMAND...
    local what=$1; shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }

q() { # q PORT SQL: one value
    timeout 20 mysql --no-defaults --protocol=TCP -h127.0.0.1 -P"$1" -uroot -N -B -e "$2"
}
node_port() { echo $((GALERA_BASE_PORT + $1)); }

synced_3() {
    [[ $(q "$(node_port "$1")" "SHOW STATUS WHERE Variable_name IN ('wsrep_cluster_size','wsrep_local_state_comment')" \
        | sort | awk '{printf "%s ", $2}') == "3 Synced " ]]
}

# Until COMMAND succeeds or SECS pass.
eventually() { # eventually SECS COMMAND...
    local deadline=$((SECONDS + $1)); shift
    until "$@" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.3
    done
}

writer_is() { [[ $("$HERE/haproxy.sh" writer) == "$1" ]]; }
write_via_haproxy() {
    q "$HAPROXY_PORT" "INSERT INTO smoke.t (node) VALUES (@@wsrep_node_name)" >/dev/null
}

ours_running() { # any process whose command line names TOPOLOGY_DIR
    local f
    for f in /proc/[0-9]*/cmdline; do
        [[ $f == "/proc/$$/cmdline" ]] && continue
        tr '\0' ' ' <"$f" 2>/dev/null | grep -qF -- "$TOPOLOGY_DIR/" && return 0
    done
    return 1
}

nothing_running() { ! ours_running; }

read_on_3() {
    [[ $(q "$(node_port 3)" "SET SESSION wsrep_sync_wait=1; SELECT node FROM smoke.t") == written-on-1 ]]
}

teardown() {
    "$HERE/nginx.sh" stop || true
    "$HERE/haproxy.sh" stop || true
    "$HERE/galera.sh" clean || true
}
trap teardown EXIT

main() {
    local t0
    if [[ ${SKIP_INSTALL:-} != 1 ]]; then
        check "install.sh" "$HERE/install.sh"
    fi
    "$HERE/galera.sh" clean >/dev/null 2>&1 || true

    # Galera
    t0=$(now)
    check "galera.sh start (fresh)" "$HERE/galera.sh" start
    say "     start from nothing took $(since "$t0")s"
    local n
    for n in 1 2 3; do check "node $n: Synced, cluster size 3" synced_3 "$n"; done
    check "galera.sh status exit 0" "$HERE/galera.sh" status
    ps -o rss=,args= -C mariadbd | grep -F "$TOPOLOGY_DIR/" \
        | awk '{s += $1} END {printf "smoke:      RSS of the 3 nodes: %.0f MiB\n", s / 1024}'

    q "$(node_port 1)" "CREATE DATABASE smoke; CREATE TABLE smoke.t (id INT AUTO_INCREMENT PRIMARY KEY, node VARCHAR(16))
                        ; INSERT INTO smoke.t (node) VALUES ('written-on-1')"
    check "write on node 1, read on node 3" eventually 10 read_on_3

    # HAProxy
    check "haproxy.sh start" "$HERE/haproxy.sh" start
    check "haproxy: node1 is the writer" writer_is node1
    check "haproxy: connection lands on node1" \
        test "$(q "$HAPROXY_PORT" "SELECT @@wsrep_node_name")" = node1

    # Kill the writer.
    "$HERE/galera.sh" kill 1
    t0=$(now)
    check "after kill -9 of node1: writer moves to node2" eventually 15 writer_is node2
    check "after kill -9 of node1: writes through haproxy" eventually 30 write_via_haproxy
    say "     writes through haproxy resumed $(since "$t0")s after the kill"
    check "after kill -9 of node1: node2 keeps quorum (Primary)" \
        test "$(q "$(node_port 2)" "SHOW STATUS LIKE 'wsrep_cluster_status'" | cut -f2)" = Primary

    t0=$(now)
    check "galera.sh restart 1 (rejoin)" "$HERE/galera.sh" restart 1
    say "     node1 rejoined (Synced) in $(since "$t0")s"
    check "node 1 Synced again, size 3" synced_3 1
    check "haproxy: node1 is the writer again" eventually 15 writer_is node1
    check "node1 received the writes made while it was dead" \
        test "$(q "$(node_port 1)" "SELECT COUNT(*) FROM smoke.t WHERE node <> 'written-on-1'")" -ge 1

    # nginx (no replica up: the gateway's own answers)
    check "nginx.sh test" "$HERE/nginx.sh" test
    check "nginx.sh start" "$HERE/nginx.sh" start
    check "nginx: GET /nginx-health" \
        test "$(curl -sS "http://127.0.0.1:$GATEWAY_WEB_PORT/nginx-health")" = ok
    check "nginx gRPC-Web: no replica -> grpc-status 14" bash -c \
        "printf '\0\0\0\0\0' | curl -sS -D - -o /dev/null -X POST -H 'content-type: application/grpc-web+proto' \
            --data-binary @- http://127.0.0.1:$GATEWAY_WEB_PORT/storegate.auth.v1.AuthService/GetJwks \
            | grep -qi '^grpc-status: 14'"
    check "nginx gRPC (h2c) port speaks HTTP/2" bash -c \
        "curl -sS -o /dev/null -w '%{http_version}' --http2-prior-knowledge \
            http://127.0.0.1:$GATEWAY_GRPC_PORT/ | grep -qx 2"

    # Back to nothing.
    check "nginx.sh stop" "$HERE/nginx.sh" stop
    check "haproxy.sh stop" "$HERE/haproxy.sh" stop
    check "galera.sh stop" "$HERE/galera.sh" stop
    check "nothing of ours left running" eventually 5 nothing_running
}

main "$@"
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))

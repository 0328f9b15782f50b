#!/usr/bin/env bash
# A throwaway MariaDB server on a loopback port, with or without TLS, for
# the tests of MySQL over TLS (ssl-mode / ssl-ca in DATABASE_URL).
#
#   mariadb-tls.sh start DIR PORT [CA CERT KEY]   init DIR (once), start, wait
#   mariadb-tls.sh stop DIR                       stop the server of DIR
#
# With CA, CERT and KEY (PEM files) the server has TLS on (ssl_ca, ssl_cert,
# ssl_key); without them it has none. root@127.0.0.1 has no password. Like
# galera.sh it reads no /etc/mysql, runs mariadbd as mysql, and keeps
# everything in DIR (use one under /tmp: mysql must traverse its parents).
set -euo pipefail

RUN_USER=${RUN_USER:-mysql}
die() { echo "mariadb-tls.sh: $*" >&2; exit 1; }

start() {
    local dir=$1 port=$2 ca=${3:-} cert=${4:-} key=${5:-}
    command -v mariadbd >/dev/null || die "mariadbd is not installed (apt-get install mariadb-server)"
    mkdir -p "$dir/data" "$dir/tmp"
    local tls=""
    if [[ -n $ca ]]; then
        # Copies the server (as mysql) can read, whoever owns the originals.
        cp "$ca" "$dir/ca.pem"; cp "$cert" "$dir/server.crt"; cp "$key" "$dir/server.key"
        tls="ssl_ca = $dir/ca.pem
ssl_cert = $dir/server.crt
ssl_key = $dir/server.key"
    fi
    cat >"$dir/my.cnf" <<CNF
[mysqld]
user                    = $RUN_USER
datadir                 = $dir/data
tmpdir                  = $dir/tmp
socket                  = $dir/mariadbd.sock
pid-file                = $dir/mariadbd.pid
log-error               = $dir/error.log
port                    = $port
bind-address            = 127.0.0.1
skip-name-resolve
innodb_buffer_pool_size = 32M
performance_schema      = OFF
$tls
CNF
    chown -R "$RUN_USER:$RUN_USER" "$dir"
    chmod 750 "$dir/data"
    runuser -u "$RUN_USER" -- test -w "$dir/data" \
        || die "user $RUN_USER cannot write $dir/data: use a folder under /tmp"
    if [[ ! -d $dir/data/mysql ]]; then
        mariadb-install-db --defaults-file="$dir/my.cnf" --user="$RUN_USER" \
            --auth-root-authentication-method=normal --skip-test-db >"$dir/install-db.log" 2>&1 \
            || { tail -n 30 "$dir/install-db.log" >&2; die "mariadb-install-db failed"; }
    fi
    setsid mariadbd --defaults-file="$dir/my.cnf" </dev/null >/dev/null 2>&1 &
    for _ in $(seq 1 150); do
        if mariadb --no-defaults --socket="$dir/mariadbd.sock" -uroot -e "
            CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
            GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;" 2>/dev/null; then
            echo "mariadbd up on 127.0.0.1:$port (tls: ${ca:+on}${ca:-off})"
            return 0
        fi
        sleep 0.2
    done
    tail -n 30 "$dir/error.log" >&2 || true
    die "mariadbd on port $port did not start"
}

stop() {
    local dir=$1 pid
    [[ -f $dir/mariadbd.pid ]] || return 0
    pid=$(cat "$dir/mariadbd.pid")
    # Only the mariadbd of this folder: its command line names our my.cnf.
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--defaults-file=$dir/my.cnf"; then
        kill "$pid"
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
}

case ${1:-} in
    start) shift; [[ $# -eq 2 || $# -eq 5 ]] || die "usage: start DIR PORT [CA CERT KEY]"; start "$@" ;;
    stop) shift; [[ $# -eq 1 ]] || die "usage: stop DIR"; stop "$1" ;;
    *) die "usage: mariadb-tls.sh start DIR PORT [CA CERT KEY] | stop DIR" ;;
esac

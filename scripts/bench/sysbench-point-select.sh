#!/usr/bin/env bash
# The database's own ceiling for point reads, beside storegate-catalogue's
# `get`: sysbench's oltp_point_select (Debian package sysbench) against the
# same MariaDB/MySQL, on a table of as many rows as the catalogue, with as
# many threads as the benchmark has calls in flight. Creates the database
# sysbench_storegate, and drops it afterwards.
#
#   scripts/bench/sysbench-point-select.sh [ROWS] [THREADS] [SECONDS]
#
# Environment: MYSQL_HOST (127.0.0.1), MYSQL_PORT (3306), MYSQL_USER (root),
# MYSQL_PASSWORD (empty).
set -euo pipefail

ROWS=${1:-1000000}
THREADS=${2:-64}
SECONDS_RUN=${3:-10}
HOST=${MYSQL_HOST:-127.0.0.1}
PORT=${MYSQL_PORT:-3306}
USER_NAME=${MYSQL_USER:-root}
PASSWORD=${MYSQL_PASSWORD:-}
readonly DB=sysbench_storegate

command -v sysbench >/dev/null || { echo "sysbench missing: apt-get install sysbench" >&2; exit 1; }
mysql_cmd() { mysql --protocol=TCP -h"$HOST" -P"$PORT" -u"$USER_NAME" ${PASSWORD:+-p"$PASSWORD"} "$@"; }
common=(--db-driver=mysql --mysql-host="$HOST" --mysql-port="$PORT" --mysql-user="$USER_NAME"
        --mysql-password="$PASSWORD" --mysql-db="$DB" --tables=1 --table-size="$ROWS")

mysql_cmd -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
trap 'mysql_cmd -e "DROP DATABASE IF EXISTS $DB"' EXIT
sysbench oltp_point_select "${common[@]}" prepare >/dev/null
# A first pass warms the buffer pool, as the catalogue's is warm when measured.
sysbench oltp_point_select "${common[@]}" --threads="$THREADS" --time=3 run >/dev/null
sysbench oltp_point_select "${common[@]}" --threads="$THREADS" --time="$SECONDS_RUN" --percentile=99 run \
    | sed -n '/queries:/p;/transactions:/p;/min:/,/99th percentile:/p'

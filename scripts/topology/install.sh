#!/usr/bin/env bash
# Installs what the loopback topology scripts (galera.sh, haproxy.sh, nginx.sh)
# need, from Debian's own repositories. Idempotent: installs only what is
# missing, and a second run does nothing but check.
#
# No Debian service may be left running: nginx and haproxy start a service on
# port 80 / their default config from their maintainer scripts, and
# mariadb-server would start the system database. While installing, a
# policy-rc.d that exits 101 forbids every invoke-rc.d start; afterwards the
# freshly installed nginx/haproxy units are disabled so a reboot does not start
# them either. Packages that were already installed are not touched.
set -euo pipefail

# Packages and why:
#   galera-4        the wsrep provider (/usr/lib/galera/libgalera_smm.so)
#   mariadb-server  mariadbd, mariadb-install-db, wsrep_sst_* scripts
#   mariadb-client  the mysql client used to wait for/inspect the nodes
#   rsync           the SST method (wsrep_sst_rsync) used by a joining node
#   iproute2 lsof   wsrep_sst_rsync looks up its rsync daemon's port with ss/lsof
#   haproxy         the single-writer TCP balancer in front of the cluster
#   nginx           the gRPC / gRPC-Web gateway (bookworm: 1.22 with http_v2, grpc)
#   socat           talks to haproxy's admin socket (haproxy.sh status)
#   curl procps     health probes and process checks in the scripts
readonly PACKAGES=(galera-4 mariadb-server mariadb-client rsync iproute2 lsof
                   haproxy nginx socat curl procps)
# Services whose Debian unit must not run: we start our own instances.
readonly SERVICES=(nginx haproxy)

log() { printf 'install.sh: %s\n' "$*" >&2; }

missing_packages() {
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            printf '%s\n' "$pkg"
        fi
    done
}

# policy-rc.d: 101 = "action forbidden"; invoke-rc.d then starts nothing.
# An existing policy-rc.d (containers often have one) is kept and restored.
POLICY=/usr/sbin/policy-rc.d
POLICY_BACKUP=""
block_service_starts() {
    if [[ -e $POLICY ]]; then
        POLICY_BACKUP=$(mktemp)
        cp -p "$POLICY" "$POLICY_BACKUP"
    fi
    printf '#!/bin/sh\n# storegate install.sh: no service starts during install\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
}
restore_policy() {
    if [[ -n $POLICY_BACKUP ]]; then
        cp -p "$POLICY_BACKUP" "$POLICY"
        rm -f "$POLICY_BACKUP"
    else
        rm -f "$POLICY"
    fi
}

# Belt and braces for machines where something started anyway (systemd may
# start units through paths policy-rc.d does not cover): stop and disable only
# the services of packages this run installed.
disable_services() {
    local svc newly=("$@")
    for svc in "${SERVICES[@]}"; do
        [[ " ${newly[*]} " == *" $svc "* ]] || continue
        if [[ -d /run/systemd/system ]]; then
            systemctl disable --now "$svc" >/dev/null 2>&1 || true
        else
            # No systemd (container): sysv links only.
            update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
        # Kill a Debian-started instance, identified by its Debian pid file only.
        local pidfile=/run/$svc.pid
        if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            log "stopping the $svc that Debian started (pid $(cat "$pidfile"))"
            kill "$(cat "$pidfile")" 2>/dev/null || true
        fi
    done
}

main() {
    if [[ $(id -u) -ne 0 ]]; then
        log "must run as root (apt-get)"; exit 1
    fi
    local missing
    mapfile -t missing < <(missing_packages)
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "all packages present: ${PACKAGES[*]}"
        return 0
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    block_service_starts
    trap restore_policy EXIT
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >/dev/null
    disable_services "${missing[@]}"
    log "done"
}

main "$@"

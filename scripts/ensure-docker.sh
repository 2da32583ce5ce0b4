#!/usr/bin/env bash
# Make sure a Docker engine is usable (and that debootstrap, needed by
# scripts/build-image.sh, is installed). Idempotent; silent when all is fine.
#
#   - `docker info` works            -> nothing to do
#   - dockerd missing, we are root    -> apt-get install docker.io
#   - dockerd not running             -> start it detached (setsid), wait for it
#
# Environment:
#   AIRLOCK_DOCKERD_LOG   dockerd log file (default /var/log/airlock-dockerd.log)
#   AIRLOCK_DOCKER_WAIT   seconds to wait for the engine (default 60)
set -euo pipefail

LOG="${AIRLOCK_DOCKERD_LOG:-/var/log/airlock-dockerd.log}"
WAIT="${AIRLOCK_DOCKER_WAIT:-60}"
export DEBIAN_FRONTEND=noninteractive

say() { echo "ensure-docker: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

apt_updated=0
apt_install() {
    # apt_install <package>...   (root only)
    if [ "$apt_updated" -eq 0 ]; then
        say "apt-get update"
        apt-get update -q >/dev/null
        apt_updated=1
    fi
    say "apt-get install $*"
    apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

docker_ok() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

ensure_debootstrap() {
    if command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ]; then
        return 0
    fi
    if is_root; then
        apt_install debootstrap
    else
        die "debootstrap is not installed (needed to build the sandbox base image).
  Install it as root: apt-get install debootstrap"
    fi
}

# dockerd may live in /usr/sbin, which is not on a non-root PATH.
find_dockerd() {
    command -v dockerd 2>/dev/null && return 0
    [ -x /usr/sbin/dockerd ] && { echo /usr/sbin/dockerd; return 0; }
    [ -x /usr/bin/dockerd ] && { echo /usr/bin/dockerd; return 0; }
    return 1
}

dockerd_running() {
    local pid
    if [ -s /var/run/docker.pid ]; then
        pid="$(cat /var/run/docker.pid 2>/dev/null || true)"
        [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && return 0
    fi
    # No (valid) pid file: look for a dockerd process by exact name.
    pgrep -x dockerd >/dev/null 2>&1
}

main() {
    ensure_debootstrap

    if docker_ok; then
        exit 0
    fi

    local dockerd
    if ! dockerd="$(find_dockerd)"; then
        if is_root; then
            # docker.io brings dockerd, containerd, runc and a docker CLI.
            apt_install docker.io
            dockerd="$(find_dockerd)" || die "docker.io installed but dockerd not found"
        else
            die "no Docker engine: dockerd is not installed and we are not root.
  Install it as root: apt-get install docker.io   (then run this script again as root)"
        fi
    fi

    command -v docker >/dev/null 2>&1 \
        || die "dockerd is installed but the docker CLI is not on PATH (apt-get install docker.io)"

    if ! dockerd_running; then
        is_root || die "dockerd is not running and we are not root: start it as root
  (e.g. sudo $0), or ask an operator to start the Docker engine"
        rm -f /var/run/docker.pid
        say "starting dockerd (log: $LOG)"
        # setsid + redirected stdio: the daemon outlives this shell and its session.
        setsid "$dockerd" >"$LOG" 2>&1 </dev/null &
        disown || true
    fi

    # A running engine whose socket we may not use will not fix itself: fail fast.
    if ! is_root && [ -S /var/run/docker.sock ] && [ ! -w /var/run/docker.sock ]; then
        die "the Docker socket /var/run/docker.sock is not writable by $(id -un).
  Add the user to the 'docker' group (usermod -aG docker $(id -un)) or run as root."
    fi

    local i
    for ((i = 0; i < WAIT; i++)); do
        if docker_ok; then
            say "Docker engine is up ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
            exit 0
        fi
        sleep 1
    done

    say "Docker engine did not become reachable within ${WAIT}s."
    if [ -r "$LOG" ]; then
        say "last 20 lines of $LOG:"
        tail -n 20 "$LOG" >&2 || true
    fi
    die "Docker engine not usable. Check $LOG, then run scripts/ensure-docker.sh again."
}

main "$@"

#!/usr/bin/env bash
# Make sure a Docker engine is usable (and that debootstrap and the Debian
# archive keyring it checks the archive against, needed by scripts/build-image.sh,
# are installed). Idempotent; silent when all is fine.
#
#   - `docker info` works            -> nothing to do
#   - dockerd missing, we are root    -> apt-get install docker.io
#   - dockerd not running             -> start it detached (setsid), wait for it
#   - runsc (gVisor) missing, root    -> apt-get install runsc, register it in
#                                        /etc/docker/daemon.json with --network=none
#                                        --oci-seccomp (a running engine reloads it on
#                                        SIGHUP); an older registration (without
#                                        --oci-seccomp) is updated the same way
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

# The keys sandbox/image/base-rootfs.sh makes debootstrap check the archive against.
DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

ensure_debootstrap() {
    local missing=()
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] \
        || missing+=(debootstrap)
    [ -s "$DEBIAN_KEYRING" ] || missing+=(debian-archive-keyring)
    [ ${#missing[@]} -gt 0 ] || return 0
    if is_root; then
        apt_install "${missing[@]}"
        [ -s "$DEBIAN_KEYRING" ] \
            || die "debian-archive-keyring is installed but $DEBIAN_KEYRING is missing"
    else
        die "${missing[*]} not installed (needed to build the sandbox base image: debootstrap
  checks the Debian archive's signature against $DEBIAN_KEYRING).
  Install as root: apt-get install ${missing[*]}"
    fi
}

DAEMON_JSON="${AIRLOCK_DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}"  # override: tests
runsc_changed=0

# Register gVisor's runsc with the engine (`airlock-broker serve --runtime runsc`). Merges into an
# existing daemon.json; sets runsc_changed=1 when the file changed.
# --oci-seccomp: without it runsc ignores the container's seccomp profile (the sandbox would
# run with no filter at all inside gVisor). Note: gVisor 20221219 ignores a rule's errnoRet,
# which breaks thread creation under Docker's *default* profile (clone3 -> EPERM); Airlock's
# profile has a gVisor variant for that reason (scripts/gen-seccomp-profile.py).
ensure_runsc() {
    is_root || return 0
    if ! command -v runsc >/dev/null 2>&1; then
        apt_install runsc || { say "warning: could not install runsc; only runc will work"; return 0; }
    fi
    mkdir -p /etc/docker
    local out
    # -I: nothing from the current directory (sys.path[0] for a script on stdin) nor PYTHON*
    # variables: run from a directory another user can write, their json.py ran as root.
    out="$(python3 -I - "$DAEMON_JSON" "$(command -v runsc)" <<'PY'
import json, os, sys
path, runsc = sys.argv[1], sys.argv[2]
doc = {}
if os.path.exists(path):
    with open(path) as fh:
        text = fh.read().strip()
    doc = json.loads(text) if text else {}
want = {"path": runsc, "runtimeArgs": ["--network=none", "--oci-seccomp"]}
if doc.get("runtimes", {}).get("runsc") == want:
    print("unchanged")
else:
    doc.setdefault("runtimes", {})["runsc"] = want
    tmp = path + ".airlock-tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    print("changed")
PY
)" || die "could not update $DAEMON_JSON (is it valid JSON?)"
    [ "$out" = changed ] && { runsc_changed=1; say "registered runsc in $DAEMON_JSON"; }
    return 0
}

reload_dockerd() {
    local pid
    pid="$(engine_pid "$(find_dockerd || echo dockerd)" || true)"
    [ -n "$pid" ] && kill -HUP "$pid" 2>/dev/null && sleep 1 && say "dockerd reloaded its runtimes"
    return 0
}

# dockerd may live in /usr/sbin, which is not on a non-root PATH.
find_dockerd() {
    command -v dockerd 2>/dev/null && return 0
    [ -x /usr/sbin/dockerd ] && { echo /usr/sbin/dockerd; return 0; }
    [ -x /usr/bin/dockerd ] && { echo /usr/bin/dockerd; return 0; }
    return 1
}

# A dockerd that has exited but not yet been reaped (a zombie: PID 1 here reaps lazily) holds
# nothing and will never answer: it does not count as running.
live_pid() {
    local state
    state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# Whether PID is a Docker engine: alive, root's, and (where we may look) running DOCKERD.
# Any user can name a process "dockerd", or wait for a stale pid file's number to come round:
# taken for the engine, it kept root from ever starting the real one (found by review).
is_engine() {
    local pid="$1" dockerd="$2" exe
    live_pid "$pid" || return 1
    [ "$(stat -c %u "/proc/$pid" 2>/dev/null)" = 0 ] || return 1
    is_root || return 0  # root's process: /proc/PID/exe is root's to read
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
    [ "${exe% (deleted)}" = "$(readlink -f "$dockerd")" ]
}

# The running engine's PID (the pid file's, else a root dockerd's), or nothing and 1.
engine_pid() {
    local dockerd="$1" pid
    if [ -s /var/run/docker.pid ]; then
        pid="$(cat /var/run/docker.pid 2>/dev/null || true)"
        [ -n "$pid" ] && is_engine "$pid" "$dockerd" && { echo "$pid"; return 0; }
    fi
    for pid in $(pgrep -x -u root dockerd 2>/dev/null); do
        is_engine "$pid" "$dockerd" && { echo "$pid"; return 0; }
    done
    return 1
}

dockerd_running() { engine_pid "$1" >/dev/null; }

main() {
    ensure_debootstrap
    ensure_runsc

    if docker_ok; then
        [ "$runsc_changed" -eq 1 ] && reload_dockerd
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

    if ! dockerd_running "$dockerd"; then
        is_root || die "dockerd is not running and we are not root: start it as root
  (e.g. sudo $0), or ask an operator to start the Docker engine"
        rm -f /var/run/docker.pid
        say "starting dockerd (log: $LOG)"
        # setsid + redirected stdio: the daemon outlives this shell and its session.
        # A new log, root's and its group's only: it names every container and when it ran.
        install -m 0640 /dev/null "$LOG"
        setsid "$dockerd" >>"$LOG" 2>&1 </dev/null &
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

# Sourced (tests/unit/test_ensure_docker.py), it only defines the functions.
[ "${BASH_SOURCE[0]}" != "$0" ] || main "$@"

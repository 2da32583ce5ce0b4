live_pid() {
    local state
    state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
dockerd_running() {
    local pid
    if [ -s /tmp/rv/stale.pid ]; then
        pid="$(cat /tmp/rv/stale.pid 2>/dev/null || true)"
        [ -n "$pid" ] && live_pid "$pid" && return 0
    fi
    # No (valid) pid file: look for a dockerd process by exact name.
    for pid in $(pgrep -x no-such-name-x 2>/dev/null); do
        live_pid "$pid" && return 0
    done
    return 1
}

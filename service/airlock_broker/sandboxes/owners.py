"""Who owns a sandbox: the labels every Airlock container carries and the broker identity in
them, so that a broker tells its own containers, a living broker's and a dead one's apart."""

from __future__ import annotations

import os
import socket

LABEL_MANAGED = "airlock.managed"
LABEL_BROKER = "airlock.broker"
LABEL_SLOT = "airlock.slot"
LABEL_PROFILE = "airlock.profile"
#: The profile label of a probe container (the image's versions, read in a confined throwaway
#: container): it runs no worker, but is reaped like any sandbox if its broker dies.
PROBE_PROFILE = "probe"


def sandbox_labels(identity: str, slot_id: str, profile: str) -> dict[str, str]:
    """The labels of every container a broker makes, jobs' and probes' alike: ``reap_orphans``
    lists ``LABEL_MANAGED`` and judges ``LABEL_BROKER`` and ``LABEL_SLOT``, so a container
    without all three would outlive a broker that died while it ran."""
    return {LABEL_MANAGED: "true", LABEL_BROKER: identity, LABEL_SLOT: slot_id,
            LABEL_PROFILE: profile}


def broker_identity(pid: int | None = None) -> str:
    """``host:pid:starttime`` of this process (or of the broker ``pid``): the label value that
    survives PID reuse, so orphans are told apart from the living."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks, or "0" if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return "0"
    if len(fields) < 20 or fields[0] in {b"Z", b"X"}:  # dead, not yet reaped by its parent
        return "0"
    return fields[19].decode()


def is_alive(identity: str) -> bool:
    """Whether the broker named by ``identity`` still runs (another host's: assumed so)."""
    host, _, rest = identity.partition(":")
    pid_s, _, start = rest.partition(":")
    if host != socket.gethostname():
        return True  # not ours to judge
    try:
        pid = int(pid_s)
    except ValueError:
        return False
    return _start_time(pid) == start and start != "0"

"""The broker process's own limits, set once when it starts.

Descriptors: every connection, spool file, Docker API socket and validator pipe takes one, and
the soft ``RLIMIT_NOFILE`` a service inherits is often 1024 (systemd's default), which a few
hundred idle connections or a burst of hand-overs reach while the hard limit is far above it.
The broker raises its soft limit to the hard one (at most ``MAX_OPEN_FILES``): every socket
the broker waits on is polled with epoll, never ``select``, so no descriptor number is too
high for it. What the broker holds per connection is bounded by ``[rpc]`` (idle and handshake
times, connections per listener) and per user by its other limits; this only keeps the default
from being the bound. Connections are held to what the limit holds (``connections_per_listener``).
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

#: The most the broker raises its soft descriptor limit to.
MAX_OPEN_FILES = 65536


def raise_open_files_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (at most ``MAX_OPEN_FILES``), never
    lower it; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, want, exc)
    return soft


#: Descriptors kept for the broker's own files beside its clients' connections: jobs' spool
#: files and Docker API connections (4 per job place, plus 8), the fast path's 16 and the
#: metrics port's 8 connections, the validators' pipes, gRPC's own (an idle broker holds
#: about 30). At most half the limit, so that a low limit still leaves room for connections.
RESERVED_FILES = 1024


def open_files_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` now (``RLIM_INFINITY`` counts as ``MAX_OPEN_FILES``)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_OPEN_FILES if soft == resource.RLIM_INFINITY else soft


def connections_per_listener(max_connections: int, listeners: int, open_files: int) -> int:
    """How many connections each of ``listeners`` gRPC listeners may hold: ``max_connections``
    (``[rpc]``), or fewer when the descriptor limit cannot hold that many on every listener
    beside the broker's own files (logged, with the numbers).

    gRPC counts ``grpc.max_allowed_incoming_connections`` per listener (each loopback family,
    the Unix socket), so a flood of one listener's connections is refused at its cap, and the
    others keep their own. That holds only while the connections fit in the descriptor limit:
    beyond it every ``accept`` fails (EMFILE) and gRPC retries, so a flood of TCP connections
    left local callers on the Unix socket unanswered, and the jobs in flight without files."""
    reserve = min(RESERVED_FILES, open_files // 2)
    fits = max(1, (open_files - reserve) // listeners)
    if fits >= max_connections:
        return max_connections
    log.warning("the open-files limit (%d) cannot hold [rpc] max_connections (%d) on each of "
                "%d listeners beside %d for the broker's own files: each listener takes at "
                "most %d connections; %s", open_files, max_connections, listeners, reserve,
                fits, _advice(max_connections, listeners, open_files))
    return fits


def _advice(max_connections: int, listeners: int, open_files: int) -> str:
    """What lets every listener take ``max_connections``: a higher hard limit, unless more
    than ``MAX_OPEN_FILES`` (the most the broker raises its soft limit to) would be needed."""
    needed = max_connections * listeners + RESERVED_FILES
    if needed <= MAX_OPEN_FILES:
        return (f"raise the hard open-files limit (LimitNOFILE) to {needed}, or lower "
                "max_connections")
    most = (MAX_OPEN_FILES - RESERVED_FILES) // listeners
    raise_too = (f" and raise the hard open-files limit (LimitNOFILE) to {MAX_OPEN_FILES}"
                 if open_files < MAX_OPEN_FILES else "")
    return (f"lower [rpc] max_connections to {most}{raise_too} (the broker raises its "
            f"open-files limit to {MAX_OPEN_FILES} at most: {needed} is out of reach)")

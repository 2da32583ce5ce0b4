"""The broker process's own limits, set once when it starts.

Descriptors: every connection, spool file, Docker API socket and validator pipe takes one, and
the soft ``RLIMIT_NOFILE`` a service inherits is often 1024 (systemd's default), which a few
hundred idle connections or a burst of hand-overs reach while the hard limit is far above it.
The broker raises its soft limit to the hard one (at most ``MAX_OPEN_FILES``): every socket
the broker waits on is polled with epoll, never ``select``, so no descriptor number is too
high for it. What the broker holds per connection is bounded by ``[rpc]`` (idle and handshake
times) and per user by its other limits; this only keeps the default from being the bound.
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

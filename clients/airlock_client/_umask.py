"""The process's umask, read without changing it under other threads.

``os.umask`` is read by setting it and setting it back; two threads doing that at once can
leave the process at the first one's temporary value, so that every file made afterwards
is world-writable (a batch converts on several threads: batch.py). Linux states the umask in
``/proc/self/status`` (4.7 and later), which is read instead; elsewhere the set-and-restore
runs under a lock, with the strictest mask in between.
"""

from __future__ import annotations

import os
import threading

_LOCK = threading.Lock()


def umask() -> int:
    """The umask of this process."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _LOCK:
        current = os.umask(0o077)
        os.umask(current)
    return current

"""The client reads the process's umask (to give its outputs the usual mode) from several
threads at once (a batch): reading it must never change it, not even for a moment."""

from __future__ import annotations

import os
import sys
import threading

from airlock_client._umask import umask


def test_reading_the_umask_from_many_threads_never_changes_it() -> None:
    """Setting the umask to read it, as ``os.umask`` forces, let two threads leave the
    process at 0: every file made afterwards world-writable."""
    interval = sys.getswitchinterval()
    original = os.umask(0o027)
    seen: set[int] = set()
    try:
        sys.setswitchinterval(1e-6)  # threads switch as often as they can

        def reader() -> None:
            for _ in range(3000):
                seen.add(umask())

        threads = [threading.Thread(target=reader) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        left = os.umask(0o027)
    finally:
        sys.setswitchinterval(interval)
        os.umask(original)
    assert seen == {0o027}
    assert left == 0o027

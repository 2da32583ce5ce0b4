"""How a command that runs a batch (``convert FILE FILE ...``, ``migrate``) takes Ctrl-C.

The first interrupt starts nothing new and lets the conversions in flight finish (batch.py),
so none is left half written; a second one cancels them. Both say so on stderr at once: the
batch may take minutes to wind down, and a silent terminal invites a third press.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def batch_interrupts(command: str, unit: str, *, sigterm: bool = False) -> Iterator[None]:
    """Ctrl-C (and SIGTERM when ``sigterm``: a scheduler ending the job, whose default would
    end the process at once) raises KeyboardInterrupt as Python's default does, after a line
    on stderr saying what happens next. ``unit``: what the batch is made of ("file").
    Signal handlers can only be set from the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    presses = 0

    def interrupt(signum: int, frame: object) -> None:
        nonlocal presses
        presses += 1
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        then = (f"no new {unit} starts; those in flight finish first (Ctrl-C again cancels "
                "them)" if presses == 1 else f"cancelling the {unit}s in flight")
        print(f"airlock {command}: {what}: {then}", file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    which = (signal.SIGINT, signal.SIGTERM) if sigterm else (signal.SIGINT,)
    previous = {signum: signal.signal(signum, interrupt) for signum in which}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

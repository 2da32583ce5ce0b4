"""How a command that runs a batch (``convert FILE FILE ...``, ``migrate``) takes Ctrl-C.

The first interrupt starts nothing new and lets the conversions in flight finish (batch.py),
so none is left half written; a second one cancels them. Both say so on stderr at once: the
batch may take minutes to wind down, and a silent terminal invites a third press. A third
one exits at once (130): cancelling waits for what cannot be cut short (an MLflow download
of a large model, a file system that stopped answering), and whoever presses three times
wants the terminal back. What was in flight is then left as a killed process leaves it: a
conversion's temporary file beside its output, a migration's run that the next ``migrate``
adopts or closes (_migrate_leftovers.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

#: The exit status after a third interrupt: 128 + SIGINT, as a shell reports Ctrl-C.
FORCED_EXIT = 130


@contextlib.contextmanager
def batch_interrupts(command: str, unit: str, *, halt: threading.Event | None = None,
                     sigterm: bool = False) -> Iterator[None]:
    """Within the block, Ctrl-C (and SIGTERM when ``sigterm``: a scheduler ending the job,
    whose default would end the process at once) first says on stderr what happens next.
    The first one then sets ``halt`` when given (the batch ends by itself, reporting what
    was in flight: ``batch.run_bounded``), else raises KeyboardInterrupt; the second raises
    KeyboardInterrupt; the third ends the process with 130 (``FORCED_EXIT``). ``unit``:
    what the batch converts ("version").

    A signal the process ignores (a batch started in the background by a script) stays
    ignored; handlers can only be set from the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    presses = 0

    def interrupt(signum: int, frame: object) -> None:
        nonlocal presses
        presses += 1
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if presses == 1:
            then = (f"no new {unit} starts; those in flight finish first (Ctrl-C again "
                    "cancels them)")
        elif presses == 2:
            then = f"cancelling the {unit}s in flight (Ctrl-C again exits at once)"
        else:
            then = (f"exiting at once; the {unit}s in flight are left as a killed process "
                    "leaves them")
        # Not print(): a handler that interrupts a write to sys.stderr may not write to it.
        with contextlib.suppress(OSError):
            os.write(2, f"airlock {command}: {what}: {then}\n".encode())
        if presses >= 3:
            os._exit(FORCED_EXIT)
        if presses == 1 and halt is not None:
            halt.set()
            return
        raise KeyboardInterrupt

    which = [signal.SIGINT] + ([signal.SIGTERM] if sigterm else [])
    previous = {signum: signal.signal(signum, interrupt) for signum in which
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

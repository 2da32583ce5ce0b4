"""How a batch command takes Ctrl-C (_cli_interrupts.py): each press says what happens next,
and the third one gives the terminal back even when what is in flight cannot be cut short."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import IO

from tests.conftest import CTRL_C_ABLE

#: A batch whose work in flight ignores cancellation (an MLflow download, a hung file system):
#: every KeyboardInterrupt is swallowed, as batch._wait_for's wait does. It says "waiting"
#: from inside its ``try``: an interrupt that came while it was between two (a busy machine
#: can hold it there) would end it, which is not what is tested.
STUCK = """
import sys, time
from airlock_client._cli_interrupts import batch_interrupts
with batch_interrupts("migrate", "version"):
    while True:
        try:
            print("waiting", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            pass
"""


def _line(stream: IO[str]) -> str:
    line = stream.readline()
    assert line, "the command ended (or was killed at the deadline) before saying it"
    return line


def test_the_third_ctrl_c_exits_at_once_with_130() -> None:
    child = subprocess.Popen([*CTRL_C_ABLE, sys.executable, "-c", STUCK], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = threading.Timer(120, child.kill)  # a read that never returns ends here
    deadline.start()
    try:
        assert child.stdout is not None and child.stderr is not None
        said = []
        for _ in range(3):
            assert _line(child.stdout).strip() == "waiting"  # back in its try, then pressed
            child.send_signal(signal.SIGINT)
            said.append(_line(child.stderr))  # each press answered before the next
        assert child.wait(timeout=60) == 130
    finally:
        deadline.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "no new version starts" in said[0] and "Ctrl-C again cancels" in said[0]
    assert "cancelling the versions in flight" in said[1] and "exits at once" in said[1]
    assert said[2].startswith("airlock migrate: Ctrl-C: exiting at once")
    assert "Traceback" not in child.stderr.read()

"""A long conversion says now and then that it is still at work, and stops saying so when
it ends."""

from __future__ import annotations

import io
import re
import threading
import time

from airlock_client._progress import Heartbeat

DEADLINE = 60.0


def test_a_line_each_interval_with_the_status_of_the_moment_and_none_after() -> None:
    out = io.StringIO()
    state = ["converting big.bin (16.0 GB)"]
    two = threading.Event()

    def status() -> str:
        if out.getvalue().count("\n") >= 1:
            two.set()
        return state[0]

    with Heartbeat("convert", status, interval=0.01, stream=out) as beat:
        assert two.wait(DEADLINE)
        state[0] = "converting llama/; shards 1/3 done"
        began = time.monotonic()
        while "shards 1/3" not in out.getvalue():
            assert time.monotonic() - began < DEADLINE
            time.sleep(0.01)
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"airlock convert: converting big\.bin \(16\.0 GB\), \d+s so far",
                        lines[0]), lines[0]
    assert any(line.startswith("airlock convert: converting llama/; shards 1/3 done, ")
               for line in lines)
    assert not beat._thread.is_alive()  # the block's end stopped it: no line after


def test_a_short_conversion_says_nothing() -> None:
    out = io.StringIO()
    with Heartbeat("convert", lambda: "converting m.pkl", interval=3600, stream=out):
        pass
    assert out.getvalue() == ""

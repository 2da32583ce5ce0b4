"""Run several fresh Python interpreters at once and collect what each printed: for tests that
compare imports or first calls between processes (each spends seconds importing)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_at_once(*argvs: list[str], timeout: float = 300) -> list[tuple[int, str, str]]:
    """``python ARGV`` for each argv, all started before any is awaited: (returncode, stdout,
    stderr) of each, in order. None outlives the call."""
    procs = [subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv in argvs]
    try:
        done = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append((proc.returncode, out, err))
        return done
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


#: What a script run by ``printed_results`` prints before its JSON.
RESULT = "RESULT "


def printed_results(*argvs: list[str], timeout: float = 300) -> list[dict[str, Any]]:
    """``run_at_once``, then the JSON each interpreter printed on its ``RESULT`` line, in
    order; an AssertionError with the end of its stderr for one that printed none."""
    results = []
    for argv, (_, out, err) in zip(argvs, run_at_once(*argvs, timeout=timeout), strict=True):
        line = next((x for x in out.splitlines() if x.startswith(RESULT)), None)
        assert line is not None, f"{argv[-1]}: {err[-3000:]}"
        results.append(json.loads(line[len(RESULT):]))
    return results

"""Run several fresh Python interpreters at once and collect what each printed: for tests that
compare imports or first calls between processes (each spends seconds importing)."""

from __future__ import annotations

import subprocess
import sys


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

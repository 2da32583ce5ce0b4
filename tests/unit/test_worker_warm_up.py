"""The worker's warm-up turns the cyclic garbage collector off while it imports, and must leave
it on, with the imported objects frozen, for the job that follows, even when an import fails.

Each case runs in a fresh interpreter: freezing objects is process-wide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = r'''
import gc, sys
sys.path[:0] = [sys.argv[1] + "/sandbox", sys.argv[1]]
from airlock_worker import profiles
if sys.argv[2] == "broken":
    profiles.PROFILES["light"] = ("numpy", "airlock_worker.no_such_module")
try:
    profiles.warm_up("light")
except ImportError:
    print("import failed")
print("enabled", gc.isenabled(), "frozen", gc.get_freeze_count() > 1000)
'''


def _probe(case: str) -> str:
    done = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), case], capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout.strip()


def test_collector_is_on_and_imports_frozen_after_the_warm_up() -> None:
    assert _probe("ok") == "enabled True frozen True"


def test_collector_is_on_after_a_failed_warm_up() -> None:
    assert _probe("broken") == "import failed\nenabled True frozen True"

"""A sandbox the kernel's OOM killer took is ``oom_killed`` even when the engine heard of the OOM
only after the exit.

The engine sets ``State.OOMKilled`` only for an OOM that came before the exit, but logs its
``oom`` event whenever it comes; gVisor's shim finds an OOM by polling the cgroup, and on a busy
machine (load 10-17, other suites beside it) a memory bomb under runsc came back as exit 137
with ``OOMKilled`` false: ``CONVERSION_FAILED`` "exited with code 137" instead of
``SANDBOX_OOM``. The fake engine here answers as that run's did, and logs the ``oom`` event
before or only a moment after the broker first asks."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.sandboxes.sandbox import Outcome, Slot
from airlock_broker.sandboxes.workspace import JobWorkspace
from tests.unit.fakes import run_at_engine


class _KilledApi:
    """A container that exits 137 with ``OOMKilled`` false; its event log holds ``logged``,
    each event from ``at`` (monotonic) on, and answers only the kinds the filter asks for."""

    def __init__(self, logged: list[tuple[float, dict[str, Any]]]) -> None:
        self.logged = logged
        self.asked: list[list[str]] = []
        self.lock = threading.Lock()

    def wait(self, container_id: str, timeout: float | None = None) -> dict[str, int]:
        return {"StatusCode": 137}

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        return {"State": {"Running": False, "ExitCode": 137, "OOMKilled": False}}

    def events(self, since: int, until: str, decode: bool,
               filters: dict[str, Any]) -> list[dict[str, Any]]:
        kinds = filters["event"]
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        with self.lock:
            self.asked.append(kinds)
        now = time.monotonic()
        return [event for at, event in self.logged
                if at <= now and event["Action"] in kinds
                and filters["container"] == event["Actor"]["ID"]]


def _event(action: str, **attributes: str) -> dict[str, Any]:
    return {"Type": "container", "Action": action, "status": action,
            "Actor": {"ID": "c", "Attributes": attributes}}


def _run(tmp_path: Path, api: _KilledApi) -> Outcome:
    workspace = JobWorkspace(root=tmp_path / "slot", uid=os.getuid(), gid=os.getgid())
    workspace.in_dir.mkdir(parents=True)
    workspace.out_dir.mkdir()
    slot = Slot(slot_id="s", profile="light", container_id="c", started=True,
                workspace=workspace)
    return run_at_engine(api, slot, tmp_path, deadline_seconds=60)


@pytest.mark.parametrize("late", [0.0, 0.5], ids=["logged-by-the-exit", "logged-after-it"])
def test_an_oom_the_engine_logged_makes_the_outcome_oom_killed(tmp_path: Path,
                                                              late: float) -> None:
    api = _KilledApi([(time.monotonic() + late, _event("oom"))])
    outcome = _run(tmp_path, api)
    assert outcome.oom_killed, api.asked
    assert outcome.killed_by == ""
    assert all("oom" in kinds for kinds in api.asked)


def test_a_kill_sent_through_the_engine_is_still_named_and_no_oom(tmp_path: Path) -> None:
    api = _KilledApi([(0.0, _event("kill", signal="9"))])
    outcome = _run(tmp_path, api)
    assert not outcome.oom_killed
    assert "signal 9 sent through the Docker engine" in outcome.killed_by
    assert len(api.asked) == 1  # a kill on record is the answer: no waiting for an OOM


def test_a_sigkill_no_one_sent_is_the_artifacts_own_after_the_grace(tmp_path: Path) -> None:
    api = _KilledApi([])
    started = time.monotonic()
    outcome = _run(tmp_path, api)
    assert (outcome.oom_killed, outcome.killed_by, outcome.exit_code) == (False, "", 137)
    assert len(api.asked) > 1  # looked again for an OOM the engine had not heard of yet
    assert time.monotonic() - started < 30  # and gave up (OOM_EVENT_GRACE_SECONDS)

"""A warm container under runc waits for its job asleep on its doorbell (contract.py), not
looking for the spec every 5 ms; the bell wakes it when the spec is in place, and it runs the
job. Under runsc, whose gofer does not pass a host FIFO through, no bell is made and the
worker polls. On the real engine and image: the worker's own process, read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.sandboxes.docker_sandbox import DockerSandbox
from airlock_broker.sandboxes.sandbox import Slot
from airlock_broker.sandboxes.workspace import reap_stale
from airlock_sandbox.contract import DOORBELL_NAME, JobSpec
from airlock_sandbox.formats import ArtifactFormat
from airlock_sandbox.policy import SandboxPolicy
from tests.conftest import IMAGE
from tests.fixtures import models

pytestmark = pytest.mark.integration

DEADLINE = 180.0
#: How long the idle worker's wake-ups are counted. Polling every 5 ms wakes it hundreds of
#: times in this (tens even at the lowest CPU weight on a saturated machine); asleep on its
#: bell it wakes about once a second (``DOORBELL_FALLBACK_SECONDS``).
COUNTED_SECONDS = 3.0
MAX_WAKEUPS = 10


def _wakeups(pid: int) -> int:
    """The times the worker's main thread gave up the CPU of its own accord."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for pid {pid}")


async def _warmed_up(backend: DockerSandbox, slot: Slot) -> None:
    ends = time.monotonic() + DEADLINE
    while not backend.warmed_up(slot):
        assert time.monotonic() < ends, "the warm container never warmed up"
        await asyncio.sleep(0.1)


def test_a_warm_runc_worker_sleeps_on_its_bell_and_the_ring_starts_its_job(
        docker_client: Any, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    artifact, _ = models.make_npy(tmp_path / "models")

    async def scenario() -> tuple[int, int, Any]:
        backend = DockerSandbox(SandboxPolicy(image=IMAGE), spool)
        await backend.check()
        slot = await backend.prepare("light")
        try:
            assert (slot.workspace.in_dir / DOORBELL_NAME).is_fifo()
            await backend.start(slot)
            await _warmed_up(backend, slot)
            pid = int(docker_client.api.inspect_container(slot.container_id)["State"]["Pid"])
            before = _wakeups(pid)
            await asyncio.sleep(COUNTED_SECONDS)  # a rate over a steady state, not a wait
            woken = _wakeups(pid) - before
            upload = spool / "upload"
            upload.write_bytes(artifact.read_bytes())
            await backend.hand_over(slot, upload)
            spec = JobSpec(job_id="rung", artifact_format=ArtifactFormat.NUMPY)
            outcome = await backend.run(slot, spec, DEADLINE)
            return woken, pid, outcome
        finally:
            with contextlib.suppress(Exception):
                await backend.destroy(slot)
            await backend.close()

    try:
        woken, _, outcome = asyncio.run(scenario())
    finally:
        reap_stale(spool)
    assert woken <= MAX_WAKEUPS, f"the idle worker woke {woken} times in {COUNTED_SECONDS} s"
    assert outcome.exit_code == 0 and not outcome.timed_out, outcome


def test_a_runsc_slot_gets_no_bell(docker_client: Any, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)

    async def scenario() -> bool:
        backend = DockerSandbox(SandboxPolicy(image=IMAGE, runtime="runsc"), spool)
        slot = await backend.prepare("light")
        try:
            return (slot.workspace.in_dir / DOORBELL_NAME).exists()
        finally:
            await backend.destroy(slot)
            await backend.close()

    try:
        assert asyncio.run(scenario()) is False
    finally:
        reap_stale(spool)

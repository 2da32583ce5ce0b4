"""Warm containers import and wait at the lowest CPU weight, a refill let import in its batch
at the middle one (``let_import``); one that the pools hand to a job warmed up is given the
default (``hasten``), and a cold job's container runs at the default
(sandboxes/cpu_weight.py). In-process on the real engine and image, reading each container's
own cgroup file, as the kernel applies it."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.sandboxes.cpu_weight import CpuWeight
from airlock_broker.sandboxes.docker_sandbox import DockerSandbox
from airlock_broker.sandboxes.sandbox import Slot
from airlock_broker.sandboxes.workspace import reap_stale
from airlock_sandbox.contract import JobSpec
from airlock_sandbox.formats import PROFILE_LIGHT
from airlock_sandbox.policy import SandboxPolicy
from tests.conftest import IMAGE

pytestmark = pytest.mark.integration


def _weight(docker_client: Any, slot: Slot) -> int:
    """The container's weight as its cgroup holds it (the default is 1024 on cgroup v1)."""
    pid = int(docker_client.api.inspect_container(slot.container_id)["State"]["Pid"])
    control = CpuWeight.of(Path(f"/proc/{pid}/cgroup").read_text(), slot.container_id)
    assert control is not None, "the container's cpu cgroup was not found"
    return int(control.path.read_text())


def _upload(spool: Path, name: str) -> Path:
    upload = spool / name
    upload.write_bytes(b"not a model: the container never gets a job spec here")
    return upload


def test_a_warm_container_waits_at_the_lowest_weight_until_a_job_takes_it_warmed_up(
        docker_client: Any, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)  # a state root, as the broker makes it

    async def scenario(policy: SandboxPolicy) -> dict[str, int]:
        backend = DockerSandbox(policy, spool)
        await backend.check()
        slots: list[Slot] = []
        seen: dict[str, int] = {}
        try:
            warm = await backend.prepare("light")
            slots.append(warm)
            await backend.start(warm)  # a pool's start: no job yet
            seen["warm, waiting"] = _weight(docker_client, warm)
            backend.let_import(warm)  # as the pools do for a refill in its import batch
            seen["warm, its batch importing"] = _weight(docker_client, warm)
            await backend.hand_over(warm, _upload(spool, "a"))
            seen["warm, handed a job"] = _weight(docker_client, warm)  # importing, maybe
            backend.hasten(warm)  # as the pools do for one that says it is warmed up
            seen["warm, its job running"] = _weight(docker_client, warm)
            cold = await backend.prepare("light")
            slots.append(cold)
            await backend.hand_over(cold, _upload(spool, "b"))  # the cold path's order
            await backend.start(cold)
            seen["cold"] = _weight(docker_client, cold)
            return seen
        finally:
            for slot in slots:
                with contextlib.suppress(Exception):
                    await backend.destroy(slot)
            await backend.close()

    try:
        low = asyncio.run(scenario(SandboxPolicy(image=IMAGE)))  # the default: on
        off = asyncio.run(scenario(SandboxPolicy(image=IMAGE, warm_low_priority=False)))
    finally:
        reap_stale(spool)
    assert low == {"warm, waiting": 2, "warm, its batch importing": 16,
                   "warm, handed a job": 16, "warm, its job running": 1024, "cold": 1024}
    assert off == {"warm, waiting": 1024, "warm, its batch importing": 1024,
                   "warm, handed a job": 1024, "warm, its job running": 1024, "cold": 1024}


def test_the_self_test_probe_runs_at_the_default_weight(docker_client: Any,
                                                        tmp_path: Path) -> None:
    """The probe's container is started by ``run`` (no pool, no ``hand_over``): it must
    never be lowered, or a busy broker's self-test could miss its deadline. Its weight is
    read as long as it runs; at the lowest (2) even once fails."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)

    async def scenario() -> list[int]:
        backend = DockerSandbox(SandboxPolicy(image=IMAGE, warm_low_priority=True), spool)
        await backend.check()
        seen: list[int] = []
        slot = await backend.prepare(PROFILE_LIGHT, selftest=True)
        try:
            running = asyncio.ensure_future(backend.run(slot, JobSpec(job_id="selftest"), 120))
            while not running.done():
                with contextlib.suppress(Exception):  # not started yet, or gone already
                    seen.append(_weight(docker_client, slot))
                await asyncio.sleep(0.005)
            outcome = await running
            assert outcome.exit_code == 0, outcome
            return seen
        finally:
            with contextlib.suppress(Exception):
                await backend.destroy(slot)
            await backend.close()

    try:
        seen = asyncio.run(scenario())
    finally:
        reap_stale(spool)
    assert seen, "the probe's weight was never read while it ran"
    assert set(seen) == {1024}, seen

"""A warm start that fails is no start: a job does not wait for it (sandboxes/pools.py).
Found in review (the eleventh): it counted as starting for the whole of its back-off (1 s
after one failure, up to 30 s after several), and each back-off's end started another that
failed alike, so a job that found its pool empty waited for it up to
``wait_for_starting_seconds`` (10 s by default) before it took the cold path, which works
when the warm starts do not (a full pool's memory, a start that times out). Its place in the
pool is still held during the back-off: nothing starts instead of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from airlock_broker.sandboxes.pools import Pools, PoolSettings
from airlock_broker.sandboxes.sandbox import SandboxUnavailable, Slot
from tests.unit.fakes import FakeSandbox
from tests.unit.test_pools import _until, run_pools

#: One container at most, so that a waiting job cannot start another: a job either waits for
#: the failed start or goes cold. Jobs would wait 30 s for a start.
SETTINGS = PoolSettings(min_warm=1, max_warm=1, wait_for_starting_seconds=30.0,
                        stream_window_seconds=0, defer_replacement=False,
                        profiles=("sklearn",))
#: Far less than ``wait_for_starting_seconds``; far more than a cold prepare of the fake.
PROMPTLY = 5.0


def test_a_job_does_not_wait_for_a_failed_start_backing_off(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        async def start(slot: Slot) -> None:  # the warm starts fail; a cold prepare works
            raise SandboxUnavailable("the container did not start")
        backend.start = start  # type: ignore[method-assign]
        sk = pools.pools["sklearn"]
        await _until(lambda: sk.failed_starts == 1)  # backing off now (for 1 s)
        async with asyncio.timeout(PROMPTLY):
            slot = await pools.acquire("sklearn")
        assert not slot.started and pools.status()[0].served_cold == 1
        assert sk.starting == 0 and sk.backing_off == 1  # its place still held
        await pools.release(slot)

    run_pools(tmp_path, SETTINGS, body)


def test_a_job_waiting_for_a_start_goes_cold_the_moment_it_fails(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        fail = asyncio.Event()

        async def start(slot: Slot) -> None:
            await fail.wait()
            raise SandboxUnavailable("the container did not start")
        backend.start = start  # type: ignore[method-assign]
        sk = pools.pools["sklearn"]
        await _until(lambda: sk.starting == 1)
        job = asyncio.create_task(pools.acquire("sklearn"))
        await _until(lambda: sk.waiting == 1)  # waits for the start under way, rightly
        fail.set()
        async with asyncio.timeout(PROMPTLY):
            slot = await job
        assert not slot.started and sk.failed_starts == 1
        await pools.release(slot)

    run_pools(tmp_path, SETTINGS, body)

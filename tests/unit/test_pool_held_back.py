"""A job that took a container still importing is held back by the pool only until that
container says it is warmed up (pool_demand.py: the clock the bursts are counted on stops
meanwhile). Found in review: it stayed stopped until the job was released, so one caller's
long job (an artifact that sleeps until its deadline) made every other caller's job of the
window count as one burst, and the pool kept that many more containers warm. The mark is the
sandbox's word (its artifact may remove it before the broker saw it): a job is held back at
most a few learned refill times."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from airlock_broker.sandboxes.pools import Pools, PoolSettings
from airlock_sandbox.contract import READY_NAME
from airlock_worker import output
from tests.unit.fakes import FakeSandbox
from tests.unit.test_pools import _until, run_pools


@pytest.mark.parametrize("mark", ["kept", "removed", "never"])
def test_a_long_job_on_a_container_taken_importing_does_not_stop_the_burst_clock(
        tmp_path: Path, mark: str) -> None:
    """``kept``: its worker says it is warmed up; ``removed``: the artifact removes the mark
    as soon as the worker made it, before the broker looked; ``never``: no mark at all."""
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk = pools.pools["sklearn"]
        sk.demand.refill_seconds = 0.05
        await _until(lambda: len(sk.warm) == 1)
        long_job = await pools.acquire("sklearn")  # still importing: held back
        if mark != "never":
            output.mark_ready(str(long_job.workspace.out_dir))  # warmed up: its job runs
        if mark == "removed":
            os.unlink(long_job.workspace.out_dir / READY_NAME)
        elif mark == "kept":
            await _until(lambda: long_job.slot_id in backend.hastened)
        # Other callers' jobs, one now and then (0.3 s apart, refill 0.05 s), each on a
        # container that said it is warmed up, while the long job still runs.
        for _ in range(5):
            await asyncio.sleep(0.3)
            await _until(lambda: bool(sk.warm))
            output.mark_ready(str(sk.warm[0].slot.workspace.out_dir))
            await pools.release(await pools.acquire("sklearn"))
            sk.demand.refill_seconds = 0.05  # (what the marks just taught it: not the subject)
        # Six jobs in 1.5 s on the wall clock, none within a refill time of another: no burst.
        assert sk.demand.busiest(time.monotonic()) == 1
        assert pools._target(sk) == 1
        await pools.release(long_job)
        assert not sk.importing_taken and not sk.held_back

    run_pools(tmp_path, PoolSettings(min_warm=1, max_warm=8, defer_replacement=False,
                                     stream_window_seconds=60.0, import_in_batches=False,
                                     profiles=("sklearn",)), body)

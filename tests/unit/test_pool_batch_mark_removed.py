"""An artifact that removes its container's ready mark before the broker saw it does not hold
its pool's next batch of refills (sandboxes/import_batches.py). Found in review (the
eleventh): a container a job took still importing stayed in its batch until it said it was
warmed up or its job was released, so its artifact, by removing the mark and running until
its deadline, held the next refills' imports for ``BATCH_MAX_SECONDS`` (30 s). It now leaves
the batch when its job stops counting as held back by its imports: the same decision,
at most ``HELD_BACK_MAX_REFILLS`` learned refill times after the take (pools.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airlock_broker.sandboxes.pools import Pools, PoolSettings
from airlock_sandbox.contract import READY_NAME
from airlock_worker import output
from tests.unit.fakes import FakeSandbox
from tests.unit.test_pools import _until, run_pools

SETTINGS = PoolSettings(min_warm=1, max_warm=4, defer_replacement=False,
                        stream_window_seconds=0, import_in_batches=True,
                        batch_join_seconds=0.0, profiles=("sklearn",))


@pytest.mark.parametrize("mark", ["removed", "never"])
def test_a_long_job_on_a_container_taken_importing_lets_the_next_batch_import(
        tmp_path: Path, mark: str) -> None:
    """``removed``: the artifact removes the mark as soon as the worker made it;
    ``never``: no mark at all."""
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk = pools.pools["sklearn"]
        sk.demand.refill_seconds = 0.05  # learned: held back 0.2 s at most
        await _until(lambda: len(sk.warm) == 1)
        long_job = await pools.acquire("sklearn")  # still importing: its batch waits for it
        if mark == "removed":
            output.mark_ready(str(long_job.workspace.out_dir))
            os.unlink(long_job.workspace.out_dir / READY_NAME)
        # Its replacement starts, and waits for the batch (the long job's container) to end.
        await _until(lambda: len(sk.warm) == 1 and bool(sk.batches.held))
        refill = sk.warm[0].slot
        await _until(lambda: refill.slot_id in backend.let_import_ids, timeout=5.0)
        assert long_job.slot_id in sk.importing_taken  # its job runs on, still followed
        assert long_job.slot_id not in sk.batches.importing
        await pools.release(long_job)

    run_pools(tmp_path, SETTINGS, body)

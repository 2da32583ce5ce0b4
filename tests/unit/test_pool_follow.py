"""The one task that follows imports (pools.py ``_follow_imports``): a backend whose ready
mark cannot be read, a restart under taken slots, a held refill taken ready."""
from __future__ import annotations

import asyncio
from pathlib import Path

from airlock_broker.sandboxes.pools import Pools, PoolSettings
from airlock_worker import output
from tests.unit.fakes import FakeSandbox
from tests.unit.test_pools import _until, run_pools

SETTINGS = dict(min_warm=2, max_warm=4, defer_replacement=False, import_in_batches=True,
                batch_join_seconds=0.0, profiles=("sklearn",))


def test_warmed_up_raising_ends_the_hold_and_release_clears(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk = pools.pools["sklearn"]
        sk.demand.refill_seconds = 0.05
        await _until(lambda: len(sk.warm) == 2)

        def boom(slot):  # a backend that cannot say
            raise OSError("gone")
        backend.warmed_up = boom  # type: ignore[method-assign]
        slot = await pools.acquire("sklearn")
        assert slot.slot_id in sk.held_back
        await _until(lambda: slot.slot_id not in sk.held_back)
        assert slot.slot_id in sk.importing_taken and slot.slot_id not in backend.hastened
        await pools.release(slot)
        assert not sk.importing_taken and not sk.held_back
        await _until(lambda: pools._follower is None or pools._follower.done()
                     or not sk.batches.importing)

    run_pools(tmp_path, PoolSettings(**SETTINGS), body)


def test_slots_taken_importing_before_a_restart_are_hastened_once(
        tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk = pools.pools["sklearn"]
        await _until(lambda: len(sk.warm) == 2)
        a = await pools.acquire("sklearn")
        b = await pools.acquire("sklearn")
        await pools.restart()
        await asyncio.sleep(0.1)
        for s in (a, b):
            output.mark_ready(str(s.workspace.out_dir))
        await _until(lambda: a.slot_id in backend.hastened and b.slot_id in backend.hastened)
        await asyncio.sleep(0.2)
        for s in (a, b):
            assert backend.hastened.count(s.slot_id) == 1
        assert not sk.importing_taken and not sk.held_back
        await pools.release(a)
        await pools.release(b)

    run_pools(tmp_path, PoolSettings(**SETTINGS), body)


def test_a_held_refill_taken_ready_is_never_let_import_after_hasten(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk = pools.pools["sklearn"]
        await _until(lambda: len(sk.warm) == 3 and len(sk.batches.held) >= 1)
        held_id = next(iter(sk.batches.held))
        held = next(w.slot for w in sk.warm if w.slot.slot_id == held_id)
        output.mark_ready(str(held.workspace.out_dir))  # imported on an idle core
        taken = await pools.acquire("sklearn")
        assert taken is held and backend.hastened == [held_id]
        for _ in range(20):
            for w in list(sk.warm):
                output.mark_ready(str(w.slot.workspace.out_dir))
            await asyncio.sleep(0.02)
        assert held_id not in sk.batches.held and held_id not in sk.batches.importing
        assert held_id not in backend.let_import_ids
        await pools.release(taken)

    run_pools(tmp_path, PoolSettings(**{**SETTINGS, "min_warm": 3}), body)

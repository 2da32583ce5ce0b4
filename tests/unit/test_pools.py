"""Warm pools hand out single-use slots, refill, drain, resume and restart."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.sandboxes.pools import Pools, PoolSettings
from tests.unit.fakes import FakeSandbox


async def _until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def run_pools(tmp_path: Path, settings: PoolSettings,
              body: Callable[[Pools, FakeSandbox], Awaitable[None]]) -> FakeSandbox:
    backend = FakeSandbox(tmp_path, lambda spec, data, out: 0)

    async def main() -> None:
        pools = Pools(backend, settings, image_id="sha256:fake", runtime="fake")
        pools.start()
        try:
            await body(pools, backend)
        finally:
            await pools.close()

    asyncio.run(main())
    return backend


def test_pool_fills_to_min_warm_and_hands_out_each_slot_once(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        await _until(lambda: all(len(p.warm) == 2 for p in pools.pools.values()))
        seen = set()
        for _ in range(5):
            slot = await pools.acquire("sklearn")
            assert slot.slot_id not in seen
            seen.add(slot.slot_id)
            await pools.release(slot)
        status = {s.profile: s for s in pools.status()}["sklearn"]
        assert status.served_warm >= 2 and status.busy == 0
        await _until(lambda: len(pools.pools["sklearn"].warm) == 2)  # refilled

    # A fixed pool: five jobs in a row are a burst, which raises it (test_pool_demand.py).
    backend = run_pools(tmp_path, PoolSettings(min_warm=2, max_starting=2,
                                               stream_window_seconds=0), body)
    assert backend.live == set()  # close destroyed every warm slot


def test_empty_pool_takes_the_cold_path(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        slot = await pools.acquire("torch")
        assert not slot.started  # prepared for this job, not warm
        await pools.release(slot)
        assert pools.status()[1].served_cold == 1

    run_pools(tmp_path, PoolSettings(min_warm=0), body)


def test_dead_warm_container_is_never_handed_out(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        await _until(lambda: len(pools.pools["light"].warm) == 1)
        dead = pools.pools["light"].warm[0].slot
        backend.dead.add(dead.slot_id)
        slot = await pools.acquire("light")
        assert slot.slot_id != dead.slot_id and dead.slot_id not in backend.live
        await pools.release(slot)

    run_pools(tmp_path, PoolSettings(min_warm=1), body)


def test_a_drain_stops_refills_and_jobs_admitted_before_it_still_run(tmp_path: Path) -> None:
    """A drain refuses new jobs at admission (test_readiness); a job admitted before it has
    its upload read, and still gets a sandbox: the warm one, then a cold one. The pools do
    not refill until resumed."""
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        await _until(lambda: len(pools.pools["sklearn"].warm) == 1)
        pools.drain()
        warm = await pools.acquire("sklearn")
        await pools.release(warm)
        prepared = backend.prepared
        cold = await pools.acquire("sklearn")  # no warm one left, none started: the cold path
        assert backend.prepared == prepared + 1
        await pools.release(cold)
        assert not pools.pools["sklearn"].warm and pools.pools["sklearn"].starting == 0
        pools.resume()
        await _until(lambda: len(pools.pools["sklearn"].warm) >= 1)

    run_pools(tmp_path, PoolSettings(min_warm=1, defer_replacement=False), body)


def test_restart_replaces_every_warm_container(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        await _until(lambda: all(len(p.warm) == 1 for p in pools.pools.values()))
        busy = await pools.acquire("sklearn")  # a job in flight keeps its slot
        await _until(lambda: len(pools.pools["sklearn"].warm) == 1)
        before = {w.slot.slot_id for p in pools.pools.values() for w in p.warm}
        replaced = await pools.restart()
        assert replaced == 3
        await _until(lambda: all(len(p.warm) == 1 for p in pools.pools.values()))
        after = {w.slot.slot_id for p in pools.pools.values() for w in p.warm}
        assert before.isdisjoint(after) and not before & backend.live
        assert busy.slot_id in backend.live
        await pools.release(busy)

    run_pools(tmp_path, PoolSettings(min_warm=1, max_starting=3), body)


def test_a_warm_container_outdated_while_its_liveness_is_checked_is_not_handed_out(
        tmp_path: Path) -> None:
    """A restart (an operator's, or the sweep's after ``make image``) while a job's warm slot
    is being checked: the slot was in no pool, so the restart could not retire it, and the
    generation had been compared before the check (before: the job got the old image's
    container). It is compared again after, and the slot retired."""
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        await _until(lambda: len(pools.pools["light"].warm) == 1)
        old = pools.pools["light"].warm[0].slot
        checking, restarted = asyncio.Event(), asyncio.Event()
        alive = backend.is_running

        async def is_running(slot: Any) -> bool:
            if slot.slot_id == old.slot_id:  # the engine answers after the restart
                checking.set()
                await restarted.wait()
            return await alive(slot)

        backend.is_running = is_running  # type: ignore[method-assign]
        taking = asyncio.create_task(pools.acquire("light"))
        await asyncio.wait_for(checking.wait(), 60)
        await pools.restart()
        restarted.set()
        slot = await asyncio.wait_for(taking, 60)
        assert slot.slot_id != old.slot_id
        assert old.slot_id not in backend.live  # retired, not left behind
        await pools.release(slot)

    run_pools(tmp_path, PoolSettings(min_warm=1, sweep_seconds=3600), body)


def test_rebuilt_image_rolls_the_pool(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        await _until(lambda: len(pools.pools["light"].warm) == 1)
        old = pools.pools["light"].warm[0].slot.slot_id
        backend.image_id = "sha256:new"
        await pools.sweep()
        await _until(lambda: len(pools.pools["light"].warm) == 1)
        assert pools.pools["light"].warm[0].slot.slot_id != old
        assert pools.status()[0].image_id == "sha256:new"

    run_pools(tmp_path, PoolSettings(min_warm=1, max_starting=3), body)


def test_failed_starts_are_counted_and_retried(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        backend.unavailable = True
        await _until(lambda: pools.pools["light"].failed_starts >= 1)
        backend.unavailable = False
        await _until(lambda: len(pools.pools["light"].warm) == 1, timeout=10)

    run_pools(tmp_path, PoolSettings(min_warm=1, profiles=("light",)), body)


def test_replacement_of_a_taken_warm_slot_waits_for_its_job(tmp_path: Path) -> None:
    """The replacement's start must not compete with the job; it comes once the job is done."""
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk, light = pools.pools["sklearn"], pools.pools["light"]
        await _until(lambda: all(len(p.warm) == 1 and p.starting == 0 for p in (sk, light)))
        slot = await pools.acquire("sklearn")
        assert slot.started  # warm
        # Proof that the replenisher has made a pass since: it refilled another pool.
        old_light = light.warm[0].slot.slot_id
        assert await pools.restart("light") == 1
        await _until(lambda: len(light.warm) == 1 and light.warm[0].slot.slot_id != old_light)
        assert len(sk.warm) == 0 and sk.starting == 0, "replacement started during the job"
        await pools.release(slot)
        await _until(lambda: len(sk.warm) == 1)  # and promptly after it

    run_pools(tmp_path, PoolSettings(min_warm=1, max_starting=2, profiles=("sklearn", "light"),
                                     defer_max_seconds=60.0), body)


def test_a_deferred_replacement_still_comes_when_the_job_never_ends(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk = pools.pools["sklearn"]
        await _until(lambda: len(sk.warm) == 1 and sk.starting == 0)
        slot = await pools.acquire("sklearn")
        await _until(lambda: len(sk.warm) == 1, timeout=5.0)  # defer_max_seconds bounds it
        assert sk.deferred == {}
        await pools.release(slot)

    run_pools(tmp_path, PoolSettings(min_warm=1, max_starting=2, profiles=("sklearn",),
                                     defer_max_seconds=0.3), body)


def test_a_second_job_ends_the_deferral_and_gets_the_replacement(tmp_path: Path) -> None:
    """Under concurrent demand a deferred start would only make the next job wait longer."""
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk = pools.pools["sklearn"]
        await _until(lambda: len(sk.warm) == 1 and sk.starting == 0)
        first = await pools.acquire("sklearn")
        assert first.started and len(sk.deferred) == 1
        second = await pools.acquire("sklearn")  # pool empty: the replacement, started now
        assert second.started and sk.deferred == {}
        assert (sk.served_warm, sk.served_cold) == (2, 0)
        await pools.release(first)
        await pools.release(second)

    run_pools(tmp_path, PoolSettings(min_warm=1, max_starting=2, profiles=("sklearn",),
                                     defer_max_seconds=60.0), body)


def test_without_deferral_the_replacement_starts_at_once(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk = pools.pools["sklearn"]
        await _until(lambda: len(sk.warm) == 1 and sk.starting == 0)
        slot = await pools.acquire("sklearn")
        # A deferred start would wait the whole minute: half of it tells the two apart.
        await _until(lambda: len(sk.warm) + sk.starting == 1, timeout=30.0)
        await pools.release(slot)

    run_pools(tmp_path, PoolSettings(min_warm=1, max_starting=2, profiles=("sklearn",),
                                     defer_replacement=False, defer_max_seconds=60.0), body)


def _slow_starts(backend: FakeSandbox, seconds: float) -> asyncio.Event:
    """Each start takes ``seconds`` (forever while the returned event is clear and seconds
    is negative): a container importing its libraries."""
    release = asyncio.Event()
    plain = backend.start

    async def start(slot: Any) -> None:
        if seconds < 0:
            await release.wait()
        else:
            await asyncio.sleep(seconds)
        await plain(slot)

    backend.start = start  # type: ignore[method-assign]
    return release


def test_a_job_waits_for_the_container_being_started_not_the_cold_path(tmp_path: Path) -> None:
    """Back to back: the next job finds the replacement still importing and takes it."""
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk = pools.pools["sklearn"]
        await _until(lambda: len(sk.warm) == 1 and sk.starting == 0)
        _slow_starts(backend, 0.3)
        for _ in range(4):
            slot = await pools.acquire("sklearn")
            assert slot.started
            await pools.release(slot)
        assert (sk.served_warm, sk.served_cold) == (4, 0)

    run_pools(tmp_path, PoolSettings(min_warm=1, max_starting=2, profiles=("sklearn",)), body)


def test_waiting_jobs_raise_the_target_up_to_max_warm(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk = pools.pools["sklearn"]
        await _until(lambda: len(sk.warm) == 1 and sk.starting == 0)
        release = _slow_starts(backend, -1)
        first = await pools.acquire("sklearn")
        waiters = [asyncio.create_task(pools.acquire("sklearn")) for _ in range(4)]
        # One start per waiting job, but the pool never holds more than max_warm.
        await _until(lambda: sk.waiting == 4 and sk.starting == 3)
        release.set()
        slots = await asyncio.gather(*waiters)
        assert all(slot.started for slot in slots)  # the fourth waited for a later start
        assert (sk.served_warm, sk.served_cold) == (5, 0)
        for slot in (first, *slots):
            await pools.release(slot)

    run_pools(tmp_path, PoolSettings(min_warm=1, max_warm=3, max_starting=3,
                                     profiles=("sklearn",), defer_replacement=False), body)


@pytest.mark.parametrize("wait", [0.0, 0.2])
def test_a_job_takes_the_cold_path_when_it_may_not_wait_longer(tmp_path: Path,
                                                               wait: float) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk = pools.pools["sklearn"]
        await _until(lambda: len(sk.warm) == 1 and sk.starting == 0)
        _slow_starts(backend, -1)  # the replacement never finishes starting
        first = await pools.acquire("sklearn")
        second = await pools.acquire("sklearn")
        assert first.started and not second.started
        assert (sk.served_warm, sk.served_cold) == (1, 1)
        await pools.release(first)
        await pools.release(second)

    run_pools(tmp_path, PoolSettings(min_warm=1, max_starting=2, profiles=("sklearn",),
                                     defer_replacement=False, wait_for_starting_seconds=wait),
              body)


def test_nothing_starts_once_the_pools_are_closing(tmp_path: Path) -> None:
    """A job that ends while the broker closes its pools ends its deferral: that must not start
    a container nobody will ever destroy."""
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        sk = pools.pools["sklearn"]
        await _until(lambda: len(sk.warm) == 1 and sk.starting == 0)
        slot = await pools.acquire("sklearn")
        assert len(sk.deferred) == 1
        prepared = backend.prepared
        closing = asyncio.create_task(pools.close())
        await asyncio.sleep(0)  # close() has begun: it is waiting for its background tasks
        await pools.release(slot)  # no answer to wait for: the deferral ends at once
        await closing
        await asyncio.sleep(0.2)
        assert backend.prepared == prepared and sk.starting == 0
        assert backend.live == set()

    run_pools(tmp_path, PoolSettings(min_warm=1, max_starting=2, profiles=("sklearn",),
                                     defer_max_seconds=60.0), body)


def test_a_released_slot_gives_its_input_back_before_it_is_destroyed(tmp_path: Path) -> None:
    """The RAM spool's room (an input there) comes back when the job is done with it, not
    when its slot is destroyed after the answer (deferred up to ``defer_max_seconds``)."""
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        slot = await pools.acquire("sklearn")
        upload = tmp_path / "uploads" / "job"
        upload.parent.mkdir(exist_ok=True)
        upload.write_bytes(b"weights")
        await backend.hand_over(slot, upload, b"\x93NUMPY")
        answered = asyncio.Event()
        await pools.release(slot, answered)
        gone = asyncio.get_running_loop().time() + 30  # unlinked on a thread: polled
        while slot.workspace.artifact.exists() or slot.workspace.sample.exists():
            assert asyncio.get_running_loop().time() < gone, "the input was never removed"
            await asyncio.sleep(0.005)
        assert slot.workspace.root.is_dir()  # the slot itself waits for the answer
        answered.set()
        await pools.settle()
        assert not slot.workspace.root.exists()

    run_pools(tmp_path, PoolSettings(min_warm=0, profiles=("sklearn",),
                                     defer_max_seconds=60.0), body)


def test_a_rebuilt_image_serves_new_jobs_only_once_it_passed_the_self_test(
        tmp_path: Path) -> None:
    """Found by review: after ``make image`` the sweep served the new image without the
    isolation self-test the first one passed at start-up (a base image with a VOLUME, a
    library below its version gate). New jobs are refused while it runs and for as long as the
    image fails it; a later image is tested again."""
    from airlock_broker.readiness import Hold

    async def body(pools: Pools, backend: FakeSandbox) -> None:
        verdicts = iter(["only_job_mounts: /data is a volume of the image", None])
        tested: list[str] = []

        async def vet() -> str | None:
            tested.append(backend.image_id)
            assert pools.readiness.held(Hold.SELFTEST)  # nothing new is admitted meanwhile
            return next(verdicts)

        pools.vet_image = vet
        await _until(lambda: len(pools.pools["light"].warm) == 1)
        await pools.sweep()  # the same image: nothing to test
        assert tested == [] and pools.readiness.serving
        backend.image_id = "sha256:broken"
        await pools.sweep()
        assert not pools.readiness.serving
        assert "failed the isolation self-test: only_job_mounts" in pools.readiness.why(
            Hold.SELFTEST)
        await pools.sweep()  # still that image: still refused, not tested again
        assert tested == ["sha256:broken"] and not pools.readiness.serving
        backend.image_id = "sha256:fixed"
        await pools.sweep()
        assert tested == ["sha256:broken", "sha256:fixed"] and pools.readiness.serving

    run_pools(tmp_path, PoolSettings(min_warm=1, max_starting=3), body)

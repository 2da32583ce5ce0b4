"""Pools sized for the stream of jobs (pool_demand.py): the arrival rate over a window times
the refill time, or what the window's busiest refill time needed (its jobs counted on a clock
that stops while jobs are held back: waiting for a start, or for the imports of the container
they took), on top of ``min_warm``, within ``max_warm`` and the memory budget."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from airlock_broker.sandboxes.pool_demand import INITIAL_REFILL_SECONDS, Demand
from airlock_broker.sandboxes.pool_settings import WARM_MEMORY_MIB
from airlock_broker.sandboxes.pools import Pools, PoolSettings
from airlock_worker import output
from tests.unit.test_pools import run_pools


def test_rate_counts_the_jobs_of_the_last_window_only() -> None:
    demand = Demand(10.0)
    for t in range(20):  # two jobs a second for ten seconds
        demand.arrive(100.0 + t / 2)
    assert demand.rate(109.9) == pytest.approx(2.0)
    assert demand.rate(115.0) == pytest.approx(0.9)  # the first half has left the window
    assert demand.rate(200.0) == 0.0


def test_extra_warm_is_rate_times_refill_in_whole_containers() -> None:
    demand = Demand(10.0)
    assert demand.refill_seconds == INITIAL_REFILL_SECONDS
    for t in range(10):  # one a second
        demand.arrive(float(t))
    assert demand.extra_warm(9.5) == int(INITIAL_REFILL_SECONDS)
    for _ in range(40):  # refills measured at 1.5 s: the average converges on it
        demand.refilled(1.5)
    assert demand.refill_seconds == pytest.approx(1.5, abs=0.01)
    assert demand.extra_warm(9.5) == 2  # 1.5 containers in refill: rounded up


def test_learning_off_and_a_job_now_and_then_add_nothing() -> None:
    off = Demand(0.0)
    for t in range(100):
        off.arrive(t / 100)
    assert off.rate(1.0) == 0.0 and off.busiest(1.0) == 0 and off.extra_warm(1.0) == 0
    sparse = Demand(60.0)
    for t in range(5):  # five jobs a minute: 0.25 per refill time
        sparse.arrive(t * 12.0)
    assert sparse.extra_warm(59.0) == 0
    steadier = Demand(60.0)
    for t in range(10):  # ten a minute: 0.5 per refill time, one more container
        steadier.arrive(t * 6.0)
    assert steadier.busiest(59.0) == 1 and steadier.extra_warm(59.0) == 1


def test_a_burst_after_a_quiet_spell_keeps_its_stock_for_the_window() -> None:
    demand = Demand(60.0)
    for i in range(10):  # ten jobs in a second, nothing before
        demand.arrive(100.0 + i / 10)
    assert demand.rate(101.0) * demand.refill_seconds == pytest.approx(0.5)  # the average
    assert demand.busiest(101.0) == 10
    assert demand.extra_warm(101.0) == 9  # the spare serves the first
    assert demand.extra_warm(159.0) == 9  # held for the window...
    assert demand.extra_warm(161.0) == 0  # ...and forgotten with it
    rate_only = Demand(60.0, bursts=False)
    for i in range(10):
        rate_only.arrive(100.0 + i / 10)
    assert rate_only.extra_warm(101.0) == 1


def test_busiest_counts_the_jobs_within_one_refill_time() -> None:
    demand = Demand(60.0)
    for t in range(10):  # one a second
        demand.arrive(float(t))
    assert demand.busiest(9.5) == 3  # refill 3 s: at 0, 1 and 2 (3 is a refill later)
    for _ in range(40):
        demand.refilled(1.5)
    assert demand.busiest(9.5) == 2
    # A steady stream: Little's law asks for more than its busiest refill time less one.
    assert demand.extra_warm(9.5) == math.ceil(10 / 60 * demand.refill_seconds)


def test_a_burst_that_ran_the_pool_dry_counts_the_jobs_it_held_back() -> None:
    """One client, one model after another: three warm, then each job waits for a start
    (2.7 s, 1.9 s...). The next job comes only when the last one is done, so on the wall
    clock the burst is a job per refill time; without the waits, ten within a second."""
    demand = Demand(60.0)
    t = 0.0
    for wait in (0, 0, 0, 2.7, 0, 1.9, 1.3, 0, 1.4, 1.1):
        demand.arrive(t)
        if wait:
            demand.stall_began(t)
            demand.stall_ended(t + wait)
        t += wait + 0.1
    assert demand.rate(t) * demand.refill_seconds < 1  # the average: under a container
    assert demand.busiest(t) == 10 and demand.extra_warm(t) == 9
    rate_only = Demand(60.0, bursts=False)
    rate_only.arrive(0.0)
    assert rate_only.busiest(0.0) == 1


def test_jobs_arriving_while_others_are_held_back_arrive_when_that_began() -> None:
    demand = Demand(60.0)
    demand.arrive(0.0)
    demand.stall_began(0.0)  # it waits for a start
    demand.arrive(5.0)
    demand.stall_began(5.0)  # so does the next: the clock stopped at 0.0
    demand.stall_ended(12.0)  # the first one's container came, the second still waits
    demand.arrive(15.0)
    demand.stall_ended(20.0)
    demand.arrive(20.5)
    assert demand.busiest(21.0) == 4  # at 0, 0, 0 and 0.5 on the stopped clock
    demand.arrive(30.0)
    assert demand.busiest(30.0) == 4  # 9.5 s after the last on it: a refill time away


def _stream(pools: Pools, profile: str, jobs_per_second: float, window: float) -> None:
    """Jobs as the pool sees them arrive (without taking containers)."""
    now = asyncio.get_running_loop().time()
    demand = pools.pools[profile].demand
    for i in range(int(jobs_per_second * window)):
        demand.arrive(now - window + (i + 0.5) / jobs_per_second)


async def _until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_a_stream_raises_the_pool_to_rate_times_refill_within_max_warm(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: object) -> None:
        sk = pools.pools["sklearn"]
        await _until(lambda: len(sk.warm) == 1)
        _stream(pools, "sklearn", 1.0, 10.0)  # one a second, refill 3 s: 1 + 3
        pools._wake.set()
        await _until(lambda: len(sk.warm) == 4)
        status = {s.profile: s for s in pools.status()}["sklearn"]
        assert status.target == 4 and status.jobs_per_minute == pytest.approx(60.0, abs=7)
        _stream(pools, "sklearn", 5.0, 10.0)  # more than max_warm allows
        assert pools._target(sk) == 5

    run_pools(tmp_path, PoolSettings(min_warm=1, max_warm=5, max_starting=4,
                                     stream_window_seconds=10.0, profiles=("sklearn",)), body)


@pytest.mark.parametrize(("bursts", "kept"), [(True, 5), (False, 3)])
def test_a_burst_leaves_the_pool_the_stock_it_needed(tmp_path: Path, bursts: bool,
                                                      kept: int) -> None:
    """Five jobs at once on a pool of one: then five warm (one, and four for the busiest
    refill time less its first job); by the rate alone, 5 in 10 s x 3 s, three."""
    async def body(pools: Pools, backend: object) -> None:
        sk = pools.pools["sklearn"]
        await _until(lambda: len(sk.warm) == 1)
        slots = [await pools.acquire("sklearn") for _ in range(5)]
        for slot in slots:
            await pools.release(slot)
        assert pools._target(sk) == kept
        await _until(lambda: len(sk.warm) == kept)

    run_pools(tmp_path, PoolSettings(min_warm=1, max_warm=6, max_starting=1,
                                     stream_window_seconds=10.0, stream_bursts=bursts,
                                     profiles=("sklearn",)), body)


@pytest.mark.parametrize(("ready", "busiest"), [(False, 4), (True, 1)])
def test_a_job_on_a_container_still_importing_is_held_back_until_released(
        tmp_path: Path, ready: bool, busiest: int) -> None:
    """One job after another, each 0.2 s, refill 0.1 s: a job now and then on the wall clock.
    Those that took a container whose worker had not said it was ready waited for its
    imports (the fake's containers never say so unless the test marks them)."""
    async def body(pools: Pools, backend: object) -> None:
        sk = pools.pools["sklearn"]
        sk.demand.refill_seconds = 0.1
        for _ in range(4):
            await _until(lambda: bool(sk.warm))
            if ready:
                output.mark_ready(str(sk.warm[0].slot.workspace.out_dir))
            slot = await pools.acquire("sklearn")
            await asyncio.sleep(0.2)
            await pools.release(slot)
        assert sk.demand.busiest(time.monotonic()) == busiest
        assert not sk.importing_taken

    run_pools(tmp_path, PoolSettings(min_warm=1, max_warm=6, defer_replacement=False,
                                     stream_window_seconds=10.0, profiles=("sklearn",)), body)


def test_the_memory_budget_caps_what_streams_add_across_pools(tmp_path: Path) -> None:
    sk_mib, torch_mib = WARM_MEMORY_MIB["sklearn"], WARM_MEMORY_MIB["torch"]
    budget = 2 * sk_mib + torch_mib // 2  # two extra sklearn containers, and a half torch one

    async def body(pools: Pools, backend: object) -> None:
        sk, torch = pools.pools["sklearn"], pools.pools["torch"]
        await _until(lambda: len(sk.warm) == 1 and len(torch.warm) == 1)
        _stream(pools, "sklearn", 2.0, 10.0)  # wants 6 extra
        _stream(pools, "torch", 2.0, 10.0)
        pools._wake.set()
        await _until(lambda: len(sk.warm) == 3)
        assert pools._target(sk) == 3 and pools._target(torch) == 1
        await asyncio.sleep(0.2)
        assert len(torch.warm) == 1 and torch.starting == 0

    run_pools(tmp_path, PoolSettings(min_warm=1, max_warm=8, max_starting=4,
                                     stream_window_seconds=10.0, stream_memory_budget_mib=budget,
                                     profiles=("sklearn", "torch")), body)


def test_pools_off_stay_off_whatever_the_stream(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: object) -> None:
        _stream(pools, "light", 10.0, 10.0)
        assert pools._target(pools.pools["light"]) == 0
        slot = await pools.acquire("light")
        assert not slot.started  # cold
        await pools.release(slot)

    run_pools(tmp_path, PoolSettings(min_warm=0, profiles=("light",)), body)


def test_settings_refuse_negative_stream_figures() -> None:
    with pytest.raises(ValueError):
        PoolSettings(stream_window_seconds=-1)
    with pytest.raises(ValueError):
        PoolSettings(stream_memory_budget_mib=-1)

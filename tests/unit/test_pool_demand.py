"""Pools sized for the stream of jobs (pool_demand.py): the arrival rate over a window times
the refill time, on top of ``min_warm``, within ``max_warm`` and the memory budget."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from airlock_broker.sandboxes.pool_demand import INITIAL_REFILL_SECONDS, Demand
from airlock_broker.sandboxes.pool_settings import WARM_MEMORY_MIB
from airlock_broker.sandboxes.pools import Pools, PoolSettings
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
    assert off.rate(1.0) == 0.0 and off.extra_warm(1.0) == 0
    sparse = Demand(60.0)
    for t in range(5):  # five jobs a minute: 0.25 per refill time
        sparse.arrive(t * 12.0)
    assert sparse.extra_warm(59.0) == 0
    for t in range(5):  # ten a minute: 0.5 per refill time, one more container
        sparse.arrive(t * 12.0 + 6.0)
    assert sparse.extra_warm(59.0) == 1


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

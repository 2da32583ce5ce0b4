"""The metrics endpoint answers on its own thread; the pools belong to the broker's event
loop. A scrape used to read the pools' deques from the HTTP thread while the loop changed
them ("deque mutated during iteration": an HTTP 500 to the scraper, seen in
test_pool_stream). Now every pool gauge reads a status the loop produced."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from prometheus_client import generate_latest

from airlock_broker.ops.metrics import Metrics
from airlock_broker.sandboxes.pool_state import PoolStatus


class _Pools:
    """Pools whose status records the thread that asked for it."""

    def __init__(self) -> None:
        self.pools = {"light": object()}
        self.asked_on: list[threading.Thread] = []

    def status(self) -> list[PoolStatus]:
        self.asked_on.append(threading.current_thread())
        return [PoolStatus(profile="light", warm=2, busy=1, starting=0, failed_starts=0,
                           served_warm=5, served_cold=1, oldest_warm_seconds=0.0,
                           image_id="", runtime="runc", draining=True, unavailable="",
                           importing=0, ready=2, target=3, jobs_per_minute=6.0,
                           refill_seconds=1.5)]


class _Admission:
    admitted = 0


def test_a_scrape_reads_the_pools_on_their_event_loop_once() -> None:
    pools = _Pools()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="broker-loop", daemon=True)
    thread.start()
    try:
        metrics = Metrics()

        async def bind() -> None:
            metrics.bind(_Admission(), pools)  # type: ignore[arg-type]
        asyncio.run_coroutine_threadsafe(bind(), loop).result(timeout=10)
        text: Any = generate_latest(metrics.registry).decode()  # on this (the HTTP) thread
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert pools.asked_on and all(t is thread for t in pools.asked_on), pools.asked_on
    assert len(pools.asked_on) == 1  # one status serves every gauge of the scrape
    assert 'airlock_pool_target_warm{profile="light"} 3.0' in text
    assert "airlock_pools_drained 1.0" in text
    assert 'airlock_pool_events{event="served_cold",profile="light"} 1.0' in text

"""The pools take turns at the starts (``[pools] max_starting``, across profiles). Found in
review: starts were granted first come, first served, so one caller's stream of cheap jobs
in one profile (light: a warm container counts 32 MiB, so the memory budget lets its pool
grow to ``max_warm``) queued up to fifteen starts at a time, and another caller's job that
found its own pool empty waited behind all of them (each ``docker start`` about 0.3-0.5 s
on this project's machine), up to ``wait_for_starting_seconds`` and then a cold start."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from airlock_broker.sandboxes.pools import Pools, PoolSettings
from airlock_broker.sandboxes.sandbox import Slot
from tests.unit.fakes import FakeSandbox
from tests.unit.test_pools import _until, run_pools

#: How long the fake engine takes to start a container.
START_SECONDS = 0.2


@pytest.fixture(autouse=True)
def slow_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The profile of each start the fake engine began, in order."""
    begun: list[str] = []
    start = FakeSandbox.start

    async def slow(self: FakeSandbox, slot: Slot) -> None:
        begun.append(slot.profile)
        await asyncio.sleep(START_SECONDS)
        await start(self, slot)

    monkeypatch.setattr(FakeSandbox, "start", slow)
    return begun


def test_a_stream_in_one_profile_does_not_queue_another_profiles_start_behind_it(
        tmp_path: Path, slow_starts: list[str]) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        light, sk = pools.pools["light"], pools.pools["sklearn"]
        await _until(lambda: len(light.warm) == 1 and len(sk.warm) == 1)
        # One caller's burst of light jobs: its pool's target goes to max_warm (16), and
        # its fifteen starts are asked for at once.
        now = time.monotonic()
        for i in range(20):
            light.demand.arrive(now - 1.0 + i * 0.01)
        pools._wake.set()
        await _until(lambda: light.starting >= 10)
        # Another caller: a job takes sklearn's warm container, the next finds none.
        first = await pools.acquire("sklearn")
        light_before = slow_starts.count("light")
        began = time.monotonic()
        second = await pools.acquire("sklearn")
        waited = time.monotonic() - began
        assert second.started, "took the cold path"
        # Its start goes next (after the one under way, or the one granted before its own
        # was asked for), not after the fifteen: counted, not timed. The wait (two 0.2 s
        # starts: 0.39-0.46 s under a load of 5 to 7) had 0.8 s, and the unit tests now
        # run beside the engine tests; fifteen starts would take 3 s.
        began_meanwhile = slow_starts.count("light") - light_before
        assert began_meanwhile <= 2, f"{began_meanwhile} light starts began while it waited"
        assert waited < 10 * START_SECONDS, f"waited {waited:.2f} s for its start"
        await pools.release(first)
        await pools.release(second)

    run_pools(tmp_path, PoolSettings(min_warm=1, max_warm=16, max_starting=1,
                                     defer_replacement=False, stream_window_seconds=60.0,
                                     profiles=("sklearn", "light")), body)


def test_starts_take_turns_between_pools_and_never_exceed_the_limit() -> None:
    from airlock_broker.sandboxes.start_turns import StartTurns

    async def main() -> list[str]:
        turns = StartTurns(2)
        order: list[str] = []
        running = 0

        async def start(profile: str) -> None:
            nonlocal running
            async with turns.turn(profile):
                running += 1
                assert running <= 2
                order.append(profile)
                await asyncio.sleep(0.01)
                running -= 1

        tasks = [asyncio.create_task(start("light")) for _ in range(6)]
        await asyncio.sleep(0)  # the light ones ask first
        tasks += [asyncio.create_task(start("sklearn")) for _ in range(2)]
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(main())
    assert order[:2] == ["light", "light"]  # the limit, first come
    assert order[2:5].count("sklearn") >= 1 and order.index("sklearn") <= 3
    assert sorted(order) == ["light"] * 6 + ["sklearn"] * 2


def test_a_start_cancelled_while_it_waits_or_as_its_turn_comes_holds_no_turn() -> None:
    from airlock_broker.sandboxes.start_turns import StartTurns

    async def main() -> None:
        turns = StartTurns(1)
        held = asyncio.Event()
        done = asyncio.Event()

        async def holder() -> None:
            async with turns.turn("light"):
                held.set()
                await done.wait()

        async def waiter(profile: str) -> None:
            async with turns.turn(profile):
                pass

        first = asyncio.create_task(holder())
        await held.wait()
        queued = asyncio.create_task(waiter("torch"))
        granted = asyncio.create_task(waiter("sklearn"))
        await asyncio.sleep(0)
        queued.cancel()  # while it waits
        await asyncio.sleep(0)
        done.set()
        await asyncio.sleep(0)  # the holder ends: its turn goes to sklearn...
        assert first.done() and not granted.done()
        granted.cancel()  # ...which is cancelled before it runs: the turn goes back
        with pytest.raises(asyncio.CancelledError):
            await granted
        with pytest.raises(asyncio.CancelledError):
            await queued
        async with asyncio.timeout(1):
            async with turns.turn("light"):  # nothing leaked: the one turn is free
                pass
        assert turns._free == 1 and not any(turns._waiting.values())

    asyncio.run(main())


def test_a_start_cancelled_just_before_its_turn_is_skipped() -> None:
    """Cancelled while it waits, and the turn passed on before its task ran again: the next
    one gets the turn (the first version set a result on the cancelled future: the start
    that passed it on failed, counted as a failed start, and waited out a back-off)."""
    from airlock_broker.sandboxes.start_turns import StartTurns

    async def main() -> None:
        turns = StartTurns(1)
        got: list[str] = []

        async def waiter(profile: str) -> None:
            async with turns.turn(profile):
                got.append(profile)

        async with turns.turn("light"):
            cancelled = asyncio.create_task(waiter("torch"))
            later = asyncio.create_task(waiter("sklearn"))
            await asyncio.sleep(0)  # both wait
            cancelled.cancel()  # its future is cancelled now, its task runs later
        # (the turn was passed on as the block ended: to sklearn, past torch's)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await later
        assert got == ["sklearn"] and turns._free == 1

    asyncio.run(main())

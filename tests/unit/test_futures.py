"""Pairs of steps that end together (airlock_broker.futures.together): a job's conversion
and its integrity reading run side by side; when one fails, the other must not go on using
sandboxes the job is about to destroy."""

from __future__ import annotations

import asyncio

import pytest

from airlock_broker.futures import together


async def _slow(ended: list[str], name: str) -> str:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        ended.append(f"{name} cancelled")
        raise
    return name


async def _failing() -> str:
    await asyncio.sleep(0)
    raise RuntimeError("the engine went away")


def test_both_results_come_back_in_order() -> None:
    async def pair() -> tuple[int, str]:
        async def one() -> int:
            await asyncio.sleep(0.01)
            return 1

        async def two() -> str:
            return "two"

        return await together(one(), two())

    assert asyncio.run(pair()) == (1, "two")


@pytest.mark.parametrize("failing_first", [True, False])
def test_a_failure_cancels_the_other_before_it_is_raised(failing_first: bool) -> None:
    """Where ``asyncio.gather`` would leave the other running, it is cancelled and has ended
    by the time the caller sees the failure."""
    ended: list[str] = []

    async def pair() -> None:
        steps = (_failing(), _slow(ended, "reading"))
        with pytest.raises(RuntimeError, match="went away"):
            await together(*(steps if failing_first else steps[::-1]))
        assert ended == ["reading cancelled"]
        assert {t.get_coro().__name__ for t in asyncio.all_tasks()} == {"pair"}  # type: ignore[union-attr]

    asyncio.run(pair())


def test_a_cancelled_pair_cancels_both() -> None:
    ended: list[str] = []

    async def pair() -> None:
        task = asyncio.ensure_future(together(_slow(ended, "run"), _slow(ended, "reading")))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(ended) == ["reading cancelled", "run cancelled"]

    asyncio.run(pair())

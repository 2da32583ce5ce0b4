"""Futures whose outcome no one may await, and pairs that end together."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

A = TypeVar("A")
B = TypeVar("B")


def retrieved(future: asyncio.Future[Any]) -> None:
    """Mark ``future``'s exception as seen (a done-callback, or once it is done): asyncio
    logs "exception was never retrieved" when such a future is collected."""
    if not future.cancelled():
        future.exception()


async def together(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Both results, as ``asyncio.gather`` gives them; but when either fails, or this is
    cancelled, the other is cancelled and waited for before the failure is raised, so that
    neither outlives the pair (``gather`` leaves the other running, on resources its caller
    is about to release)."""
    a, b = asyncio.ensure_future(first), asyncio.ensure_future(second)
    try:
        done_a, done_b = await asyncio.gather(a, b)
    except BaseException:
        for task in (a, b):
            task.cancel()
        await asyncio.wait({a, b})
        for task in (a, b):
            retrieved(task)
        raise
    return done_a, done_b

"""The pools' starts take turns (``[pools] max_starting``, across every profile).

At most ``max_starting`` containers are started at once: each start is about a CPU-second of
the machine's, and the jobs come first. When more starts wait than may run, a pool's next
start waits behind one start of each other pool that waits, not behind all of theirs: one
caller's stream of cheap jobs in one profile (a light container counts 32 MiB, so the memory
budget lets its pool grow to ``max_warm``) asked for fifteen starts at once, and another
caller's job that found its own pool empty waited behind all of them (each ``docker start``
0.3-0.5 s on this project's machine), up to ``wait_for_starting_seconds``, then took a cold
start. Within a pool, first come, first served.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class StartTurns:
    """At most ``limit`` starts at once; the pools whose starts wait take turns."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        #: profile -> its starts waiting for a turn, oldest first
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        #: profile -> when it last had a turn (a counter), for the next turn's choice
        self._last_turn: dict[str, int] = {}
        self._turns = 0

    @contextlib.asynccontextmanager
    async def turn(self, profile: str) -> AsyncIterator[None]:
        """Hold one of the starts of ``profile``'s pool for the block."""
        if self._free > 0 and not any(self._waiting.values()):
            self._free -= 1
            self._note_turn(profile)
        else:
            given = asyncio.get_running_loop().create_future()
            queue = self._waiting.setdefault(profile, deque())
            queue.append(given)
            try:
                await given
            except asyncio.CancelledError:
                if given.done() and not given.cancelled():
                    self._pass_on()  # its turn came as it was cancelled: the next one's
                else:
                    with contextlib.suppress(ValueError):
                        queue.remove(given)
                raise
        try:
            yield
        finally:
            self._pass_on()

    def _note_turn(self, profile: str) -> None:
        self._turns += 1
        self._last_turn[profile] = self._turns

    def _pass_on(self) -> None:
        """A start is done: the pool that waited longest since its last turn goes next."""
        while True:
            waiting = [profile for profile, queue in self._waiting.items() if queue]
            if not waiting:
                self._free += 1
                return
            profile = min(waiting, key=lambda p: self._last_turn.get(p, 0))
            given = self._waiting[profile].popleft()
            if given.done():  # cancelled as it waited; its task has not looked yet
                continue
            self._note_turn(profile)
            given.set_result(None)
            return

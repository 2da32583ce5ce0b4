"""The state of one warm pool (``Pools`` in pools.py changes it) and what its status says."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from airlock_broker.sandboxes.import_batches import ImportBatches
from airlock_broker.sandboxes.pool_demand import Demand
from airlock_broker.sandboxes.sandbox import Slot


@dataclass
class Warm:
    """A started container waiting for a job, and when and for which generation it was
    started."""

    slot: Slot
    since: float
    generation: int
    #: When its start was asked for (before the container was created): its refill time
    #: ends when its worker says it is ready.
    began: float = 0.0
    #: Its worker has said it finished importing and priming (``SandboxBackend.warmed_up``).
    #: Kept once seen: the mark only goes away with the job that takes the slot.
    ready: bool = False


@dataclass
class Pool:
    """One profile's pool. Counters are cumulative since the broker started."""

    profile: str
    warm: deque[Warm] = field(default_factory=deque)
    #: Starts under way (or waiting for their turn): jobs that find the pool empty wait for
    #: one (``wait_for_starting_seconds``).
    starting: int = 0
    #: Starts that failed, each waiting out its back-off: they are no start, so no job waits
    #: for one, but they hold their place in the pool meanwhile (nothing starts instead).
    backing_off: int = 0
    busy: int = 0
    failed_starts: int = 0
    served_warm: int = 0
    served_cold: int = 0
    retired: int = 0
    #: Failed starts since the last success: the back-off before the next attempt grows with it.
    failures_in_a_row: int = 0
    #: Bumped by a restart: warm or starting containers of an older generation are retired.
    generation: int = 0
    #: Warm containers taken by jobs still running, whose replacement waits for them (slot id
    #: -> the timer that ends the wait anyway). They count as filling the pool meanwhile.
    deferred: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    #: Warm containers taken out of ``warm`` whose liveness ``acquire`` is checking.
    checking: int = 0
    #: Jobs waiting for a container being started (``acquire``): each raises the pool's
    #: target by one, up to ``max_warm``.
    waiting: int = 0
    #: Jobs that took a container whose worker had not said it was ready (slot id -> the
    #: slot, and when it was taken), until it says so or is released: their CPU weight is
    #: raised once their worker says it is warmed up (pools.py ``_follow_imports``).
    importing_taken: dict[str, tuple[Slot, float]] = field(default_factory=dict)
    #: Of those, the ones counted as held back by its imports (for sizing, pool_demand.py),
    #: their containers as still importing (for their batch, import_batches.py): until it
    #: says it is warmed up, it is released, or ``HELD_BACK_MAX_REFILLS`` learned refill
    #: times have passed (pools.py: the mark is the sandbox's word, and an artifact can take
    #: it away before the broker saw it).
    held_back: set[str] = field(default_factory=set)
    #: Set (and replaced) whenever a start ends or a deferral does: waiters look again.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: The jobs' arrival rate and the refill time, learned: how many warm containers the
    #: current stream needs (pool_demand.py). Learning off until pools.py sets a window.
    demand: Demand = field(default_factory=lambda: Demand(0.0))
    #: Which of its refills import now and which wait for the next batch (import_batches.py).
    #: No join window until pools.py sets the configured one (``batch_join_seconds``).
    batches: ImportBatches = field(default_factory=lambda: ImportBatches(0.0))

    def signal(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass(frozen=True)
class PoolStatus:
    """What ``Pools.status`` reports of one pool (the admin API's GetPoolStatus)."""

    profile: str
    warm: int
    busy: int
    starting: int
    failed_starts: int
    served_warm: int
    served_cold: int
    oldest_warm_seconds: float
    image_id: str
    runtime: str
    draining: bool
    #: Why no container can be started now (the engine is unreachable), or "".
    unavailable: str = ""
    #: Of ``warm``: started, their worker still importing its libraries (or one that never
    #: says it is done), and those whose worker said it waits for a job. The workers' own
    #: word: for status and sizing, never for a decision.
    importing: int = 0
    ready: int = 0
    #: How many warm containers the pool keeps now (``min_warm``, raised by the stream of
    #: jobs and by jobs waiting for a start, within ``max_warm`` and the memory budget), and
    #: the arrival rate behind it (jobs per minute over ``stream_window_seconds``).
    target: int = 0
    jobs_per_minute: float = 0.0
    #: The learned time from a container's start to its worker's ready mark (seconds).
    refill_seconds: float = 0.0

"""Warm, single-use sandbox pools: speed without sharing.

Each worker profile (sklearn, torch, light) keeps ``min_warm`` containers started ahead of
time: created with their own fresh workspace, started, their profile's libraries imported,
waiting for a job spec; more while a stream of jobs needs them (the arrival rate times the
refill time, or what the window's busiest refill time needed, learned per pool:
pool_demand.py), within ``max_warm`` and a memory budget. A job takes one, uses it once,
and destroys it (DESIGN §1.2); the replenisher starts a replacement in the background once
that job is done (so that the start does not take CPU from the job), never more than
``max_starting`` at a time. When a pool is empty a job takes the cold path: a container
prepared just for it.

Operators can drain (no container is handed out: jobs are refused with UNAVAILABLE), resume,
and restart (every warm container replaced, e.g. after ``make image``). A periodic sweep
retires warm containers that died or grew old, reaps orphans, and notices a rebuilt image.

A watch pings the engine every ``engine_check_seconds`` (engine_watch.py). While it does not
answer, the broker's readiness holds ENGINE_DOWN with the reason: jobs are refused at once with
it, health says NOT_SERVING, nothing is started. When it answers again, a sweep clears out what
the outage killed and the pools refill without waiting out a start backoff. An operator drain
is a readiness hold too (readiness.py): the pools and admission both refuse while it is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from airlock_broker.errors import Reason, error
from airlock_broker.readiness import DRAINED_WHY, JOB_HOLDS, POOL_HOLDS, Hold, Readiness
from airlock_broker.sandboxes.engine_watch import engine_back
from airlock_broker.sandboxes.import_batches import BATCH_MAX_SECONDS, ImportBatches
from airlock_broker.sandboxes.pool_demand import Demand
from airlock_broker.sandboxes.pool_settings import WARM_MEMORY_MIB
from airlock_broker.sandboxes.pool_settings import PoolSettings as PoolSettings
from airlock_broker.sandboxes.pool_state import Pool, PoolStatus, Warm
from airlock_broker.sandboxes.sandbox import SandboxBackend, SandboxUnavailable, Slot
from airlock_broker.sandboxes.start_turns import StartTurns

log = logging.getLogger(__name__)

#: How often a container that a job took still importing is asked whether it is warmed up
#: (a stat of its marker): its job starts then, and runs at the default CPU weight.
WARMED_UP_POLL_SECONDS = 0.02
#: A job that took a container still importing counts as held back by its imports (the
#: clock bursts are counted on stops, pool_demand.py), and its container as one of its
#: batch's imports (import_batches.py), until the container says it is warmed up, its job
#: is released, or at most this many learned refill times have passed (never beyond
#: ``BATCH_MAX_SECONDS``): the mark is the sandbox's word, and the job's artifact may remove
#: it before it is seen; held back for its whole run (up to its deadline), it made every
#: other caller's job of the window count as one burst, and held the pool's next refills'
#: imports for 30 s.
HELD_BACK_MAX_REFILLS = 4


async def _destroy_shielded(backend: SandboxBackend, slot: Slot) -> None:
    """Destroy ``slot`` even if the calling task is being cancelled again meanwhile."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(backend.destroy(slot))


class Pools:
    """Hands out single-use slots: warm when one is ready, cold otherwise."""

    def __init__(self, backend: SandboxBackend, settings: PoolSettings, *, image_id: str = "",
                 runtime: str = "", readiness: Readiness | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.pools = {p: Pool(p, demand=Demand(settings.stream_window_seconds,
                                               bursts=settings.stream_bursts),
                              batches=ImportBatches(settings.batch_join_seconds))
                      for p in settings.profiles}
        #: Shared with admission and health; the pools set DRAINED and ENGINE_DOWN.
        self.readiness = readiness or Readiness()
        self.image_id = image_id
        self.runtime = runtime
        #: Runs the isolation self-test on the image the backend now uses: None when it
        #: passed, else why not. Set by the server (ops/selftest.py is above this module);
        #: without it a new image is served unvetted.
        self.vet_image: Callable[[], Awaitable[str | None]] | None = None
        #: At most ``max_starting`` starts at once, the pools taking turns (start_turns.py).
        self._starts = StartTurns(settings.max_starting)
        self._wake = asyncio.Event()
        #: Set for a moment when the engine comes back: start back-offs end early.
        self._recovered = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Destruction of released slots; never cancelled, awaited by ``close``.
        self._destroying: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        #: Set by ``close``: from then on nothing is started (a start would outlive it).
        self._closing = False
        #: Follows the imports of refills and of taken containers while there are any to
        #: follow (``_follow_imports``).
        self._follower: asyncio.Task[None] | None = None

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._replenish_forever(), name="pool-replenish")
        self._sweep_task = asyncio.create_task(self._sweep_forever(), name="pool-sweep")
        self._watch_task = asyncio.create_task(self._watch_engine_forever(), name="engine-watch")

    async def close(self) -> None:
        """Stop replenishing and destroy every warm container (busy ones belong to jobs)."""
        self._closing = True
        background = (self._loop_task, self._sweep_task, self._watch_task, *self._tasks)
        for task in background:
            if task is not None:
                task.cancel()
        for task in background:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for pool in self.pools.values():
            for timer in pool.deferred.values():
                timer.cancel()
            pool.deferred.clear()
            while pool.warm:
                await self.backend.destroy(pool.warm.popleft().slot)
        await self.settle()

    async def settle(self) -> None:
        """Wait until every released slot has been destroyed."""
        while self._destroying:
            await asyncio.gather(*self._destroying, return_exceptions=True)

    # -- jobs ------------------------------------------------------------------------------

    async def acquire(self, profile: str, *, disk_output_bytes: int = 0,
                      on_disk: bool = False) -> Slot:
        """A slot for one job: a warm one if any is alive; else, when one is being started for
        the pool, that one (waiting at most ``wait_for_starting_seconds``: a start of its own
        would cost the job as long, and take CPU from the one under way); else a freshly
        prepared one (the cold path). ``disk_output_bytes``: a job whose output needs a
        disk-backed filesystem of that size (a warm container's output is fixed at its
        creation); ``on_disk``: a job whose input is on the disk spool while warm slots are
        on the RAM spool (conversion/input_room.py): either is always prepared for the job,
        as the cold path does."""
        # A job admitted (its upload read) before a shutdown or an operator's drain still
        # gets its sandbox: those stop new jobs at admission, and a drain stops the pools'
        # refills (``_fill``). Only an engine that does not answer refuses it here.
        self.readiness.check(*JOB_HOLDS)
        pool = self.pools.get(profile)
        if pool is None or disk_output_bytes or on_disk:
            return await self._cold(pool, profile, disk_output_bytes, on_disk)
        pool.demand.arrive(time.monotonic())
        # A second job while a replacement waits: there is demand, so start it now.
        for slot_id in list(pool.deferred):
            self._end_deferral(pool, slot_id)
        deadline = asyncio.get_running_loop().time() + self.settings.wait_for_starting_seconds
        while True:
            slot = await self._take_warm(pool)
            if slot is not None:
                return slot
            if not await self._wait_for_start(pool, deadline):
                return await self._cold(pool, profile)
            self.readiness.check(*JOB_HOLDS)  # the engine lost meanwhile

    async def _take_warm(self, pool: Pool) -> Slot | None:
        """A live warm slot of ``pool``, or None; dead or outdated ones are retired."""
        while pool.warm:
            warm = self._next_warm(pool)
            pool.checking += 1  # still fills the pool while its liveness is checked
            try:
                alive = warm.generation == pool.generation and await self._alive(warm.slot)
            except BaseException:
                # Cancelled (the client went away) while this slot was ours alone: it is in
                # no pool and no job, so nobody else would ever destroy it.
                self._wake.set()
                await _destroy_shielded(self.backend, warm.slot)
                raise
            finally:
                pool.checking -= 1
            # Asked again after the await: a restart or a rebuilt image (the sweep restarts
            # the pools) may have come while its liveness was checked, and the restart could
            # not retire this one, which was in no pool meanwhile.
            if alive and warm.generation == pool.generation:
                pool.busy += 1
                pool.served_warm += 1
                if self._said_ready(pool, warm):
                    # Its job runs now: ahead of the refills (cpu_weight.py), before its spec
                    # exists. One still importing stays among them, as one of them.
                    self.backend.hasten(warm.slot)
                else:  # the job waits for its imports
                    pool.importing_taken[warm.slot.slot_id] = (warm.slot, time.monotonic())
                    pool.held_back.add(warm.slot.slot_id)
                    pool.demand.stall_began(time.monotonic())
                    # It imports at the refills' weight, as one of them (raised now, it would
                    # get ready alone, the refills one at a time); its job, which starts once
                    # it is warmed up, runs at the default weight, however long that takes.
                    self._follow(pool.batches.join(warm.slot, time.monotonic())
                                 if self.settings.import_in_batches else [])
                self._defer_replacement(pool, warm.slot.slot_id)
                return warm.slot
            self._wake.set()
            if not alive and warm.generation == pool.generation:  # as the sweep counts it
                pool.failed_starts += 1
                log.warning("a warm %s container died while waiting; replaced", pool.profile)
            pool.retired += 1
            await self.backend.destroy(warm.slot)
        return None

    def _next_warm(self, pool: Pool) -> Warm:
        """Take out the warm container a job gets: the oldest that says it is warmed up, else
        the oldest (the furthest in its imports, most likely). Refills do not always get ready
        in the order they were started (import_batches.py)."""
        ready = next((warm for warm in pool.warm if self._said_ready(pool, warm)), None)
        if ready is None:
            return pool.warm.popleft()
        pool.warm.remove(ready)
        return ready

    async def _wait_for_start(self, pool: Pool, deadline: float) -> bool:
        """Wait for a start of ``pool`` to end (this job counts as demand meanwhile); False
        when none is under way or due, or the deadline passed: take the cold path."""
        if self.settings.min_warm == 0:  # pools off: every job is cold
            return False
        pool.waiting += 1
        pool.demand.stall_began(time.monotonic())  # the pool ran dry: for its sizing
        try:
            self._fill(pool)
            if not (pool.starting or pool.deferred):
                return False
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await pool.changed.wait()
                    return True
            return False
        finally:
            pool.waiting -= 1
            pool.demand.stall_ended(time.monotonic())

    async def _cold(self, pool: Pool | None, profile: str, disk_output_bytes: int = 0,
                    on_disk: bool = False) -> Slot:
        try:
            slot = await self.backend.prepare(profile, disk_output_bytes=disk_output_bytes,
                                              on_disk=on_disk)
        except SandboxUnavailable as exc:
            raise error(Reason.SANDBOX_UNAVAILABLE, str(exc)) from exc
        if pool is not None:
            pool.busy += 1
            pool.served_cold += 1
        return slot

    async def release(self, slot: Slot, answered: asyncio.Event | None = None) -> None:
        """Give back a slot a job is done with. Never raises, never waits.

        The job's container is dead (or being killed) by now and its output has been read.
        The slot stops counting as busy at once; its destruction (``docker rm``, the unmount)
        and the pool's refill wait until the job's answer is out (``answered`` is set), for at
        most ``defer_max_seconds``: on this project's 2-core machine both took the CPU from the
        answer's last steps (S1 and S2 slower by about 20 ms, bench.profile). A caller that
        never reads holds the dead container no longer than that. The slot's input is removed
        at once, on a thread (a RAM spool's room, conversion/input_room.py, does not wait for
        the answer).
        The pools own the destruction from here; ``close`` waits for every one still under
        way.
        """
        pool = self.pools.get(slot.profile)
        if pool is not None:
            pool.busy = max(0, pool.busy - 1)
            pool.importing_taken.pop(slot.slot_id, None)
            _end_hold(pool, slot.slot_id)
        task = asyncio.create_task(self._retire(pool, slot, answered),
                                   name=f"destroy-{slot.slot_id}")
        self._destroying.add(task)
        task.add_done_callback(self._destroying.discard)

    async def _retire(self, pool: Pool | None, slot: Slot,
                      answered: asyncio.Event | None) -> None:
        try:
            try:  # its input now, its slot later: a RAM spool's room comes back at once (an
                # input on disk may be GiB: unlinked off the loop)
                await asyncio.to_thread(slot.workspace.drop_input)
            except OSError as exc:
                log.warning("could not remove the input of slot %s: %s", slot.slot_id, exc)
            if answered is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.defer_max_seconds):
                        await answered.wait()
        finally:
            if pool is not None:
                self._end_deferral(pool, slot.slot_id)
            await _destroy_shielded(self.backend, slot)

    def _defer_replacement(self, pool: Pool, slot_id: str) -> None:
        """Hold back the replacement of a warm slot a job took until ``release`` (bounded).

        Only while this job is the pool's only one: under concurrent load a deferred start
        sends the next jobs down the cold path, which costs more than the CPU it saves.
        """
        if not self.settings.defer_replacement or pool.busy > 1:
            self._wake.set()
            return
        pool.deferred[slot_id] = asyncio.get_running_loop().call_later(
            self.settings.defer_max_seconds, self._end_deferral, pool, slot_id)

    def _end_deferral(self, pool: Pool, slot_id: str) -> None:
        timer = pool.deferred.pop(slot_id, None)
        if timer is not None:
            timer.cancel()
            self._fill(pool)  # the replacement is starting before a waiter looks again
            pool.signal()

    async def _alive(self, slot: Slot) -> bool:
        try:
            return await self.backend.is_running(slot)
        except SandboxUnavailable:
            return False

    # -- operations ------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.readiness.held(Hold.DRAINED)

    def drain(self) -> None:
        self.readiness.hold(Hold.DRAINED, DRAINED_WHY)

    def resume(self) -> None:
        self.readiness.release(Hold.DRAINED)
        self._wake.set()

    async def restart(self, profile: str | None = None) -> int:
        """Replace every warm container (of one profile, or all). Jobs in flight keep theirs."""
        if profile is not None and profile not in self.pools:
            raise error(Reason.BAD_REQUEST, f"unknown profile {profile[:40]!r}; this broker's "
                                            f"pools: {', '.join(self.pools)}")
        replaced = 0
        for pool in self.pools.values():
            if profile is not None and pool.profile != profile:
                continue
            pool.generation += 1
            while pool.warm:
                await self.backend.destroy(pool.warm.popleft().slot)
                pool.retired += 1
                replaced += 1
        self._wake.set()
        return replaced

    def status(self) -> list[PoolStatus]:
        now = time.monotonic()
        out = []
        for p in self.pools.values():
            ready = self._count_ready(p)
            rate = p.demand.rate(now)
            out.append(PoolStatus(
                profile=p.profile, warm=len(p.warm), busy=p.busy, starting=p.starting,
                failed_starts=p.failed_starts, served_warm=p.served_warm,
                served_cold=p.served_cold,
                oldest_warm_seconds=max((now - w.since for w in p.warm), default=0.0),
                image_id=self.image_id, runtime=self.runtime, draining=self.draining,
                unavailable=self.readiness.why(Hold.ENGINE_DOWN),
                importing=len(p.warm) - ready, ready=ready, target=self._target(p),
                jobs_per_minute=round(rate * 60, 2),
                refill_seconds=round(p.demand.refill_seconds, 2)))
        return out

    def _count_ready(self, pool: Pool) -> int:
        """How many of ``pool``'s warm containers have said they are warmed up."""
        return sum(self._said_ready(pool, warm) for warm in pool.warm)

    def _said_ready(self, pool: Pool, warm: Warm) -> bool:
        """Whether ``warm``'s worker has said it is warmed up (asked of the backend until it
        says so; a hint only, for status and sizing, see ``SandboxBackend.warmed_up``)."""
        if not warm.ready:
            warm.ready = self._warmed_up(warm.slot) is True
            if warm.ready and warm.began:
                # Seen late by up to the replenisher's period: errs on the long side.
                pool.demand.refilled(time.monotonic() - warm.began)
        return warm.ready

    # -- background work -------------------------------------------------------------------

    def _target(self, pool: Pool) -> int:
        """How many containers ``pool`` keeps: ``min_warm``, plus what the stream of jobs and
        its bursts need (within the memory budget: what they add costs memory, hardly CPU,
        pool_demand.py) or one per job waiting for a start, whichever is more, at most
        ``max_warm``. Pools off (``min_warm = 0``) stay off."""
        if self.settings.min_warm == 0:
            return 0
        stream = min(pool.demand.extra_warm(time.monotonic()), self._memory_allows(pool))
        return min(self.settings.max_warm, self.settings.min_warm + max(pool.waiting, stream))

    def _memory_allows(self, pool: Pool) -> int:
        """How many containers beyond ``min_warm`` ``pool`` may hold within
        ``stream_memory_budget_mib``, what the other pools' extra containers hold counted."""
        others = sum(max(0, _held(p) - self.settings.min_warm) * _mib(p.profile)
                     for p in self.pools.values() if p is not pool)
        return max(0, (self.settings.stream_memory_budget_mib - others) // _mib(pool.profile))

    def _fill(self, pool: Pool) -> None:
        """Start containers until the pool holds its target (``_target``). (At most
        ``max_starting`` start at once.)"""
        if self._closing or self.readiness.refusal(*POOL_HOLDS) is not None:
            return
        target = self._target(pool)
        while _held(pool) < target:
            pool.starting += 1
            task = asyncio.create_task(self._start_one(pool))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _replenish_forever(self) -> None:
        while True:
            self._wake.clear()
            for pool in self.pools.values():
                self._count_ready(pool)  # learns refill times (pool_demand.py)
                self._fill(pool)
            # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation that
            # races with the event, and close() would then wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wake.wait()

    async def _start_one(self, pool: Pool) -> None:
        generation = pool.generation
        began = time.monotonic()
        starting = True  # (``_fill`` counted it)
        try:
            async with self._starts.turn(pool.profile):
                slot = await self.backend.prepare(pool.profile)
                try:
                    await self.backend.start(slot)
                except BaseException:
                    await self.backend.destroy(slot)
                    raise
            pool.failures_in_a_row = 0
            if generation != pool.generation:  # restarted while this one was starting
                await self.backend.destroy(slot)
            else:
                pool.warm.append(Warm(slot=slot, since=time.monotonic(),
                                       generation=generation, began=began))
                if self.settings.import_in_batches:
                    self._follow(pool.batches.admit(slot, time.monotonic()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            pool.failed_starts += 1
            pool.failures_in_a_row += 1
            log.warning("warm %s container failed to start: %s", pool.profile, exc)
            # No start from here: a job waiting for one looks again now (and takes the cold
            # path if nothing else starts), not after the back-off (up to 30 s); counted
            # as starting meanwhile, it kept jobs waiting up to ``wait_for_starting_seconds``.
            pool.starting -= 1
            starting = False
            pool.backing_off += 1
            pool.signal()
            try:
                # Backs off on consecutive failures only; an engine recovery cuts it short.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(
                            min(30.0, 0.5 * 2 ** min(pool.failures_in_a_row, 6))):
                        await self._recovered.wait()
            finally:
                pool.backing_off -= 1
        finally:
            if starting:
                pool.starting -= 1
            pool.signal()
            self._wake.set()

    # -- following imports: batches (import_batches.py) and taken containers ----------------

    def _follow(self, let_import: list[Slot]) -> None:
        """Let ``let_import`` import now, and follow the imports while there are any to
        follow."""
        for slot in let_import:
            self.backend.let_import(slot)
        if self._closing or self._nothing_to_follow() or (self._follower is not None
                                                          and not self._follower.done()):
            return  # (after close, nothing would cancel it)
        self._follower = asyncio.create_task(self._follow_imports(), name="pool-imports")
        self._tasks.add(self._follower)
        self._follower.add_done_callback(self._tasks.discard)

    async def _follow_imports(self) -> None:
        """Each poll: a taken container that says it is warmed up runs its job at the default
        weight (``hasten``) and its job is no longer held back (one that never says so stops
        counting as held back after ``HELD_BACK_MAX_REFILLS`` refill times, and is still
        followed for its weight); and the batches move on (``ImportBatches.settle``)."""
        while not self._nothing_to_follow():
            await asyncio.sleep(WARMED_UP_POLL_SECONDS)
            now = time.monotonic()
            for pool in self.pools.values():
                longest = min(BATCH_MAX_SECONDS,
                              HELD_BACK_MAX_REFILLS * pool.demand.refill_seconds)
                for slot_id, (slot, taken) in list(pool.importing_taken.items()):
                    if self._warmed_up(slot):
                        del pool.importing_taken[slot_id]
                        self.backend.hasten(slot)
                        _end_hold(pool, slot_id)  # its job runs: no longer held back
                    elif now - taken > longest:
                        _end_hold(pool, slot_id)
                for slot in pool.batches.settle(now, self._still_importing):
                    self.backend.let_import(slot)

    def _nothing_to_follow(self) -> bool:
        return all(pool.batches.idle and not pool.importing_taken for pool in self.pools.values())

    def _still_importing(self, slot: Slot) -> bool:
        """Whether ``slot`` waits in its pool, or its job is held back by its imports, and it
        has not said it is warmed up. A job's container is importing exactly as long as its
        job is held back (``_follow_imports`` decides, for the sizing and the batch alike):
        its artifact may remove the mark before it was seen, and the batch waited for it up
        to ``BATCH_MAX_SECONDS``. (One taken by a job while its liveness is checked counts as
        gone for a moment: if its job keeps it, ``_take_warm`` puts it back in the batch.)"""
        pool = self.pools.get(slot.profile)
        if pool is None:
            return False
        waiting = slot.slot_id in pool.held_back or any(
            warm.slot is slot for warm in pool.warm)
        return waiting and self._warmed_up(slot) is False

    def _warmed_up(self, slot: Slot) -> bool | None:
        """Whether ``slot``'s worker says it is warmed up; None when the backend cannot say (a
        hint must never break status, metrics or a job: such a slot counts as not ready, holds
        no batch, and its job keeps the weight it has)."""
        try:
            return self.backend.warmed_up(slot)
        except Exception as exc:
            log.debug("readiness of %s unknown: %s", slot.slot_id, exc)
            return None

    async def _watch_engine_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.engine_check_seconds)
            await self.check_engine()

    async def check_engine(self) -> None:
        """Ping the engine (engine_watch.py); when it is back, clear out the outage, refill."""
        if not await engine_back(self.backend, self.readiness):
            return
        log.info("the sandbox engine is back; clearing out the outage and refilling the pools")
        try:  # still refusing jobs and starting nothing: the sweep sees a quiet broker
            await self.sweep()
        except Exception as exc:
            log.warning("sweep after the engine came back failed: %s", exc)
        self.readiness.release(Hold.ENGINE_DOWN)
        for pool in self.pools.values():
            pool.failures_in_a_row = 0
        self._recovered.set()
        self._recovered.clear()
        self._wake.set()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_seconds)
            try:
                await self.sweep()
            except Exception as exc:
                log.warning("pool sweep failed: %s", exc)

    async def sweep(self) -> None:
        """Retire dead or old warm containers, reap orphans, follow a rebuilt image."""
        now = time.monotonic()
        for pool in self.pools.values():
            for warm in list(pool.warm):
                too_old = now - warm.since > self.settings.max_age_seconds
                if too_old or not await self._alive(warm.slot):
                    with contextlib.suppress(ValueError):
                        pool.warm.remove(warm)
                        pool.retired += 1
                        if not too_old:
                            pool.failed_starts += 1
                        await self.backend.destroy(warm.slot)
        await self.backend.reap_orphans()
        image_id = await self.backend.check()
        if self.image_id and image_id != self.image_id:
            log.info("sandbox image changed (%s -> %s): replacing warm containers",
                     self.image_id[:19], image_id[:19])
            self.image_id = image_id
            await self._vet(image_id)
            await self.restart()
        self.image_id = image_id
        self._wake.set()

    async def _vet(self, image_id: str) -> None:
        """A new image serves new jobs only once it passed the isolation self-test, as the
        first one did when the broker started: new jobs are refused (UNAVAILABLE, which
        clients retry) while it runs, and for as long as the image fails it (a later image
        is tested again). Jobs admitted before keep their place."""
        if self.vet_image is None:
            return
        self.readiness.hold(Hold.SELFTEST, f"the new sandbox image {image_id[:19]} is "
                                           "running its isolation self-test")
        try:
            why = await self.vet_image()
        except Exception as exc:  # the self-test could not run: not a pass
            why = f"it could not run: {type(exc).__name__}: {exc}"
        if why is None:
            self.readiness.release(Hold.SELFTEST)
            log.info("the new sandbox image %s passed the isolation self-test", image_id[:19])
            return
        self.readiness.hold(Hold.SELFTEST, f"the new sandbox image {image_id[:19]} failed the "
                                           f"isolation self-test: {why}")
        log.error("%s: NOT serving new jobs until an image passes", self.readiness.why(
            Hold.SELFTEST))


def _end_hold(pool: Pool, slot_id: str) -> None:
    """The job on ``slot_id`` is no longer held back by its container's imports (if it was)."""
    if slot_id in pool.held_back:
        pool.held_back.discard(slot_id)
        pool.demand.stall_ended(time.monotonic())


def _held(pool: Pool) -> int:
    """Containers that fill ``pool``: warm, starting (or a failed start backing off), being
    checked, or deferred."""
    return (len(pool.warm) + pool.starting + pool.backing_off + pool.checking
            + len(pool.deferred))


def _mib(profile: str) -> int:
    return WARM_MEMORY_MIB.get(profile, max(WARM_MEMORY_MIB.values()))

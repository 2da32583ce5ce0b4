"""Refills import their libraries in batches (``[pools] import_in_batches``).

A refill's start costs about a CPU-second, most of it its worker's imports (cpu_weight.py).
During a burst of back-to-back jobs the pools start one refill after another, a few hundred
milliseconds apart (``max_starting``, each ``docker start``). Importing all at the same low
weight, they share the CPU evenly and get ready one after another, each a little after the
last: the client, taking them one at a time, waits a little for nearly every one of them.
On this project's 2-core machine, twenty jobs back to back then waited 200-600 ms for most
of their containers (bench S1b).

So a pool's refills import in batches (each pool its own: a light container's few imports do
not wait for a torch container's). The first refill started while none of the pool's imports
begins a batch and is let import (``SandboxBackend.let_import``: a CPU weight above the waiting
containers', far below a job's). Refills started within ``batch_join_seconds`` of it join the
batch; later ones wait at the lowest weight (held), and when the whole batch is ready, all the
held ones are let import together, as the next batch. A batch shares the CPU evenly and gets
ready at about the same time, so that the next jobs find several ready containers at once:
fewer waits, each longer. The CPU is never left idle for it: the kernel's weights only order
who runs first, so a held container imports on a core nothing else wants.

Measured on the 2-core machine (five alternating pairs of twenty back to back after spaced
jobs, 3 sklearn containers warm at the start): the p50 of a request 120-389 ms (median 150)
against 114-282 (median 235), the mean 539-633 ms against 572-821: fewer containers import at
once, so they cost less CPU together.

A hint-driven speed, never a decision: a container's ready mark only moves weights, and a
container that never says it is ready leaves its batch after ``BATCH_MAX_SECONDS``; one a
job took, once its job no longer counts as held back by its imports (a few learned refill
times at most, pools.py ``HELD_BACK_MAX_REFILLS``: its artifact may remove the mark before
the broker saw it). Pure bookkeeping: pools.py asks which slots still import and applies
what this returns.
"""

from __future__ import annotations

from collections.abc import Callable

from airlock_broker.sandboxes.sandbox import Slot

#: A batch member that has not said it is ready after this long no longer holds the next batch.
BATCH_MAX_SECONDS = 30.0


class ImportBatches:
    """The refills importing now (the batch) and those held for the next one."""

    def __init__(self, join_seconds: float) -> None:
        self.join_seconds = join_seconds
        #: slot id -> (slot, when it was let import)
        self.importing: dict[str, tuple[Slot, float]] = {}
        #: slot id -> slot, in the order they were started
        self.held: dict[str, Slot] = {}
        self._began = 0.0

    @property
    def idle(self) -> bool:
        """Nothing imports or waits to: nothing to watch."""
        return not self.importing and not self.held

    def admit(self, slot: Slot, now: float) -> list[Slot]:
        """A refill has just been started (at the lowest weight). Returns the slots to let
        import now: it, when it begins or joins the batch; nothing when it is held."""
        if not self.importing or now - self._began <= self.join_seconds:
            if not self.importing:
                self._began = now
            self.importing[slot.slot_id] = (slot, now)
            return [slot]
        self.held[slot.slot_id] = slot
        return []

    def join(self, slot: Slot, now: float) -> list[Slot]:
        """A job took ``slot`` before it was ready: it imports with the batch from now on (a
        held one would keep its job waiting for a whole batch first). Returns the slots to let
        import now."""
        if slot.slot_id in self.importing:
            return []
        self.held.pop(slot.slot_id, None)
        if not self.importing:
            self._began = now
        self.importing[slot.slot_id] = (slot, now)
        return [slot]

    def settle(self, now: float, still_importing: Callable[[Slot], bool]) -> list[Slot]:
        """Drop the batch members that no longer import (ready, taken and ready, gone) and,
        when none is left, make the held ones the next batch. Returns the slots to let
        import now."""
        for slot_id, (slot, since) in list(self.importing.items()):
            if now - since > BATCH_MAX_SECONDS or not still_importing(slot):
                del self.importing[slot_id]
        if self.importing or not self.held:
            return []
        batch = [slot for slot in self.held.values() if still_importing(slot)]
        self.held.clear()
        self._began = now
        self.importing = {slot.slot_id: (slot, now) for slot in batch}
        return batch

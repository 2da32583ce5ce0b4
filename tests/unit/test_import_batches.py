"""Which refills import now and which wait for the next batch (sandboxes/import_batches.py):
the bookkeeping alone; tests/unit/test_pool_readiness.py has the pools applying it."""

from __future__ import annotations

from pathlib import Path

from airlock_broker.sandboxes.import_batches import BATCH_MAX_SECONDS, ImportBatches
from airlock_broker.sandboxes.sandbox import Slot
from airlock_broker.sandboxes.workspace import JobWorkspace


def _slots(tmp_path: Path, n: int) -> list[Slot]:
    ws = JobWorkspace(root=tmp_path, uid=0, gid=0)
    return [Slot(slot_id=f"s{i}", profile="sklearn", workspace=ws, container_id=f"c{i}")
            for i in range(n)]


def test_refills_started_within_the_join_window_import_together_later_ones_wait(
        tmp_path: Path) -> None:
    a, b, c, d = _slots(tmp_path, 4)
    batches = ImportBatches(join_seconds=0.5)
    assert batches.admit(a, now=10.0) == [a]
    assert batches.admit(b, now=10.4) == [b]  # within the window: joins
    assert batches.admit(c, now=10.6) == []   # after it: held
    assert batches.admit(d, now=11.0) == []
    importing = {"s0", "s1", "s2", "s3"}
    assert batches.settle(11.1, lambda s: s.slot_id in importing) == []
    importing.discard("s0")
    assert batches.settle(11.2, lambda s: s.slot_id in importing) == []  # b still imports
    importing.discard("s1")
    assert batches.settle(11.3, lambda s: s.slot_id in importing) == [c, d]  # the next batch
    assert not batches.held and set(batches.importing) == {"s2", "s3"}
    e = _slots(tmp_path, 5)[4]
    assert batches.admit(e, now=11.7) == [e]  # within the new batch's window
    importing.clear()
    assert batches.settle(12.0, lambda s: False) == []
    assert batches.idle


def test_held_refills_gone_or_ready_meanwhile_are_not_raised(tmp_path: Path) -> None:
    a, b, c = _slots(tmp_path, 3)
    batches = ImportBatches(join_seconds=0.0)
    batches.admit(a, now=1.0)
    batches.admit(b, now=2.0)
    batches.admit(c, now=2.0)
    assert batches.settle(3.0, lambda s: s is c) == [c]  # a ready, b gone
    assert batches.settle(4.0, lambda s: False) == [] and batches.idle


def test_a_member_that_never_says_it_is_ready_stops_holding_the_next_batch(
        tmp_path: Path) -> None:
    a, b = _slots(tmp_path, 2)
    batches = ImportBatches(join_seconds=0.0)
    batches.admit(a, now=0.0)
    batches.admit(b, now=1.0)
    assert batches.settle(BATCH_MAX_SECONDS - 1, lambda s: True) == []
    assert batches.settle(BATCH_MAX_SECONDS + 1, lambda s: True) == [b]


def test_a_job_that_takes_a_held_refill_moves_it_into_the_batch(tmp_path: Path) -> None:
    a, b, c = _slots(tmp_path, 3)
    batches = ImportBatches(join_seconds=0.0)
    batches.admit(a, now=0.0)
    batches.admit(b, now=1.0)
    batches.admit(c, now=1.0)
    assert batches.join(b, now=2.0) == [b]
    assert batches.join(b, now=2.1) == []  # already importing
    assert batches.join(a, now=2.2) == []
    assert set(batches.importing) == {"s0", "s1"} and set(batches.held) == {"s2"}
    assert batches.settle(3.0, lambda s: s is c) == [c]
    assert batches.join(a, now=4.0) == [a]  # taken after the batch let it go: back in

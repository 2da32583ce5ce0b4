"""Pool status splits warm containers into importing and ready, from the mark each worker
writes once it has warmed up (``contract.READY_NAME``). The mark is the sandbox's word: it
changes counts, CPU weights and which of a pool's identical containers a job gets first,
never whether a job gets one, and it never reaches an output."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from airlock_broker.sandboxes.pools import Pools, PoolSettings
from airlock_broker.sandboxes.sandbox import Slot
from airlock_broker.sandboxes.workspace import JobWorkspace
from airlock_sandbox.contract import READY_NAME
from airlock_worker import output
from tests.unit.fakes import FakeSandbox
from tests.unit.test_pools import _until, run_pools


def _mark(slot: Slot) -> None:
    """Play the worker: warmed up, waiting for its job."""
    output.mark_ready(str(slot.workspace.out_dir))


def _counts(pools: Pools, profile: str) -> tuple[int, int, int]:
    status = next(s for s in pools.status() if s.profile == profile)
    return status.warm, status.importing, status.ready


def test_warm_containers_are_importing_until_their_worker_marks_ready(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        await _until(lambda: len(pools.pools["sklearn"].warm) == 2)
        assert _counts(pools, "sklearn") == (2, 2, 0)
        first, second = (w.slot for w in pools.pools["sklearn"].warm)
        _mark(first)
        assert _counts(pools, "sklearn") == (2, 1, 1)
        _mark(second)
        assert _counts(pools, "sklearn") == (2, 0, 2)
        # Seen once, kept: nothing but the job that takes the slot removes the mark.
        os.unlink(first.workspace.out_dir / READY_NAME)
        assert _counts(pools, "sklearn") == (2, 0, 2)

    run_pools(tmp_path, PoolSettings(min_warm=2, max_starting=2, profiles=("sklearn",)), body)


def test_a_taken_container_leaves_the_counts_and_its_replacement_starts_importing(
        tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        await _until(lambda: len(pools.pools["light"].warm) == 1)
        _mark(pools.pools["light"].warm[0].slot)
        assert _counts(pools, "light") == (1, 0, 1)
        slot = await pools.acquire("light")
        assert _counts(pools, "light")[1:] in {(0, 0), (1, 0)}  # replacement maybe started
        await pools.release(slot)
        await _until(lambda: len(pools.pools["light"].warm) == 1)
        assert _counts(pools, "light") == (1, 1, 0)

    run_pools(tmp_path, PoolSettings(min_warm=1, defer_replacement=False,
                                     profiles=("light",)), body)


def test_a_container_that_never_marks_ready_serves_jobs_as_before(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        await _until(lambda: len(pools.pools["torch"].warm) == 1)
        waiting = pools.pools["torch"].warm[0].slot
        assert _counts(pools, "torch") == (1, 1, 0)
        slot = await pools.acquire("torch")
        assert slot.slot_id == waiting.slot_id and slot.started
        await pools.release(slot)
        status = next(s for s in pools.status() if s.profile == "torch")
        assert status.served_warm == 1 and status.served_cold == 0

    run_pools(tmp_path, PoolSettings(min_warm=1, profiles=("torch",)), body)


def test_a_backend_that_cannot_tell_counts_importing_and_status_still_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: FakeSandbox, slot: Slot) -> bool:
        raise OSError("cannot tell")

    monkeypatch.setattr(FakeSandbox, "warmed_up", broken)

    async def body(pools: Pools, backend: FakeSandbox) -> None:
        await _until(lambda: len(pools.pools["light"].warm) == 1)
        assert _counts(pools, "light") == (1, 1, 0)

    run_pools(tmp_path, PoolSettings(min_warm=1, profiles=("light",)), body)


def _workspace(tmp_path: Path) -> JobWorkspace:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return JobWorkspace(root=tmp_path, uid=os.getuid(), gid=os.getgid())


def test_the_broker_reads_only_that_the_mark_exists_and_removes_it(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    assert not ws.worker_ready()
    output.mark_ready(str(ws.out_dir))
    assert os.listdir(ws.out_dir) == [READY_NAME]  # whole, no partial file left
    assert ws.worker_ready()
    ws.forget_ready()
    assert os.listdir(ws.out_dir) == []
    ws.forget_ready()  # gone already: nothing to do, no error
    # A link in its place is not followed (the sandbox could point it anywhere).
    os.symlink("/nonexistent/elsewhere", ws.out_dir / READY_NAME)
    assert ws.worker_ready()
    ws.forget_ready()
    assert os.listdir(ws.out_dir) == []


def test_the_status_command_shows_ready_and_importing_per_profile(
        capsys: pytest.CaptureFixture[str]) -> None:
    from airlock_client import PoolStatus
    from airlock_client._admin_cli import _print_pools

    _print_pools([PoolStatus(profile="sklearn", warm=3, busy=0, starting=1, failed_starts=0,
                             served_warm=7, served_cold=0, oldest_warm_seconds=12.0,
                             image_id="sha256:abc", runtime="runc", draining=False,
                             importing=1, ready=2)])
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["PROFILE", "WARM", "READY", "IMPORTING"]
    assert row.split()[:4] == ["sklearn", "3", "2", "1"]


def test_a_job_that_takes_a_warmed_up_container_runs_ahead_of_the_refills(
        tmp_path: Path) -> None:
    """The pools give a warm container the default CPU priority (cpu_weight.py) when its job
    can run: at once when they hand it out warmed up; one a job took still importing imports
    at the low one among the refills, so that they get ready together, and is raised once it
    says it is warmed up (its job starts then)."""

    async def body(pools: Pools, backend: FakeSandbox) -> None:
        pool = pools.pools["sklearn"]
        await _until(lambda: len(pool.warm) == 4 and pool.starting == 0)
        a, b, c, d = (w.slot for w in pool.warm)
        _mark(b)
        await asyncio.sleep(0.05)  # the replenisher looked at them meanwhile
        assert backend.hastened == []  # importing or waiting: no job yet
        taken = await pools.acquire("sklearn")  # b: warmed up, its job runs now
        assert taken is b and backend.hastened == [b.slot_id]
        taken = await pools.acquire("sklearn")  # a job takes a, still importing
        assert taken is a
        await asyncio.sleep(0.1)  # the watch asked it several times meanwhile
        assert backend.hastened == [b.slot_id]  # a imports among the refills
        _mark(a)  # a's imports are done: its job starts, at the default weight
        await _until(lambda: a.slot_id in backend.hastened)
        taken = await pools.acquire("sklearn")  # c, still importing, then released unready
        assert taken is c
        await pools.release(c)
        _mark(c)
        await asyncio.sleep(0.1)
        assert backend.hastened == [b.slot_id, a.slot_id]  # released: no longer watched
        assert d.slot_id not in backend.hastened

    run_pools(tmp_path, PoolSettings(min_warm=4, max_warm=4, max_starting=4,
                                     defer_replacement=True, stream_window_seconds=0,
                                     profiles=("sklearn",)), body)


def test_a_job_gets_a_warmed_up_container_before_an_older_one_still_importing(
        tmp_path: Path) -> None:
    """Refills do not always get ready in the order they were started (a batch imports
    together, import_batches.py): a job that took the oldest would wait for its imports
    while another container waits for a job."""

    async def body(pools: Pools, backend: FakeSandbox) -> None:
        pool = pools.pools["sklearn"]
        await _until(lambda: len(pool.warm) == 3 and pool.starting == 0)
        older, newer, newest = (w.slot for w in pool.warm)
        _mark(newest)
        assert await pools.acquire("sklearn") is newest
        assert await pools.acquire("sklearn") is older  # none ready: the oldest
        _mark(newer)
        assert await pools.acquire("sklearn") is newer

    run_pools(tmp_path, PoolSettings(min_warm=3, max_warm=3, max_starting=3,
                                     stream_window_seconds=0, import_in_batches=False,
                                     profiles=("sklearn",)), body)


def test_refills_import_in_batches(tmp_path: Path) -> None:
    """The first refill imports at once; those started after the batch's join window wait at
    the lowest weight until the whole batch says it is warmed up, then import together. A
    job that takes a held one has it import with the batch under way."""

    async def body(pools: Pools, backend: FakeSandbox) -> None:
        pool = pools.pools["sklearn"]
        await _until(lambda: len(pool.warm) == 4 and pool.starting == 0)
        a, b, c, d = (w.slot for w in pool.warm)
        assert backend.let_import_ids == [a.slot_id]  # b, c, d came after the window
        await asyncio.sleep(0.1)  # the follower looked several times meanwhile
        assert backend.let_import_ids == [a.slot_id]
        _mark(a)
        await _until(lambda: len(backend.let_import_ids) == 4)
        assert backend.let_import_ids[1:] == [b.slot_id, c.slot_id, d.slot_id]

    run_pools(tmp_path, PoolSettings(min_warm=4, max_warm=4, max_starting=1,
                                     stream_window_seconds=0, batch_join_seconds=0,
                                     defer_replacement=False, profiles=("sklearn",)), body)


def test_a_job_that_takes_a_held_refill_has_it_import_with_the_batch(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        pool = pools.pools["sklearn"]
        await _until(lambda: len(pool.warm) == 3 and pool.starting == 0)
        a, b, c = (w.slot for w in pool.warm)
        assert backend.let_import_ids == [a.slot_id]
        pool.warm.rotate(-1)  # so that the job's pick, the oldest, is a held one: b
        assert await pools.acquire("sklearn") is b
        assert backend.let_import_ids == [a.slot_id, b.slot_id]  # c still held
        _mark(a)
        _mark(b)
        await _until(lambda: c.slot_id in backend.let_import_ids)  # with b's replacement
        assert backend.let_import_ids[:3] == [a.slot_id, b.slot_id, c.slot_id]

    run_pools(tmp_path, PoolSettings(min_warm=3, max_warm=3, max_starting=1,
                                     stream_window_seconds=0, batch_join_seconds=0,
                                     defer_replacement=False, profiles=("sklearn",)), body)


def test_without_batches_no_refill_is_raised_before_its_job(tmp_path: Path) -> None:
    async def body(pools: Pools, backend: FakeSandbox) -> None:
        pool = pools.pools["sklearn"]
        await _until(lambda: len(pool.warm) == 2 and pool.starting == 0)
        await pools.acquire("sklearn")  # importing: waits among the refills, at their weight
        await asyncio.sleep(0.1)
        assert backend.let_import_ids == []

    run_pools(tmp_path, PoolSettings(min_warm=2, max_warm=2, max_starting=1,
                                     stream_window_seconds=0, import_in_batches=False,
                                     profiles=("sklearn",)), body)

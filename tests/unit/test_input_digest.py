"""The input's sha256 computed while its job runs (input_digest.py): the value, the declared
check, stopping it, and idempotency keys compared while either attempt's hash still runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from airlock_broker.config import BrokerConfig
from airlock_broker.conversion import input_digest
from airlock_broker.conversion.idempotency import IdempotencySettings, IdempotencyStore
from airlock_broker.conversion.input_digest import InputDigest
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.sandboxes.workspace import results_dir
from airlock_client import Client, ConversionError
from airlock_sandbox.contract import WorkerExit
from tests.unit.fakes import FakeSandbox, running_broker
from tests.unit.test_broker import PICKLE


def _spool(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "spool"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _hashed_whole(fd: int, size: int, declared: str = "") -> InputDigest:
    """A digest of a spool file already written: one block, then the end."""
    digest, feed = InputDigest.following(fd, declared)
    feed.wrote(0, size)
    feed.finished(size)
    return digest


def test_the_hash_follows_the_blocks_reported_holes_included(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks read back from the file (many steps each, a partial last one), a hole hashed
    as zeros without reading it, and the descriptor closed at the end."""
    monkeypatch.setattr(input_digest, "STEP_BYTES", 4096)
    head, tail = os.urandom(4096 * 7 + 33), os.urandom(5000)
    hole = 3 * 4096 + 7
    path = tmp_path / "spool"
    with open(path, "wb") as fh:  # the hole stays one: the file is written around it
        fh.write(head)
        fh.seek(len(head) + hole)
        fh.write(tail)
    fd = os.open(path, os.O_RDONLY)
    whole = head + bytes(hole) + tail
    seen: list[str] = []

    async def main() -> str:
        digest, feed = InputDigest.following(fd)
        digest.when_known(seen.append)
        feed.wrote(0, len(head))
        assert digest.hex_or_pending == "(hashing)"  # not before the end is reported
        feed.wrote(len(head), hole, hole=True)
        feed.wrote(len(head) + hole, len(tail))
        feed.finished(len(whole))
        value = await digest.value()
        assert digest.hex_or_pending == value
        return value

    value = asyncio.run(main())
    assert value == hashlib.sha256(whole).hexdigest() and seen == [value]
    assert _closed(fd)


def test_a_report_that_does_not_add_up_is_an_internal_error(tmp_path: Path) -> None:
    data = os.urandom(10_000)

    async def main() -> list[Reason]:
        reasons = []
        for blocks, size in (([(0, 5000), (6000, 4000)], 10_000),  # a gap
                             ([(0, 5000)], 10_000),  # an end past what was reported
                             ([(0, 20_000)], 20_000)):  # past the file's end
            digest, feed = InputDigest.following(_spool(tmp_path, data))
            for offset, length in blocks:
                feed.wrote(offset, length)
            feed.finished(size)
            with pytest.raises(AirlockError) as failed:
                await digest.value()
            reasons.append(failed.value.reason)
        return reasons

    assert asyncio.run(main()) == [Reason.INTERNAL] * 3


def test_a_declared_digest_that_differs_is_checksum_mismatch(tmp_path: Path) -> None:
    data = b"\x80\x04N." * 1000
    right = hashlib.sha256(data).hexdigest()

    async def main() -> None:
        assert await _hashed_whole(_spool(tmp_path, data), len(data), right).value() == right
        seen: list[str] = []
        wrong = _hashed_whole(_spool(tmp_path, data), len(data), "0" * 64)
        wrong.when_known(seen.append)
        with pytest.raises(AirlockError) as refused:
            await wrong.value()
        assert refused.value.reason is Reason.CHECKSUM_MISMATCH
        assert await wrong.settled() is None and seen == []  # never "known"
        with pytest.raises(AirlockError) as at_once:
            InputDigest.known(right, "0" * 64)
        assert at_once.value.reason is Reason.CHECKSUM_MISMATCH

    asyncio.run(main())


def test_close_stops_the_hash_and_closes_its_descriptor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closed while it waits for the copy's next block, or while it reads one (held in its
    first read until the call has given the hash up): CANCELLED either way, its descriptor
    closed."""
    monkeypatch.setattr(input_digest, "STEP_BYTES", 4096)
    data = os.urandom(4096 * 4)
    reading, resume = _held_hash(monkeypatch)

    async def main() -> None:
        waiting, _feed = InputDigest.following(first := _spool(tmp_path, data))
        waiting.close()
        assert await waiting.settled() is None
        assert _closed(first)
        digest = _hashed_whole(second := _spool(tmp_path, data), len(data))
        assert await asyncio.to_thread(reading.wait, 60)
        digest.close()
        resume.set()
        assert await digest.settled() is None
        with pytest.raises(AirlockError) as stopped:
            await digest.value()
        assert stopped.value.reason is Reason.CANCELLED
        assert _closed(second)

    asyncio.run(main())


def test_a_cancelled_waiter_does_not_cancel_the_hash_others_wait_for() -> None:
    async def main() -> None:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        digest = InputDigest(future)
        waiter = asyncio.ensure_future(digest.value())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.wait({waiter})
        future.set_result("a" * 64)
        assert await digest.value() == "a" * 64

    asyncio.run(main())


def _pending() -> tuple[InputDigest, asyncio.Future[str]]:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    return InputDigest(future), future


def test_a_retry_is_compared_once_both_hashes_are_known(tmp_path: Path) -> None:
    """The first attempt converts while its input is still being hashed; a retry with the
    same key and another artifact is refused once the hashes are known, one with the same
    artifact waits for the first and replays it."""
    async def main() -> None:
        store = IdempotencyStore(tmp_path, IdempotencySettings())
        first, first_hash = _pending()
        async with store.claim("", "k", first, "opts", "job-1") as claim:
            other, other_hash = _pending()
            refused = asyncio.ensure_future(_claim(store, other, "job-2"))
            same, same_hash = _pending()
            replayed = asyncio.ensure_future(_claim(store, same, "job-3"))
            await asyncio.sleep(0.05)
            assert not refused.done() and not replayed.done()  # nothing known to compare yet
            first_hash.set_result("a" * 64)
            other_hash.set_result("b" * 64)
            same_hash.set_result("a" * 64)
            with pytest.raises(AirlockError) as reused:
                await refused
            assert reused.value.reason is Reason.IDEMPOTENCY_KEY_REUSED
            assert "different artifact" in reused.value.message
            path = results_dir(tmp_path) / "job-1"
            path.write_bytes(b"x")
            assert claim.store(b"h", path, 1)
        assert await replayed == "job-1"
        await store.close()

    asyncio.run(main())


def test_a_retry_of_an_attempt_that_gave_its_hash_up_converts_again(tmp_path: Path) -> None:
    """The first attempt's hash fails (its call is going away): a retry waits for that
    attempt to end, unstored, then converts."""
    async def main() -> None:
        store = IdempotencyStore(tmp_path, IdempotencySettings())
        first, first_hash = _pending()
        waiting: asyncio.Future[str] | None = None
        with pytest.raises(asyncio.CancelledError):
            async with store.claim("", "k", first, "opts", "job-1"):
                waiting = asyncio.ensure_future(
                    _claim(store, InputDigest.known("a" * 64), "job-2"))
                first_hash.set_exception(error(Reason.CANCELLED, "given up"))
                while store.waiting == 0:  # the retry saw no hash, and waits for the attempt
                    assert not waiting.done()
                    await asyncio.sleep(0.01)
                raise asyncio.CancelledError  # the first call went away
        assert waiting is not None
        assert await waiting == ""  # not replayed: it converts
        await store.close()

    asyncio.run(main())


async def _claim(store: IdempotencyStore, digest: InputDigest, job_id: str) -> str:
    """The job id replayed for key "k", or "" when this request converts."""
    async with store.claim("", "k", digest, "opts", job_id) as claim:
        return "" if claim.stored is None else claim.stored.job_id


def test_a_refused_fast_path_input_is_named_in_its_audit_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job fails while its input is still being hashed (held in its first read): the
    answer waits for the hash, so the audit record of a refused artifact carries its sha256
    (an operator looks refused artifacts up by it)."""
    reading, resume = _held_hash(monkeypatch)
    settling = _settling(monkeypatch)
    settings, backend = _fast_broker(tmp_path)
    spool = settings.state_root
    src = tmp_path / "model.pkl"
    src.write_bytes(PICKLE)
    with (running_broker(settings, backend) as running,
          Client(f"127.0.0.1:{running.port}", retry_attempts=1) as client,
          concurrent.futures.ThreadPoolExecutor(1) as calls):
        failed = calls.submit(client.convert, src, tmp_path / "out.onnx")
        assert reading.wait(60)
        assert settling.wait(60)  # the job failed and its answer waits for the held hash
        assert backend.specs
        resume.set()
        with pytest.raises(ConversionError) as refused:
            failed.result(timeout=60)
        assert client.last_transfer == "local"
    record = json.loads((spool / "audit.jsonl").read_text().splitlines()[-1])
    assert record["job_id"] == refused.value.job_id and record["outcome"] == "failed"
    assert record["input_sha256"] == hashlib.sha256(PICKLE).hexdigest()


def _settling(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set when a call starts waiting for its input's hash to settle (the pipeline's
    ``finally``)."""
    started = threading.Event()
    settled = InputDigest.settled

    async def noted(self: InputDigest) -> str | None:
        started.set()
        return await settled(self)

    monkeypatch.setattr(InputDigest, "settled", noted)
    return started


def _held_hash(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """(reading, resume): the input's hash thread is held in its first read until resumed."""
    reading, resume = threading.Event(), threading.Event()
    preadv: Callable[[int, list[memoryview], int], int] = os.preadv

    def held(fd: int, buffers: list[memoryview], offset: int) -> int:
        if threading.current_thread().name == "airlock-input-hash":
            reading.set()
            assert resume.wait(60)
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", held)
    return reading, resume


def _fast_broker(tmp_path: Path) -> tuple[BrokerConfig, FakeSandbox]:
    """A broker whose (fake) sandbox refuses every job; the fast path on."""
    spool = tmp_path / "spool"
    settings = BrokerConfig(listen="127.0.0.1:0", state_root=spool, selftest_on_start=False,
                            provenance_key=tmp_path / "provenance-key.pem",
                            pools=PoolSettings(min_warm=0))
    return settings, FakeSandbox(spool, lambda spec, data, out: int(WorkerExit.CONVERSION_FAILED))


def test_a_call_cancelled_while_its_answer_waits_for_the_hash_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The artifact is refused before any sandbox (no format it could be), its answer waits
    for the input's hash (held), and the caller's deadline passes meanwhile: its upload is
    removed and its spool room released all the same (they came after the wait, which the
    cancellation cut short: seen with the upload still there)."""
    reading, resume = _held_hash(monkeypatch)
    settling = _settling(monkeypatch)
    settings, backend = _fast_broker(tmp_path)
    src = tmp_path / "noise.bin"
    src.write_bytes(os.urandom(64 << 10))
    try:
        with running_broker(settings, backend) as running, \
                Client(f"127.0.0.1:{running.port}", retry_attempts=1, timeout=5) as client:
            with pytest.raises(ConversionError) as late:
                client.convert(src, tmp_path / "out.onnx")
            assert late.value.code == "DEADLINE_EXCEEDED" and client.last_transfer == "local"
            assert reading.is_set() and settling.is_set() and backend.specs == []
            spool = settings.state_root
            deadline = time.monotonic() + 60
            while _uploads(spool) and time.monotonic() < deadline:
                time.sleep(0.05)  # the handler's cancellation is the broker's to see
            assert _uploads(spool) == [], "the upload outlived its call"
    finally:
        resume.set()


def _uploads(spool: Path) -> list[Path]:
    return [p for p in spool.rglob("uploads/*") if p.is_file()]


def test_a_declared_sha256_that_differs_is_refused_before_any_sandbox_on_the_fast_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airlock_client import _wire

    metadata = _wire.metadata

    def declaring(**fields: object) -> object:
        return metadata(**{**fields, "sha256": "0" * 64})  # type: ignore[arg-type]

    monkeypatch.setattr(_wire, "metadata", declaring)
    settings, backend = _fast_broker(tmp_path)
    src = tmp_path / "model.pkl"
    src.write_bytes(PICKLE)
    with running_broker(settings, backend) as running, \
            Client(f"127.0.0.1:{running.port}", retry_attempts=1) as client:
        with pytest.raises(ConversionError) as refused:
            client.convert(src, tmp_path / "out.onnx")
        assert client.last_transfer == "local"
    assert refused.value.reason == "CHECKSUM_MISMATCH"
    assert backend.specs == []  # no sandbox ran

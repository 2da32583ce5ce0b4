"""Idempotency keys: a retried Convert never converts twice; a reused key is caught.

Conversions are counted at the seam: every job the broker hands to the fake sandbox is one
entry in ``backend.specs``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.api.server import Broker
from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.idempotency import IdempotencySettings, IdempotencyStore
from airlock_broker.conversion.input_digest import InputDigest
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.sandboxes.sandbox import Outcome, SandboxUnavailable, Slot
from airlock_broker.sandboxes.workspace import results_dir
from airlock_client import Client, ConversionError, ServiceUnavailable
from airlock_client._wire import error_from_rpc
from airlock_sandbox.contract import JobSpec, WorkerExit
from tests.unit.fakes import Behaviour, FakeSandbox, running_broker
from tests.unit.test_broker import PICKLE, write_safetensors


@dataclass
class GatedSandbox(FakeSandbox):
    """Jobs hold in ``run`` until ``gate`` opens; the first ``fail_runs`` runs lose the engine."""

    gate: threading.Event | None = None
    fail_runs: int = 0

    async def run(self, slot: Slot, spec: JobSpec, deadline_seconds: float) -> Outcome:
        while self.gate is not None and not self.gate.is_set():
            await asyncio.sleep(0.01)
        if self.fail_runs > 0:
            self.fail_runs -= 1
            raise SandboxUnavailable("fake engine stopped mid-job")
        return await super().run(slot, spec, deadline_seconds)


@dataclass
class Running:
    address: str
    backend: GatedSandbox
    broker: Broker
    spool: Path

    @property
    def conversions(self) -> int:
        return len(self.backend.specs)

    def audit(self) -> list[dict[str, object]]:
        path = self.spool / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[object]:
    stack = []

    def _start(behaviour: Behaviour = write_safetensors, **overrides: object) -> Running:
        overrides.setdefault("pools", PoolSettings(min_warm=0))
        overrides.setdefault("selftest_on_start", False)
        # Integrity's second sandbox is not this file's subject (test_format_decision).
        overrides.setdefault("verify_integrity", False)
        config = BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / f"spool{len(stack)}",
                              **overrides)  # type: ignore[arg-type]
        backend = GatedSandbox(config.spool_root, behaviour)
        cm = running_broker(config, backend)
        broker = cm.__enter__()
        stack.append(cm)
        return Running(f"127.0.0.1:{broker.port}", backend, broker, config.spool_root)

    yield _start
    for cm in stack:
        cm.__exit__(None, None, None)


def _requests(data: bytes, key: str, target: int) -> list[pb.ConvertRequest]:
    meta = pb.ConvertMetadata(size_bytes=len(data), idempotency_key=key, target=target)
    return [pb.ConvertRequest(metadata=meta),
            pb.ConvertRequest(chunk=pb.Chunk(data=data, crc32=zlib.crc32(data)))]


def convert(address: str, data: bytes, key: str,
            target: int = pb.TARGET_FORMAT_AUTO) -> tuple[pb.ConvertResult, bytes]:
    """One raw Convert call with an explicit key: (result header, output bytes)."""
    with grpc.insecure_channel(address) as channel:
        stream = pb_grpc.ConversionServiceStub(channel).Convert(
            iter(_requests(data, key, target)), timeout=30)
        messages = list(stream)
    return messages[0].result, b"".join(m.chunk.data for m in messages[1:])


def refusal(address: str, data: bytes, key: str, target: int = pb.TARGET_FORMAT_AUTO
            ) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        convert(address, data, key, target)
    err = error_from_rpc(info.value)
    assert isinstance(err, (ConversionError, ServiceUnavailable))
    return info.value.code(), err.reason, err.message  # type: ignore[attr-defined]


def wait_for(cond, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_a_retry_after_completion_replays_the_result_without_converting(start) -> None:
    run = start()
    first, out1 = convert(run.address, PICKLE, "key-1")
    second, out2 = convert(run.address, PICKLE, "key-1")
    assert run.conversions == 1
    assert not first.replayed and second.replayed
    assert second.job_id == first.job_id and out2 == out1
    assert hashlib.sha256(out2).hexdigest() == second.output_sha256
    # a new key is a new call: it converts
    third, _ = convert(run.address, PICKLE, "key-2")
    assert run.conversions == 2 and not third.replayed and third.job_id != first.job_id
    replays = [d for d in run.audit() if d.get("replay_of")]
    assert [d["replay_of"] for d in replays] == [first.job_id]


def test_a_retry_while_the_first_attempt_runs_attaches_to_it(start) -> None:
    run = start()
    run.backend.gate = threading.Event()
    results: list[tuple[pb.ConvertResult, bytes]] = []
    threads = [threading.Thread(target=lambda: results.append(
        convert(run.address, PICKLE, "same"))) for _ in range(2)]
    threads[0].start()
    wait_for(lambda: run.broker.admission.admitted == 1 and run.backend.prepared == 1)
    threads[1].start()
    wait_for(lambda: run.broker.idempotency.waiting == 1)  # the retry waits for the first
    run.backend.gate.set()
    for t in threads:
        t.join(30)
    assert run.conversions == 1 and run.backend.prepared == 1
    assert sorted(r.replayed for r, _ in results) == [False, True]
    assert results[0][1] == results[1][1] and results[0][0].job_id == results[1][0].job_id


def test_a_retry_after_the_client_left_mid_answer_replays_the_stored_result(start) -> None:
    # The client reads the header and leaves. The result was stored before the header went out
    # (the answer's own file, answers.py), so its retry finds it and does not convert again.
    run = start()
    with grpc.insecure_channel(run.address) as channel:
        call = pb_grpc.ConversionServiceStub(channel).Convert(
            iter(_requests(PICKLE, "left", pb.TARGET_FORMAT_AUTO)), timeout=30)
        header = next(call).result
        call.cancel()
    again, output = convert(run.address, PICKLE, "left")
    assert again.replayed and again.job_id == header.job_id and run.conversions == 1
    assert hashlib.sha256(output).hexdigest() == header.output_sha256


def test_the_same_key_for_another_artifact_or_other_options_is_refused(start) -> None:
    run = start()
    convert(run.address, PICKLE, "k")
    code, reason, message = refusal(run.address, PICKLE + b"\x00", "k")
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_REUSED")
    assert "different artifact" in message
    code, reason, message = refusal(run.address, PICKLE, "k", pb.TARGET_FORMAT_SAFETENSORS)
    assert reason == "IDEMPOTENCY_KEY_REUSED" and "different options" in message
    assert run.conversions == 1


def test_an_unauthenticated_caller_learns_nothing_of_the_call_that_used_a_key(
        start) -> None:
    """Found by review: unauthenticated callers share one key space, and the refusal named
    the other call's job id and said whether a guessed artifact was the one it sent (the
    message differed for another artifact and for the same one with other options)."""
    run = start()
    first, _ = convert(run.address, PICKLE, "k")
    messages = {refusal(run.address, data, "k", target)[2]
                for data, target in ((PICKLE + b"\x00", pb.TARGET_FORMAT_AUTO),
                                     (PICKLE, pb.TARGET_FORMAT_SAFETENSORS))}
    assert len(messages) == 1, messages  # no oracle: one answer for both
    (message,) = messages
    assert first.job_id not in message and "same artifact" not in message


def test_a_refusal_is_replayed_but_an_outage_is_forgotten(start) -> None:
    def refuse(spec: JobSpec, data: bytes, out: Path) -> int:
        return WorkerExit.POLICY_VIOLATION

    run = start(refuse)
    first = refusal(run.address, PICKLE, "refused")
    again = refusal(run.address, PICKLE, "refused")
    assert first[1] == again[1] == "POLICY_VIOLATION"
    assert "replayed" in again[2] and run.conversions == 1

    run.backend.behaviour = write_safetensors
    run.backend.fail_runs = 1  # the engine goes away mid-job: worth a retry, not an answer
    code, reason, _ = refusal(run.address, PICKLE, "outage")
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "SANDBOX_UNAVAILABLE")
    result, _ = convert(run.address, PICKLE, "outage")
    assert not result.replayed and run.conversions == 2


def test_a_sandbox_timeout_is_forgotten_so_a_retry_with_more_time_converts(start) -> None:
    """The key's options do not hold the caller's deadline, and a timeout is partly the
    machine's load: the stored SANDBOX_TIMEOUT answered a retry that asked for more time
    with the old refusal, for the store's whole TTL, without converting."""
    runs: list[int] = []

    def slow_once(spec: JobSpec, data: bytes, out: Path) -> int | None:
        runs.append(1)
        return None if len(runs) == 1 else write_safetensors(spec, data, out)

    run = start(slow_once)

    def call(timeout_seconds: int) -> list[pb.ConvertResponse]:
        meta = pb.ConvertMetadata(size_bytes=len(PICKLE), idempotency_key="slow",
                                  timeout_seconds=timeout_seconds)
        requests = [pb.ConvertRequest(metadata=meta),
                    pb.ConvertRequest(chunk=pb.Chunk(data=PICKLE, crc32=zlib.crc32(PICKLE)))]
        with grpc.insecure_channel(run.address) as channel:
            return list(pb_grpc.ConversionServiceStub(channel).Convert(iter(requests),
                                                                     timeout=60))

    with pytest.raises(grpc.RpcError) as first:
        call(1)
    assert error_from_rpc(first.value).reason == "SANDBOX_TIMEOUT"
    result = call(30)[0].result
    assert not result.replayed and run.conversions == 2


def test_the_client_sends_one_key_on_every_retry(start, tmp_path: Path) -> None:
    run = start()
    run.backend.fail_runs = 2
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    with Client(run.address, retry_attempts=4) as client:
        result = client.convert(src, tmp_path / "out.safetensors")
    assert result.format == "safetensors" and not result.replayed
    keys = [d["idempotency_key"] for d in run.audit()]
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0]
    # A second logical call from the same client is a new key.
    client2 = Client(run.address)
    with client2:
        client2.convert(src, tmp_path / "out2.safetensors")
    assert len({d["idempotency_key"] for d in run.audit()}) == 2


def test_no_key_or_ttl_zero_means_no_deduplication(start) -> None:
    run = start(idempotency=IdempotencySettings(ttl_seconds=0))
    convert(run.address, PICKLE, "k")
    second, _ = convert(run.address, PICKLE, "k")
    assert run.conversions == 2 and not second.replayed
    # Nothing is kept: each answer's file goes when its stream ends, which the broker notes
    # after the caller has read the last byte — so wait for it rather than race it.
    results = run.spool / "results"
    wait_for(lambda: not results.exists() or list(results.iterdir()) == [], timeout=60)


# -- the store's bounds, directly ----------------------------------------------------------


def _stored(store: IdempotencyStore) -> list[str]:
    return sorted(p.name for p in (store.spool_root / "results").iterdir())


async def _complete(store: IdempotencyStore, key: str, payload: bytes,
                    principal: str = "") -> None:
    """What the pipeline does: the answer's file, in the store's directory, then stored."""
    async with store.claim(principal, key, InputDigest.known("sha-" + key), "opts",
                           f"job-{key}") as claim:
        path = results_dir(store.spool_root) / f"job-{key}"
        path.touch(mode=0o600)  # as answers.py makes it: the broker's alone
        path.write_bytes(payload)
        if not claim.store(b"header", path, len(payload)):
            path.unlink()  # the caller's file unless the store took it


def test_store_bounds_entries_bytes_and_age(tmp_path: Path) -> None:
    now = [0.0]  # the store's clock: its entries expire when the test says, not a busy machine

    async def scenario() -> None:
        store = IdempotencyStore(tmp_path, IdempotencySettings(ttl_seconds=0.3, max_entries=2,
                                                               max_bytes=10),
                                 clock=lambda: now[0])
        await _complete(store, "a", b"1234")
        await _complete(store, "b", b"1234")
        assert _stored(store) == ["job-a", "job-b"]
        await _complete(store, "c", b"1234")  # over both bounds: the oldest goes
        assert store.stored_bytes == 8 and len(store) == 2
        await store.settle()  # its file, on a worker thread
        assert _stored(store) == ["job-b", "job-c"]
        # Larger than the store: not stored at all (its claim still made room for an entry).
        await _complete(store, "big", b"x" * 11)
        await store.settle()
        assert _stored(store) == ["job-c"] and len(store) == 1
        assert store.purge() == 0
        now[0] += 0.35
        assert store.purge() == 1 and store.stored_bytes == 0
        await store.settle()
        assert _stored(store) == []
        await _complete(store, "d", b"1234")
        await store.close()
        assert _stored(store) == [] and len(store) == 0

    asyncio.run(scenario())


def test_one_principal_cannot_push_out_every_other_principals_answers(tmp_path: Path) -> None:
    """The bounds are shared: evicting the oldest of all let one caller's stream of results
    push out everyone else's, whose retries then converted again."""
    async def scenario(settings: IdempotencySettings,
                       answers: list[tuple[str, str, bytes]]) -> list[str]:
        root = tmp_path / str(len(answers))
        root.mkdir()
        store = IdempotencyStore(root, settings)
        for principal, key, payload in answers:
            await _complete(store, key, payload, principal)
        await store.settle()
        stored = _stored(store)
        await store.close()
        return stored

    by_count = [("alice", "alice-1", b"1234")] + \
        [("mallory", f"mallory-{n}", b"1234") for n in range(5)]
    assert asyncio.run(scenario(IdempotencySettings(max_entries=3), by_count)) == \
        ["job-alice-1", "job-mallory-3", "job-mallory-4"]
    by_bytes = [("alice", "alice-1", b"1234"), ("bob", "big-1", b"x" * 40),
                ("bob", "big-2", b"x" * 40)]
    assert asyncio.run(scenario(IdempotencySettings(max_bytes=50), by_bytes)) == \
        ["job-alice-1", "job-big-2"]


def test_an_evicted_answer_is_unlinked_off_the_event_loop(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Unlinking an answer of GiB takes the kernel most of a second (its blocks are freed
    first): never on the loop that serves every other call."""
    from airlock_broker.sandboxes import workspace
    from tests.unit.fakes import threads_calling

    unlinked_on = threads_calling(monkeypatch, workspace, "remove_quietly")

    async def scenario() -> None:
        store = IdempotencyStore(tmp_path, IdempotencySettings(max_entries=1))
        await _complete(store, "a", b"1234")
        await _complete(store, "b", b"1234")  # evicts a
        await store.settle()
        assert _stored(store) == ["job-b"]
        await store.close()

    asyncio.run(scenario())
    assert unlinked_on and threading.main_thread() not in unlinked_on, unlinked_on


def test_without_a_key_the_store_takes_no_file(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = IdempotencyStore(tmp_path, IdempotencySettings())
        async with store.claim("", "", InputDigest.known("sha"), "opts", "job-nokey") as claim:
            assert not claim.stores
            assert not claim.store(b"h", tmp_path / "whatever", 1)
        assert len(store) == 0
        await store.close()

    asyncio.run(scenario())


def test_a_replay_survives_eviction_of_its_file(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = IdempotencyStore(tmp_path, IdempotencySettings(ttl_seconds=60))
        await _complete(store, "a", b"payload")
        async with store.claim("", "a", InputDigest.known("sha-a"), "opts", "job-x") as claim:
            assert claim.stored is not None
            fd = store.open_stored(claim.stored)
        await store.close()  # the file is gone from the directory ...
        try:
            assert _stored(store) == []
            assert os.read(fd, 100) == b"payload"  # ... but the reader still has it
        finally:
            os.close(fd)

    asyncio.run(scenario())


def test_keys_are_scoped_to_the_principal(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = IdempotencyStore(tmp_path, IdempotencySettings())
        async with store.claim("alice", "k", InputDigest.known("sha"), "opts", "job-1") as claim:
            path = results_dir(tmp_path) / "job-1"
            path.write_bytes(b"x")
            assert claim.store(b"h", path, 1)
        other = InputDigest.known("other-sha")
        async with store.claim("bob", "k", other, "opts", "job-2") as claim:
            assert claim.stored is None and claim.stores  # bob's "k" is not alice's
        await store.close()

    asyncio.run(scenario())


# -- the client's retry policy ---------------------------------------------------------------


def test_the_client_does_not_retry_a_refusal_and_retries_busy(start, tmp_path: Path) -> None:
    def refuse(spec: JobSpec, data: bytes, out: Path) -> int:
        return WorkerExit.POLICY_VIOLATION

    run = start(refuse)
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    with Client(run.address, retry_attempts=4) as client, pytest.raises(ConversionError) as info:
        client.convert(src, tmp_path / "out")
    assert info.value.reason == "POLICY_VIOLATION"
    # The client is done: a retry would have run the backend again before it raised.
    assert run.conversions == 1
    wait_for(lambda: (run.spool / "audit.jsonl").exists() and run.audit())
    assert len(run.audit()) == 1

    busy = start(max_concurrent_jobs=1, max_queued_jobs=0)
    busy.backend.gate = threading.Event()
    first = threading.Thread(target=lambda: convert(busy.address, PICKLE, "first"))
    first.start()
    wait_for(lambda: busy.broker.admission.admitted == 1)
    # The broker frees up once this call has met BUSY (a timer could fire before it did).
    with Client(busy.address, retry_attempts=6, retry_max_seconds=30) as client:
        result = client.convert(src, tmp_path / "later.safetensors",
                                on_busy=lambda _wait: busy.backend.gate.set())
    first.join(30)
    refused = [d for d in busy.audit() if d.get("reason") == "BUSY"]
    assert result.format == "safetensors" and refused, "the client should have met BUSY first"


def test_the_client_deadline_bounds_the_whole_call(start, tmp_path: Path) -> None:
    run = start()
    run.backend.gate = threading.Event()  # never opens: the job hangs
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    began = time.monotonic()
    with Client(run.address, timeout=1.5, retry_attempts=5) as client, \
            pytest.raises(ConversionError) as info:
        client.convert(src, tmp_path / "out")
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert time.monotonic() - began < 15  # 1.5 s, not five attempts of it
    run.backend.gate.set()


def test_a_result_whose_file_could_not_be_written_is_forgotten(tmp_path: Path) -> None:
    # A delivered answer's copy is written by the store in the background; if that fails
    # (a full disk), a retry must convert again, not be answered from half a file.
    def fails() -> None:
        raise OSError(28, "No space left on device")

    async def scenario() -> None:
        store = IdempotencyStore(tmp_path, IdempotencySettings())
        async with store.claim("", "k", InputDigest.known("sha"), "opts", "job-1") as claim:
            assert claim.store(b"h", results_dir(tmp_path) / "job-1", 10, write=fails)
        async with store.claim("", "k", InputDigest.known("sha"), "opts", "job-2") as retry:
            assert retry.stored is None and retry.stores  # waited for the write, converts
        await store.close()

    asyncio.run(scenario())


def test_an_entry_evicted_while_its_file_is_written_leaves_no_file(tmp_path: Path) -> None:
    gate = threading.Event()
    path = results_dir(tmp_path) / "job-1"

    def slow_write() -> None:
        assert gate.wait(30)
        path.write_bytes(b"0123456789")

    async def scenario() -> None:
        store = IdempotencyStore(tmp_path, IdempotencySettings(max_entries=1))
        async with store.claim("", "a", InputDigest.known("sha"), "opts", "job-1") as claim:
            assert claim.store(b"h", path, 10, write=slow_write)
        await _complete(store, "b", b"1234")  # evicts a while its file is being written
        assert store.stored_bytes == 14  # a's 10 bytes still on their way to the disk
        gate.set()
        await store.settle()
        assert _stored(store) == ["job-b"]
        assert store.stored_bytes == 4
        await store.close()

    asyncio.run(scenario())


def test_a_write_cancelled_at_shutdown_is_forgotten_and_its_room_is_told(tmp_path: Path) -> None:
    gate = threading.Event()

    def slow_write() -> None:
        assert gate.wait(30)

    async def scenario() -> None:
        store = IdempotencyStore(tmp_path, IdempotencySettings())
        async with store.claim("", "k", InputDigest.known("sha"), "opts", "job-1") as claim:
            assert claim.writing is None
            assert claim.store(b"h", results_dir(tmp_path) / "job-1", 10, write=slow_write)
            writing = claim.writing  # what the answer's spool room waits for (pipeline.py)
            assert writing is not None and not writing.done()
        writing.cancel()  # as the loop's teardown would
        await asyncio.wait({writing})  # its callbacks ran before this wakes up
        gate.set()
        async with store.claim("", "k", InputDigest.known("sha"), "opts", "job-2") as retry:
            assert retry.stored is None and retry.stores  # not replayed from no file
        await store.close()

    asyncio.run(scenario())

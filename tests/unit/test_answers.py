"""answers.py on its own: the spool copy of an output, how it is sent, and who closes what
when."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save_file

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.answers import Answer, StreamTransfer, spool_answer
from airlock_broker.conversion.file_copy import write_canonical_from, write_canonical_safetensors
from airlock_broker.conversion.idempotency import IdempotencySettings, IdempotencyStore
from airlock_broker.conversion.input_digest import InputDigest
from airlock_broker.conversion.intake import IntakeLimits
from airlock_broker.conversion.outputs import ValidatedOutput
from airlock_broker.errors import AirlockError
from airlock_broker.fastpath.local_handles import InputFile, LocalFiles, PeerCred
from airlock_broker.fastpath.peer_io import PeerIO
from airlock_broker.fastpath.peer_transfer import PeerTransfer
from airlock_broker.security.exposure import RpcLimits
from airlock_broker.validation.limits import OutputLimits
from airlock_broker.validation.safetensors_canonical import FileIdentity, SafetensorsInfo
from airlock_broker.validation.safetensors_check import validate_safetensors
from airlock_sandbox.contract import OutputFormat

_LIMITS = IntakeLimits(max_artifact_bytes=1 << 20, max_chunk_bytes=1 << 20, idle_seconds=10,
                       upload=BrokerConfig().upload)


def _output(payload: bytes, size: int | None = None) -> ValidatedOutput:
    def write_into(fd: int) -> None:
        os.pwrite(fd, payload, 0)
    return ValidatedOutput(format=OutputFormat.ONNX, size=len(payload) if size is None else size,
                           sha256="", path=Path("/nonexistent"), write_into=write_into)


async def _no_requests() -> AsyncIterator[pb.ConvertRequest]:
    return
    yield


def _stream(chunk_bytes: int) -> StreamTransfer:
    return StreamTransfer(_no_requests(), _LIMITS, chunk_bytes)


def test_the_output_is_spooled_into_a_private_file_read_by_offset(tmp_path: Path) -> None:
    async def scenario() -> None:
        answer = await spool_answer(tmp_path, pb.ConvertResult(job_id="job-1"),
                                    _output(b"0123456789"), _stream(4))
        path = tmp_path / "results" / "job-1"
        assert answer.path == path and (path.stat().st_mode & 0o777) == 0o600
        with answer:
            messages = [m async for m in answer.responses()]
        assert messages[0].result.transfer == "stream"
        assert [m.chunk.data for m in messages[1:]] == [b"0123", b"4567", b"89"]
        gone = asyncio.get_running_loop().time() + 30  # unlinked on a worker thread: polled
        while path.exists():
            assert asyncio.get_running_loop().time() < gone, "the answer's file stayed"
            await asyncio.sleep(0.005)

    asyncio.run(scenario())


def test_a_copy_that_comes_up_short_is_refused_and_removed(tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(AirlockError, match="wrote 3 bytes of a 4-byte output"):
            await spool_answer(tmp_path, pb.ConvertResult(job_id="short"), _output(b"123", 4),
                               _stream(4))
        assert list((tmp_path / "results").iterdir()) == []

    asyncio.run(scenario())


def test_closing_an_answer_under_a_running_copy_leaves_the_thread_its_own_descriptors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fast path copies on a thread of its own. If the call is cancelled meanwhile (a caller
    # gone, the drain deadline), closing the answer's descriptors must not close the thread's:
    # it works on duplicates (peer_io.py), so a number the broker reuses is never written to.
    copying, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def slow_copy(src: int, dst: int, size: int) -> None:
        copying.set()
        release.wait(30)
        seen.append(os.fstat(src).st_size == size and os.fstat(dst) is not None)

    monkeypatch.setattr("airlock_broker.fastpath.peer_transfer.copy_file", slow_copy)
    source = tmp_path / "answer"
    source.write_bytes(b"x" * 100)
    fd = os.open(source, os.O_RDONLY)
    peer_out = os.open(tmp_path / "peer-output", os.O_WRONLY | os.O_CREAT, 0o600)
    limits = BrokerConfig(state_root=tmp_path)

    async def cancelled_midway() -> None:
        io = PeerIO(2, 1.0)
        local = LocalFiles(input_fd=os.open(os.devnull, os.O_RDONLY), output_fd=peer_out,
                           input=InputFile(size=0, allocated=0), peer=PeerCred(0, 0, 0), io=io)
        intake = IntakeLimits(max_artifact_bytes=1 << 20, max_chunk_bytes=1 << 20,
                              idle_seconds=10, upload=limits.upload)
        transfer = PeerTransfer(local, intake)
        answer = Answer(result=pb.ConvertResult(job_id="j"), fd=fd, size=100,
                        transfer=transfer, path=source)
        sending = asyncio.ensure_future(anext(answer.responses()))
        while not copying.is_set():
            await asyncio.sleep(0.01)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        answer.close()
        transfer.close()  # as the pipeline does: the answer first, then the caller's files
        # The answer's name goes (removed on a worker thread: remove_soon) and its
        # descriptor at once...
        deadline = time.monotonic() + 30
        while source.exists():
            assert time.monotonic() < deadline, "the answer's file was never removed"
            await asyncio.sleep(0.01)
        release.set()  # ...and the thread still copied from its own duplicates
        while not seen:
            await asyncio.sleep(0.01)

    asyncio.run(cancelled_midway())
    assert seen == [True]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        still_open = {target.split(" (deleted)")[0] for target in _open_files()}
        if str(source) not in still_open and str(tmp_path / "peer-output") not in still_open:
            break
        time.sleep(0.05)
    assert str(source) not in still_open and str(tmp_path / "peer-output") not in still_open


def _peer(tmp_path: Path, peer_out: int) -> PeerTransfer:
    local = LocalFiles(input_fd=os.open(os.devnull, os.O_RDONLY), output_fd=peer_out,
                       input=InputFile(size=0, allocated=0), peer=PeerCred(0, 0, 0),
                       io=PeerIO(2, 1.0))
    return PeerTransfer(local, _LIMITS)


def test_a_pending_delivery_is_no_safetensors_file_until_it_is_committed(
        tmp_path: Path) -> None:
    """Delivered while its check runs, the caller's file has its header length zeroed: if
    the retract never happens (no thread free, a copy given up that finishes later), what
    stays is no file a safetensors loader takes. The commit writes the length."""
    source = tmp_path / "model.safetensors"
    save_file({"w": np.arange(64, dtype=np.float32)}, str(source))
    info = validate_safetensors(source, OutputLimits())
    output = ValidatedOutput(format=OutputFormat.SAFETENSORS, size=info.canonical_size,
                             sha256=info.canonical_sha256, path=source, safetensors=info,
                             write_into=lambda fd: write_canonical_safetensors(source, info, fd))
    peer_file = tmp_path / "caller.part"

    async def scenario() -> None:
        fd = os.open(peer_file, os.O_RDWR | os.O_CREAT, 0o600)
        transfer = _peer(tmp_path, fd)
        try:
            assert await transfer.deliver(output, pending=True)
            pending = peer_file.read_bytes()
            assert pending[:8] == bytes(8) and len(pending) == info.canonical_size
            with pytest.raises(SafetensorError):  # what a loader makes of it
                safetensors_load(pending)
            await transfer.commit(output)
            assert safetensors_load(peer_file.read_bytes())["w"].tolist() == list(range(64))
        finally:
            transfer.close()

    asyncio.run(scenario())


def test_on_the_fast_path_the_callers_file_is_written_alone_and_kept_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh output goes into the caller's file alone (a spool copy beside it slowed it 3-10
    # times, S3); sending the answer copies nothing more. The idempotency store's copy is made
    # after, in the background, from the output held open: the slot's file is gone by then
    # (destroyed once the answer is out), and a retry meanwhile waits for the copy.
    source = tmp_path / "slot-out" / "model.safetensors"
    source.parent.mkdir()
    save_file({"w": np.arange(1 << 19, dtype=np.float32)}, str(source))  # 2 MiB
    info = validate_safetensors(source, OutputLimits())
    canonical = info.canonical_header + source.read_bytes()[info.source_data_offset:]
    copies: list[tuple[int, float, float]] = []  # (thread, start, end)
    gate = threading.Event()

    def deliver(fd: int) -> None:
        began = time.monotonic()
        write_canonical_safetensors(source, info, fd)
        copies.append((threading.get_ident(), began, time.monotonic()))

    def keep(handle: BinaryIO, kept_info: SafetensorsInfo, fd: int) -> None:
        began = time.monotonic()
        assert gate.wait(30)  # held until the retry below is waiting
        write_canonical_from(handle, kept_info, fd)
        copies.append((threading.get_ident(), began, time.monotonic()))

    output = ValidatedOutput(format=OutputFormat.SAFETENSORS, size=info.canonical_size,
                             sha256=info.canonical_sha256, path=source, write_into=deliver,
                             safetensors=info)
    monkeypatch.setattr("airlock_broker.conversion.outputs.write_canonical_from", keep)

    def no_second_copy(*_: object) -> None:
        raise AssertionError("the answer was copied into the caller's file a second time")

    monkeypatch.setattr("airlock_broker.fastpath.peer_transfer.copy_file", no_second_copy)
    peer_path = tmp_path / "peer-output"
    peer_out = os.open(peer_path, os.O_WRONLY | os.O_CREAT, 0o600)
    kept = tmp_path / "results" / "fresh"

    async def scenario() -> None:
        store = IdempotencyStore(tmp_path, IdempotencySettings())
        transfer = _peer(tmp_path, peer_out)
        try:
            async with store.claim("", "key", InputDigest.known("sha"), "opts", "fresh") as claim:
                answer = await spool_answer(tmp_path, pb.ConvertResult(job_id="fresh"),
                                            output, transfer)
                with answer:
                    assert answer.delivered and answer.fd is None
                    assert peer_path.read_bytes() == canonical
                    assert not kept.exists() and len(copies) == 1  # the caller's file only
                    answer.store(claim)
                    messages = [m async for m in answer.responses()]
            assert [m.WhichOneof("payload") for m in messages] == ["result"]
            assert messages[0].result.transfer == "local"
            source.unlink()  # the slot is destroyed: the pinned file is still read
            retry = asyncio.create_task(_replay(store, "key"))
            while store.waiting == 0:  # the retry waits for the store's copy ...
                await asyncio.sleep(0.01)
            gate.set()
            assert await retry == canonical  # ... and is answered from it
            await store.close()
        finally:
            transfer.close()

    asyncio.run(scenario())
    (first, _, delivered), (second, began, _) = copies
    assert first != second and began >= delivered  # on two threads, one after the other


async def _replay(store: IdempotencyStore, key: str) -> bytes:
    async with store.claim("", key, InputDigest.known("sha"), "opts", "retry") as claim:
        assert claim.stored is not None and claim.waited
        fd = store.open_stored(claim.stored)
    try:
        return os.pread(fd, claim.stored.size + 1, 0)
    finally:
        os.close(fd)


def test_a_delivered_answer_whose_output_cannot_be_held_is_not_kept(tmp_path: Path) -> None:
    # The output changed (or vanished) after validation: the caller has its file already;
    # only the store's copy is given up, and a retry will convert again.
    missing = ValidatedOutput(format=OutputFormat.SAFETENSORS, size=4, sha256="",
                              path=tmp_path / "gone.safetensors",
                              write_into=lambda fd: os.pwrite(fd, b"abcd", 0),
                              safetensors=_info_of_missing_file())
    peer_out = os.open(tmp_path / "peer-output", os.O_WRONLY | os.O_CREAT, 0o600)

    async def scenario() -> None:
        transfer = _peer(tmp_path, peer_out)
        try:
            answer = await spool_answer(tmp_path, pb.ConvertResult(job_id="j"), missing,
                                        transfer)
            with answer:
                assert answer.delivered and answer.pinned is None and answer.path is None
        finally:
            transfer.close()

    asyncio.run(scenario())
    assert (tmp_path / "peer-output").read_bytes() == b"abcd"


def _info_of_missing_file() -> SafetensorsInfo:
    return SafetensorsInfo(tensor_count=0, data_bytes=0, dtypes=frozenset(), metadata=None,
                           metadata_dropped=None, source_data_offset=8,
                           source=FileIdentity(0, 0, 0, 0), canonical_header=b"",
                           canonical_size=4, canonical_sha256="")


def test_an_answer_the_store_will_not_keep_is_delivered_without_a_spool_copy(
        tmp_path: Path) -> None:
    # A shard over the idempotency store's max_bytes: a retry converts again, so a spool copy
    # would only cost a copy of N bytes and N of the spool's disk.
    payload = bytes(range(256)) * 8192
    writers: list[int] = []

    def write_into(fd: int) -> None:
        writers.append(fd)
        os.pwrite(fd, payload, 0)

    output = ValidatedOutput(format=OutputFormat.ONNX, size=len(payload), sha256="",
                             path=Path("/nonexistent"), write_into=write_into)
    peer_path = tmp_path / "peer-output"
    peer_out = os.open(peer_path, os.O_WRONLY | os.O_CREAT, 0o600)

    async def scenario() -> None:
        transfer = _peer(tmp_path, peer_out)
        try:
            answer = await spool_answer(tmp_path, pb.ConvertResult(job_id="big"), output,
                                        transfer, kept=False)
            with answer:
                assert answer.delivered and answer.fd is None and answer.path is None
                messages = [m async for m in answer.responses()]
            assert [m.WhichOneof("payload") for m in messages] == ["result"]
        finally:
            transfer.close()
        assert peer_path.read_bytes() == payload
        assert not (tmp_path / "results").exists() or \
            list((tmp_path / "results").iterdir()) == []

    asyncio.run(scenario())
    assert len(writers) == 1  # the caller's file only


def test_an_answer_not_kept_still_gets_its_copy_when_it_is_streamed(tmp_path: Path) -> None:
    async def scenario() -> None:
        answer = await spool_answer(tmp_path, pb.ConvertResult(job_id="s"),
                                    _output(b"y" * (2 << 20)), _stream(1 << 20), kept=False)
        with answer:
            assert not answer.delivered and answer.fd is not None
            messages = [m async for m in answer.responses()]
        assert b"".join(m.chunk.data for m in messages[1:]) == b"y" * (2 << 20)

    asyncio.run(scenario())


def test_a_delivery_that_fails_leaves_no_spool_copy_behind(tmp_path: Path) -> None:
    def write_into(fd: int) -> None:
        if os.fstat(fd).st_ino == os.stat(tmp_path / "peer-output").st_ino:
            raise OSError(28, "No space left on device")
        os.pwrite(fd, b"x" * (2 << 20), 0)

    output = ValidatedOutput(format=OutputFormat.ONNX, size=2 << 20, sha256="",
                             path=Path("/nonexistent"), write_into=write_into)
    peer_out = os.open(tmp_path / "peer-output", os.O_WRONLY | os.O_CREAT, 0o600)

    async def scenario() -> None:
        transfer = _peer(tmp_path, peer_out)
        try:
            with pytest.raises(AirlockError, match="No space left") as raised:
                await spool_answer(tmp_path, pb.ConvertResult(job_id="failed"), output,
                                   transfer)
        finally:
            transfer.close()
        assert raised.value.reason.value == "LOCAL_WRITE_FAILED"
        assert f"the {2 << 20}-byte output" in raised.value.message
        deadline = time.monotonic() + 30  # the spool copy's thread finishes, then removes
        while list((tmp_path / "results").iterdir()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert list((tmp_path / "results").iterdir()) == []

    asyncio.run(scenario())


def test_a_streamed_answer_is_never_delivered_early(tmp_path: Path) -> None:
    async def scenario() -> None:
        answer = await spool_answer(tmp_path, pb.ConvertResult(job_id="s"),
                                    _output(b"y" * (2 << 20)), _stream(1 << 20))
        with answer:
            assert not answer.delivered
            messages = [m async for m in answer.responses()]
        assert len(messages) == 3  # the header, then both chunks

    asyncio.run(scenario())


def _open_files() -> list[str]:
    found = []
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found.append(os.readlink(f"/proc/self/fd/{entry}"))
    return found


def test_limits_have_finite_defaults_and_are_checked(tmp_path: Path) -> None:
    config = BrokerConfig()
    assert config.answer_drain_seconds == 600
    assert config.jobs_per_principal == 2 + 8  # every sandbox, half the queue
    assert BrokerConfig(max_jobs_per_principal=3).jobs_per_principal == 3
    assert config.rpc == RpcLimits()
    for bad in ({"answer_drain_seconds": 0}, {"max_jobs_per_principal": 0}):
        with pytest.raises(ValueError):
            BrokerConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_open_streams must stay below"):
        RpcLimits(max_open_streams=8, max_concurrent_rpcs=8, max_waiting_calls=1)
    with pytest.raises(ValueError, match="max_waiting_calls must stay below"):
        RpcLimits(max_open_streams=1, max_concurrent_rpcs=8, max_waiting_calls=8)
    with pytest.raises(ValueError, match="request_seconds"):
        RpcLimits(request_seconds=0)
    toml = tmp_path / "airlock.toml"
    toml.write_text("[broker]\nanswer_drain_seconds = 5\nmax_jobs_per_principal = 4\n"
                    "[rpc]\nmax_open_streams = 2\nmax_connection_age_seconds = 60\n")
    loaded = BrokerConfig.load(toml)
    assert (loaded.answer_drain_seconds, loaded.jobs_per_principal) == (5, 4)
    assert loaded.rpc.max_open_streams == 2
    assert ("grpc.max_connection_age_ms", 60_000) in loaded.rpc.server_options()
    toml.write_text("[rpc]\nmaximum_concurrent_rpcs = 2\n")
    with pytest.raises(ValueError, match=r"unknown keys in \[rpc\]"):
        BrokerConfig.load(toml)

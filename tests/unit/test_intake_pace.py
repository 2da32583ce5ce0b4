"""A gRPC upload is bounded in time (grace, minimum rate, deadline) and in spool space."""

from __future__ import annotations

import asyncio
import os
import re
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.conversion.intake import IntakeLimits, read_metadata, spool_chunks
from airlock_broker.conversion.spool_space import SpoolSpace
from airlock_broker.conversion.upload_limits import UploadLimits
from airlock_broker.errors import AirlockError, Reason

MiB = 1 << 20


def _chunk(data: bytes) -> pb.ConvertRequest:
    return pb.ConvertRequest(chunk=pb.Chunk(data=data, crc32=zlib.crc32(data)))


async def _dribble(messages: list[pb.ConvertRequest], taken: list[int],
                   then_stall: bool = True) -> AsyncIterator[pb.ConvertRequest]:
    for msg in messages:
        taken.append(1)
        yield msg
    if then_stall:
        await asyncio.Event().wait()  # a client that keeps the stream open and sends nothing


def _limits(tmp_path: Path, **upload: float) -> IntakeLimits:
    return IntakeLimits(max_artifact_bytes=1 << 30, max_chunk_bytes=2 * MiB, idle_seconds=60,
                        upload=UploadLimits(**upload))  # type: ignore[arg-type]


def _spool(tmp_path: Path) -> int:
    return os.open(tmp_path / "spool", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


def test_a_dribbling_stream_is_cut_off_when_it_falls_behind_not_at_the_idle_timeout(
        tmp_path: Path) -> None:
    limits = _limits(tmp_path, min_bytes_per_second=10_000, grace_seconds=0.5)
    stream = _dribble([_chunk(b"x")], [])

    async def main() -> None:
        began = time.monotonic()
        with pytest.raises(AirlockError) as slow:
            await spool_chunks(stream, _spool(tmp_path), pb.ConvertMetadata(), limits)
        assert time.monotonic() - began < 5  # the idle timeout is 60 s
        assert slow.value.reason is Reason.UPLOAD_TOO_SLOW
        # The time it reports is the one measured when the timer fired: 0.5 s or a little later.
        took = re.search(r"1 bytes in ([0-9.]+) s", slow.value.message)
        assert took and 0.5 <= float(took[1]) < 5, slow.value.message
        assert "at least 9.8 KiB/s (10000 bytes/s) after the first 0.5 s" in slow.value.message

    asyncio.run(main())


def test_a_client_that_never_sends_its_metadata_is_cut_off_after_the_grace(
        tmp_path: Path) -> None:
    limits = _limits(tmp_path, grace_seconds=0.3)

    async def main() -> None:
        began = time.monotonic()
        with pytest.raises(AirlockError, match="DEADLINE_EXCEEDED"):
            await read_metadata(_dribble([], []), limits)
        assert time.monotonic() - began < 5

    asyncio.run(main())


def test_an_upload_past_its_total_deadline_is_refused(tmp_path: Path) -> None:
    limits = _limits(tmp_path, min_bytes_per_second=0, grace_seconds=0.1,
                     deadline_seconds=0.4)

    async def fast_forever() -> AsyncIterator[pb.ConvertRequest]:
        while True:
            await asyncio.sleep(0.01)
            yield _chunk(b"y" * 1000)

    async def main() -> None:
        with pytest.raises(AirlockError) as late:
            await spool_chunks(fast_forever(), _spool(tmp_path), pb.ConvertMetadata(), limits)
        assert late.value.reason is Reason.UPLOAD_TOO_SLOW
        assert "took over 0.4 s" in late.value.message

    asyncio.run(main())


@pytest.mark.parametrize("in_ram", [False, True])
def test_zero_chunks_become_holes_on_disk_only(tmp_path: Path, in_ram: bool) -> None:
    """On the RAM spool the zeros are written: a sandbox mapping a tmpfs hole would be
    charged for the page (spool_space.SpoolWriter)."""
    limits = _limits(tmp_path)
    chunks = [_chunk(bytes(2 * MiB)) for _ in range(16)] + [_chunk(b"\x80tail")]
    size = 32 * MiB + 5

    async def main() -> None:
        spooled = await spool_chunks(_dribble(chunks, [], then_stall=False), _spool(tmp_path),
                                     pb.ConvertMetadata(size_bytes=size), limits,
                                     in_ram=in_ram)
        assert spooled.size == size

    asyncio.run(main())
    st = os.stat(tmp_path / "spool")
    assert st.st_size == size
    if in_ram:
        assert st.st_blocks * 512 >= size
    else:
        assert st.st_blocks * 512 <= 64 * 1024
    with open(tmp_path / "spool", "rb") as fh:
        fh.seek(32 * MiB)
        assert fh.read() == b"\x80tail"


def test_a_declared_size_over_the_reserve_is_refused_before_any_chunk_is_read(
        tmp_path: Path) -> None:
    disk = os.statvfs_result((4096, 4096, 1 << 20, 25_600, 25_600, 0, 0, 0, 0, 255))  # 100 MiB
    reserve = UploadLimits(spool_min_free_bytes=90 * MiB, spool_min_free_ratio=0.0)
    limits = IntakeLimits(max_artifact_bytes=1 << 30, max_chunk_bytes=2 * MiB, idle_seconds=60,
                          space=SpoolSpace(tmp_path, reserve, statvfs=lambda _: disk))
    taken: list[int] = []

    async def main() -> None:
        with pytest.raises(AirlockError) as full:
            await spool_chunks(_dribble([_chunk(b"z" * 100)], taken), _spool(tmp_path),
                               pb.ConvertMetadata(size_bytes=11 * MiB), limits)
        assert full.value.reason is Reason.SPOOL_FULL
        assert "needs 11.0 MiB" in full.value.message
        assert "keeps 90.0 MiB free" in full.value.message

    asyncio.run(main())
    assert taken == []  # refused on the declared size: not one chunk was taken


def test_a_write_the_kernel_holds_back_stalls_its_upload_not_the_event_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool write that blocks (dirty pages throttled behind a slow disk) must leave the
    event loop free for every other call: the write here waits until a coroutine on the loop
    lets it go. With writes on the loop, nothing could, and it gives up after 10 s."""
    import threading

    from airlock_broker.conversion import spool_space

    released = threading.Event()
    gave_up: list[bool] = []
    write = spool_space.SpoolWriter.write

    def held_back(self: spool_space.SpoolWriter, data: bytes | bytearray, offset: int) -> bool:
        if offset == 0:
            gave_up.append(not released.wait(10))
        return write(self, data, offset)

    monkeypatch.setattr(spool_space.SpoolWriter, "write", held_back)
    data = os.urandom(MiB)

    async def release_soon() -> None:
        await asyncio.sleep(0.05)
        released.set()

    async def main() -> None:
        stream = _dribble([_chunk(data), _chunk(data)], [], then_stall=False)
        releasing = asyncio.ensure_future(release_soon())
        spooled = await spool_chunks(stream, _spool(tmp_path), pb.ConvertMetadata(),
                                     _limits(tmp_path))
        await releasing
        assert spooled.size == 2 * MiB
        assert (tmp_path / "spool").read_bytes() == data + data
        import hashlib

        assert await spooled.digest.value() == hashlib.sha256(data + data).hexdigest()

    asyncio.run(main())
    assert gave_up == [False]


@pytest.mark.parametrize("next_chunk", ["comes at once", "never comes"])
def test_a_cancelled_upload_closes_its_spool_file_only_after_its_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, next_chunk: str) -> None:
    """Cancelled while a chunk is being written on its thread, the upload ends at once, and
    its descriptor (a number the next open could reuse) is closed only when that write
    returns: whether the cancellation finds it waiting for the next chunk or for that write.
    A plain ``await`` of the write let the cancellation end the wait and close the
    descriptor while the thread wrote on (found by review, reproduced with the next open
    getting the same number and the bytes); the fix after it waited for the write, which
    held the call (and shutdown) for as long as a disk held the write."""
    import threading

    from airlock_broker.conversion import spool_space

    writing, release = threading.Event(), threading.Event()
    ended: list[bool] = []
    write = spool_space.SpoolWriter.write

    def slow(self: spool_space.SpoolWriter, data: bytes | bytearray, offset: int) -> bool:
        writing.set()
        release.wait(10)
        done = write(self, data, offset)
        ended.append(True)
        return done

    monkeypatch.setattr(spool_space.SpoolWriter, "write", slow)
    closed: list[bool] = []
    real_close = os.close
    fd = _spool(tmp_path)

    def close(n: int) -> None:
        if n == fd:
            closed.append(bool(ended))
        real_close(n)

    monkeypatch.setattr(os, "close", close)

    async def main() -> None:
        chunks = [_chunk(b"x" * 1024)] * (2 if next_chunk == "comes at once" else 1)
        taken: list[int] = []
        stream = _dribble(chunks, taken, then_stall=True)
        task = asyncio.ensure_future(spool_chunks(stream, fd, pb.ConvertMetadata(),
                                                  _limits(tmp_path)))
        while not writing.is_set() or len(taken) < len(chunks):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the upload is now waiting: for the write, or the stream
        task.cancel()
        # The call ends at once, though its write is held: it never waits for a thread it
        # cannot stop (a disk that never takes the write would hold it for ever) ...
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        assert closed == [] and not ended  # ... and the descriptor stays open under it
        release.set()
        deadline = time.monotonic() + 10
        while not closed:  # closed once the write returns, on the loop
            assert time.monotonic() < deadline, "the spool file was never closed"
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert closed == [True]

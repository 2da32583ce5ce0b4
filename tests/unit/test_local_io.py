"""The fast path's copies: the hash is of exactly the bytes spooled; limits as for streaming."""

from __future__ import annotations

import asyncio
import fcntl
import functools
import gc
import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.conversion import file_copy, input_digest
from airlock_broker.conversion.intake import IntakeLimits
from airlock_broker.conversion.spool_space import SpoolSpace
from airlock_broker.conversion.upload_limits import UploadLimits
from airlock_broker.errors import AirlockError, Reason
from airlock_broker.fastpath import local_io
from airlock_broker.fastpath.local_handles import InputFile, LocalFiles, PeerCred
from airlock_broker.fastpath.peer_io import PeerIO
from airlock_broker.security import caller_disk
from airlock_broker.validation.safetensors_canonical import FileIdentity

LIMITS = IntakeLimits(max_artifact_bytes=1 << 20, max_chunk_bytes=1 << 20, idle_seconds=60)


def _spool(tmp_path: Path, data: bytes, meta: pb.ConvertMetadata,
           limits: IntakeLimits = LIMITS) -> bytes:
    (tmp_path / "in").write_bytes(data)
    src = os.open(tmp_path / "in", os.O_RDONLY)
    dst = os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        copied = local_io.spool_from_fd(src, dst, meta, limits)
    finally:
        os.close(src)
        os.close(dst)
    assert copied.size == len(data) and copied.prefix == data[:len(copied.prefix)]
    return (tmp_path / "spool").read_bytes()


def test_spooled_bytes_match_the_input_across_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_io, "BLOCK_BYTES", 4096)  # many blocks
    data = os.urandom(4096 * 9 + 17)
    assert _spool(tmp_path, data, pb.ConvertMetadata(size_bytes=len(data))) == data


@pytest.mark.parametrize(("data", "meta", "reason"), [
    (b"x" * ((1 << 20) + 1), pb.ConvertMetadata(), "TOO_LARGE"),
    (b"x" * 100, pb.ConvertMetadata(size_bytes=50), "TOO_LARGE"),
    (b"x" * 100, pb.ConvertMetadata(size_bytes=200), "CHECKSUM_MISMATCH"),
    (b"", pb.ConvertMetadata(), "EMPTY_ARTIFACT"),
])
def test_the_streaming_paths_limits_apply(tmp_path: Path, data: bytes,
                                          meta: pb.ConvertMetadata, reason: str) -> None:
    with pytest.raises(AirlockError) as refused:
        _spool(tmp_path, data, meta)
    assert refused.value.reason.value == reason


def test_the_hash_is_of_the_spool_copy_not_of_the_peers_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The input is hashed from the broker's own file, never the peer's: a peer that rewrites
    its file as soon as the copy ends (the hash held until then) changes neither the digest
    nor what was spooled; a declared sha256 that differs is CHECKSUM_MISMATCH."""
    monkeypatch.setattr(input_digest, "STEP_BYTES", 64 << 10)  # many steps
    data = os.urandom(900_005)
    changed = threading.Event()
    preadv = os.preadv

    def after_the_change(fd: int, buffers: list[memoryview], offset: int) -> int:
        if threading.current_thread().name == "airlock-input-hash":
            assert changed.wait(60)  # the hash reads only once the peer's file changed
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", after_the_change)

    async def spool(meta: pb.ConvertMetadata) -> str:
        io = PeerIO(2, 1.0)
        local = _local(tmp_path, io, data)
        dst = os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        changed.clear()
        try:
            spooled = await local_io.spool_from_peer(local, dst, meta, LIMITS)
            (tmp_path / "in").write_bytes(b"\0" * len(data))  # the peer's file, changed
            changed.set()
            try:
                return await spooled.digest.value()
            except AirlockError as exc:
                return exc.reason.value
            finally:
                spooled.digest.close()
        finally:
            local.close()
            io.shutdown()

    assert asyncio.run(spool(pb.ConvertMetadata())) == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "spool").read_bytes() == data
    assert asyncio.run(spool(pb.ConvertMetadata(sha256="0" * 64))) == "CHECKSUM_MISMATCH"


def test_the_hash_reads_the_spool_through_a_descriptor_that_cannot_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hash thread gets a descriptor of the spool file opened read-only (the copy's is
    read-write): a fault in the hash cannot change the bytes the sandbox converts."""
    seen: list[int] = []
    preadv = os.preadv

    def noting(fd: int, buffers: list[memoryview], offset: int) -> int:
        if threading.current_thread().name == "airlock-input-hash":
            seen.append(os.stat(fd).st_ino)
            seen.append(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", noting)
    data = os.urandom(100_000)

    async def spool() -> str:
        io = PeerIO(2, 1.0)
        local = _local(tmp_path, io, data)
        dst = os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            spooled = await local_io.spool_from_peer(local, dst, pb.ConvertMetadata(), LIMITS)
            try:
                return await spooled.digest.value()
            finally:
                spooled.digest.close()
        finally:
            local.close()
            io.shutdown()

    assert asyncio.run(spool()) == hashlib.sha256(data).hexdigest()
    assert seen, "the hash never read the spool file"
    assert seen[0] == (tmp_path / "spool").stat().st_ino  # the spool file itself
    assert set(seen[1::2]) == {os.O_RDONLY}


def test_copy_writes_the_whole_file_at_explicit_offsets(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT)
    try:
        os.lseek(dst, 5000, os.SEEK_SET)  # the peer's offset is not used
        file_copy.copy_file(src, dst, len(data))
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes() == data


def test_a_sparse_input_is_spooled_as_sparse(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64 MiB file with one byte of data costs its owner nothing; the spool neither."""
    monkeypatch.setattr(local_io, "BLOCK_BYTES", 1 << 20)
    size = 64 << 20
    with open(tmp_path / "in", "wb") as fh:
        fh.truncate(size)
        fh.seek(size // 2)
        fh.write(b"\x80")
    src = os.open(tmp_path / "in", os.O_RDONLY)
    dst = os.open(tmp_path / "spool", os.O_WRONLY | os.O_CREAT)
    limits = IntakeLimits(max_artifact_bytes=1 << 30, max_chunk_bytes=1 << 20, idle_seconds=60)
    try:
        copied = local_io.spool_from_fd(src, dst, pb.ConvertMetadata(size_bytes=size), limits)
    finally:
        os.close(src)
        os.close(dst)
    expected = bytearray(size)
    expected[size // 2] = 0x80
    assert copied.size == size and (tmp_path / "spool").read_bytes() == expected
    st = os.stat(tmp_path / "spool")
    assert st.st_size == size and st.st_blocks * 512 <= 2 << 20  # one block of data at most


def _local(tmp_path: Path, io: PeerIO, data: bytes = b"\x80\x04N." * 100) -> LocalFiles:
    (tmp_path / "in").write_bytes(data)
    size = len(data)
    return LocalFiles(os.open(tmp_path / "in", os.O_RDONLY),
                      os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600),
                      InputFile(size, os.stat(tmp_path / "in").st_blocks * 512),
                      PeerCred(1, 1, 1), io)


def test_a_descriptor_read_that_stalls_is_cut_off_at_the_uploads_pace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer's file stops answering after the first block: UPLOAD_TOO_SLOW, with the rate,
    when the pace runs out, not at the idle timeout; the job's spool file descriptor is its
    own to close, the thread keeps its duplicates."""
    release = threading.Event()

    def stalling(src: int, dst: int, meta: pb.ConvertMetadata, limits: IntakeLimits,
                 progress: local_io.ReadProgress, claim: object, **_: object) -> object:
        progress.received = 1000
        progress.last = time.monotonic()
        release.wait(30)
        raise OSError("aborted")

    monkeypatch.setattr(local_io, "spool_from_fd", stalling)
    limits = IntakeLimits(max_artifact_bytes=1 << 20, max_chunk_bytes=1 << 20, idle_seconds=60,
                          upload=UploadLimits(min_bytes_per_second=10_000, grace_seconds=0.5))

    async def main() -> None:
        io = PeerIO(2, 1.0)
        local = _local(tmp_path, io)
        dst = os.open(tmp_path / "spool", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            began = time.monotonic()
            with pytest.raises(AirlockError) as slow:
                await local_io.spool_from_peer(local, dst, pb.ConvertMetadata(), limits)
            elapsed = time.monotonic() - began
            # 1000 bytes at 10 kB/s buy 0.1 s after the 0.5 s grace.
            assert 0.5 < elapsed < 5, elapsed
            assert slow.value.reason is Reason.UPLOAD_TOO_SLOW
            took = re.search(r"1000 bytes in ([0-9.]+) s", slow.value.message)
            assert took and 0.6 <= float(took[1]) < 5, slow.value.message
            assert io.abandoned == 1
            with pytest.raises(OSError):
                os.fstat(dst)  # closed by spool_from_peer
        finally:
            release.set()
            local.close()
            io.shutdown()

    asyncio.run(main())


def test_the_spool_reserve_is_checked_against_what_the_input_really_occupies(
        tmp_path: Path) -> None:
    """Room is claimed for the input's allocated blocks (a hole costs nothing), before any
    byte is read; a dense input that would cross the reserve is refused, nothing written.
    The disk: 100 MiB free (a fake: the real one's free space moves with everyone's work),
    92 MiB kept free."""
    disk = os.statvfs_result((4096, 4096, 1 << 20, 25_600, 25_600, 0, 0, 0, 0, 255))
    reserve = UploadLimits(spool_min_free_bytes=(100 - 8) << 20, spool_min_free_ratio=0.0)
    limits = IntakeLimits(max_artifact_bytes=1 << 40, max_chunk_bytes=1 << 20, idle_seconds=60,
                          space=SpoolSpace(tmp_path, reserve, statvfs=lambda _: disk))

    async def spool(local: LocalFiles) -> str:
        dst = os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            digest = (await local_io.spool_from_peer(local, dst, pb.ConvertMetadata(),
                                                     limits)).digest
            return await digest.value()
        except AirlockError as exc:
            return exc.reason.value
        finally:
            local.close()

    async def main() -> None:
        io = PeerIO(2, 1.0)
        try:
            sparse = _local(tmp_path, io, b"")
            os.truncate(tmp_path / "in", 256 << 20)  # 256 MiB apparent, nothing allocated
            sparse.input = InputFile(256 << 20, 0)
            assert await spool(sparse) == hashlib.sha256(bytes(256 << 20)).hexdigest()
            dense = _local(tmp_path, io, os.urandom(16 << 20))
            assert await spool(dense) == "SPOOL_FULL"
            assert os.stat(tmp_path / "spool").st_size == 0
        finally:
            io.shutdown()

    asyncio.run(main())


def test_an_input_spooled_in_ram_is_written_whole(tmp_path: Path) -> None:
    """The RAM spool gets no holes: a sandbox that maps a hole of a tmpfs file is charged for
    the page its read allocates (spool_space.SpoolWriter)."""
    size = 8 << 20
    limits = IntakeLimits(max_artifact_bytes=1 << 30, max_chunk_bytes=1 << 20, idle_seconds=60)

    async def main() -> None:
        io = PeerIO(2, 1.0)
        try:
            for in_ram, dense in ((False, False), (True, True)):
                sparse = _local(tmp_path, io, b"")
                os.truncate(tmp_path / "in", size)
                sparse.input = InputFile(size, 0)
                dst = os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    spooled = await local_io.spool_from_peer(
                        sparse, dst, pb.ConvertMetadata(size_bytes=size), limits,
                        in_ram=in_ram)
                finally:
                    sparse.close()
                assert await spooled.digest.value() == hashlib.sha256(bytes(size)).hexdigest()
                st = os.stat(tmp_path / "spool")
                assert st.st_size == size
                assert (st.st_blocks * 512 >= size) is dense, (in_ram, st.st_blocks)
        finally:
            io.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize("in_ram", [False, True])
def test_the_hash_follows_data_and_holes_block_by_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_ram: bool) -> None:
    """Data and all-zero blocks mixed, a partial last block: the digest is the input's and
    the spool file's (on disk the zero blocks stay holes, hashed as zeros)."""
    monkeypatch.setattr(local_io, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(input_digest, "STEP_BYTES", 4096)
    blocks = [os.urandom(4096), bytes(4096), bytes(4096), os.urandom(4096), bytes(4096),
              os.urandom(4096), bytes(100)]
    data = b"".join(blocks)
    limits = IntakeLimits(max_artifact_bytes=1 << 20, max_chunk_bytes=1 << 20, idle_seconds=60)

    async def main() -> str:
        io = PeerIO(2, 1.0)
        local = _local(tmp_path, io, data)
        dst = os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            spooled = await local_io.spool_from_peer(local, dst, pb.ConvertMetadata(), limits,
                                                     in_ram=in_ram)
            return await spooled.digest.value()
        finally:
            local.close()
            io.shutdown()

    sha = hashlib.sha256(data).hexdigest()
    assert asyncio.run(main()) == sha
    assert hashlib.sha256((tmp_path / "spool").read_bytes()).hexdigest() == sha
    allocated = os.stat(tmp_path / "spool").st_blocks * 512
    assert (allocated >= len(data)) is in_ram, allocated  # holes on disk only


def test_a_failed_copy_ends_its_hash_quietly(tmp_path: Path) -> None:
    """The copy fails (TOO_LARGE): the hash that followed it stops, closes its descriptor,
    and nothing is logged about a failure no one awaited."""
    data = os.urandom((1 << 20) + 1)
    complaints: list[str] = []

    async def refused() -> Reason:
        io = PeerIO(2, 1.0)
        local = _local(tmp_path, io, data)
        dst = os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            await local_io.spool_from_peer(local, dst, pb.ConvertMetadata(), LIMITS)
        except AirlockError as exc:
            return exc.reason
        finally:
            local.close()
            io.shutdown()
        raise AssertionError("not refused")

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: complaints.append(context["message"]))
        assert await refused() is Reason.TOO_LARGE
        deadline = time.monotonic() + 60
        while _hashing() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # its thread ends at its next step
        assert not _hashing()
        await asyncio.sleep(0)  # its outcome handed to the loop, and no one holds it now
        gc.collect()

    asyncio.run(main())
    assert complaints == []


def _hashing() -> bool:
    return any(t.name == "airlock-input-hash" for t in threading.enumerate())


def test_a_failed_read_of_the_peers_file_has_a_reason(tmp_path: Path) -> None:
    """It surfaced as INTERNAL, with a stack trace in the broker's log."""
    (tmp_path / "in").write_bytes(b"abc")
    src = os.open(tmp_path / "in", os.O_WRONLY)  # preadv: EBADF
    dst = os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        with pytest.raises(AirlockError) as refused:
            local_io.spool_from_fd(src, dst, pb.ConvertMetadata(), LIMITS)
    finally:
        os.close(src)
        os.close(dst)
    assert refused.value.reason == Reason.LOCAL_FD_REFUSED
    assert "after 0 bytes" in refused.value.message


_CALLER = 10001


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB ext4 filesystem, loop-mounted, half of it kept for root (``-m 50``), its
    root directory open to everyone. Needs root, mkfs.ext4 and a loop device."""
    image, mount = tmp_path / "disk.img", tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "50", "-O", "^has_journal", str(image),
                    "16M"], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop,nodev,nosuid,noexec", str(image), str(mount)],
                   check=True, capture_output=True)
    try:
        os.chmod(mount, 0o1777)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True, capture_output=True)


def test_the_callers_file_gets_the_callers_room_not_roots_reserve(
        tmp_path: Path, small_disk: Path) -> None:
    """A root broker wrote a same-host caller's output into the blocks ext4 keeps for root:
    a local user who had filled their disk could fill the rest through the broker."""
    filler = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:  # the caller fills what it may (through a descriptor: it cannot reach tmp_path)
        filled = subprocess.run(["dd", "if=/dev/zero", "bs=4k"], stdout=filler,
                                stderr=subprocess.PIPE, text=True, user=_CALLER,
                                group=_CALLER, extra_groups=[], check=False)
    finally:
        os.close(filler)
    assert "No space left on device" in filled.stderr, filled.stderr
    before = os.statvfs(small_disk)
    room, reserve = before.f_bavail * before.f_frsize, before.f_bfree * before.f_frsize
    assert room < 64 << 10 and reserve > 4 << 20, before
    output = b"o" * (1 << 20)
    (tmp_path / "in").write_bytes(b"\x80\x04N.")
    out = os.open(small_disk / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    os.fchown(out, _CALLER, _CALLER)

    async def main() -> AirlockError:
        io = PeerIO(2, 1.0)
        local = LocalFiles(os.open(tmp_path / "in", os.O_RDONLY), out, InputFile(4, 4096),
                           PeerCred(1, _CALLER, _CALLER), io)
        try:
            with pytest.raises(AirlockError) as refused:
                await local_io.write_to_peer(local, functools.partial(file_copy.write_at,
                                                                      output, 0),
                                             len(output), LIMITS)
            return refused.value
        finally:
            local.close()
            io.shutdown()

    refused = asyncio.run(main())
    assert refused.reason is Reason.LOCAL_WRITE_FAILED
    assert "No space left on device" in refused.message, refused.message
    after = os.statvfs(small_disk)
    # At most the caller's room was taken, not a block of the reserve.
    assert after.f_bfree >= before.f_bfree - before.f_bavail, (before, after)


def test_a_thread_that_wrote_as_the_caller_is_the_brokers_again(tmp_path: Path) -> None:
    """The peer copy threads also spool inputs into the broker's own 0700 directories.
    (Where root holds ``CAP_SYS_RESOURCE``, this also checks that the write goes without it:
    this project's machine runs root without it.)"""
    seen: list[tuple[str, str]] = []
    capabilities_outside = _capabilities()

    def write(out: int) -> None:
        seen.append(_fs_ids())
        assert not _capabilities() & (1 << caller_disk.CAP_SYS_RESOURCE)
        file_copy.write_at(b"x", 0, out)

    async def main() -> None:
        io = PeerIO(1, 1.0)  # one thread: the same one before and after
        local = _local(tmp_path, io)
        try:
            await local_io.write_to_peer(local, write, 1, LIMITS)
            seen.append(await io.run(_fs_ids, (), lambda: 30.0))
            assert await io.run(_capabilities, (), lambda: 30.0) == capabilities_outside
        finally:
            local.close()
            io.shutdown()

    asyncio.run(main())
    assert seen == [("1", "1"), (str(os.geteuid()), str(os.getegid()))], seen


@pytest.mark.parametrize("caller", [_CALLER, 2**31 + 5, 2**32 - 2])
def test_a_broker_file_opens_as_the_broker_while_the_thread_writes_as_the_caller(
        tmp_path: Path, caller: int) -> None:
    """A safetensors output or a data file is copied from the broker's own 0700 directory
    (``open_identical``) by a thread that writes as the caller; ids past 2**31 are ids."""
    source = tmp_path / "private" / "model.safetensors"
    source.parent.mkdir(mode=0o700)
    source.write_bytes(b"canonical bytes")
    source.chmod(0o600)
    identity = FileIdentity.of(source.stat())
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)

    def copy() -> tuple[str, str]:
        with caller_disk.writing_as(caller, caller):
            ids = _fs_ids()
            file_copy.copy_identical(source, identity, out)
        return ids

    try:
        with ThreadPoolExecutor(1) as thread:  # not the test's own thread
            assert thread.submit(copy).result() == (str(caller), str(caller))
        assert os.pread(out, 100, 0) == b"canonical bytes"
    finally:
        os.close(out)


def _capabilities() -> int:
    """This thread's effective capabilities, as the kernel shows them."""
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    return int(dict(line.split(":", 1) for line in status.splitlines())["CapEff"], 16)


def _fs_ids() -> tuple[str, str]:
    """This thread's filesystem uid and gid, as the kernel shows them."""
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return fields["Uid"].split()[3], fields["Gid"].split()[3]


def test_root_of_a_user_namespace_writes_as_itself(tmp_path: Path) -> None:
    """There root's ids are not the host's (no reserve, no quota exemption), and the caller's
    uid may not be mapped: switching to it failed every fast-path output."""
    script = ("import os, sys\n"
              "from airlock_broker.security.caller_disk import writing_as\n"
              "with writing_as(1000, 1000):\n"
              "    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)\n"
              "    os.write(fd, b'written')\n")
    done = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", script,
                           str(tmp_path / "out")], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out").read_bytes() == b"written"


def test_an_output_rewritten_with_its_mtime_set_back_is_not_the_one_validated(
        tmp_path: Path) -> None:
    """The sandbox's uid owns its output and may ``utime`` it: same inode, size and mtime
    after a rewrite in place. The ctime, which ``utime`` itself moves, tells."""
    source = tmp_path / "model.safetensors"
    source.write_bytes(b"validated bytes")
    before = source.stat()
    identity = FileIdentity.of(before)
    with open(source, "r+b") as fh:
        fh.write(b"rewritten")
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = source.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)
    with pytest.raises(AirlockError, match="changed after it was validated"):
        file_copy.open_identical(source, identity)


def test_the_fast_paths_upload_counts_against_its_callers_share(tmp_path: Path) -> None:
    """The fast path's claim is the caller's too (``[upload] spool_share_per_caller``): a
    caller holding an upload already may not promise more than its share through it."""
    from airlock_broker.conversion.spool_space import SpoolSpace
    from tests.unit.test_spool_space import Disk

    data = os.urandom(256 << 10)
    space = SpoolSpace(tmp_path, UploadLimits(spool_min_free_bytes=100 << 20),
                       statvfs=Disk(1000 << 20, (100 << 20) + (1 << 20)))  # 1 MiB of room
    limits = IntakeLimits(max_artifact_bytes=1 << 20, max_chunk_bytes=1 << 20,
                          idle_seconds=60, space=space)
    held = space.claim(400 << 10, owner="alice")  # within half a MiB: the caller's first

    async def spool(owner: str) -> str:
        io = PeerIO(2, 1.0)
        local = _local(tmp_path, io, data)
        dst = os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            spooled = await local_io.spool_from_peer(local, dst, pb.ConvertMetadata(), limits,
                                                     owner=owner)
            spooled.digest.close()
            return "spooled"
        except AirlockError as exc:
            return exc.message
        finally:
            local.close()
            io.shutdown()

    refused = asyncio.run(spool("alice"))
    assert "your uploads in progress may still write 0.4 MiB" in refused, refused
    assert asyncio.run(spool("bob")) == "spooled"
    held.release()

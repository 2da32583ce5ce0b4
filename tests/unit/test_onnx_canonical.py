"""A canonical ONNX file is the broker's alone, on a filesystem without ``O_TMPFILE`` too.

Where the spool's filesystem (or the kernel) cannot make an unnamed file, ``O_TMPFILE``
fails with ``EOPNOTSUPP`` (or ``EISDIR`` / ``EINVAL`` on older kernels), and the writer makes a
fresh name instead and removes it before a byte is written (validation/onnx_canonical.py).
That path was untested (the eleventh review's second gap): these tests force it, watch the
first write find no name, and check that a failure at each step leaves neither a file nor a
descriptor behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.errors import AirlockError, Reason
from airlock_broker.validation import onnx_canonical
from airlock_broker.validation.onnx_canonical import CanonicalWriter

BLOCKS = [b"\x08\x07" + bytes(range(256)) * 64, b"canonical bytes" * 1000, b"\x01"]
SIZE = sum(len(block) for block in BLOCKS)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _refused_at_begin(directory: Path) -> AirlockError:
    """What a writer's ``begin`` raised (closed after, as its owner's ``finally`` does)."""
    writer = CanonicalWriter(directory)
    try:
        with pytest.raises(AirlockError) as caught:
            writer.begin(SIZE)
        return caught.value
    finally:
        writer.close()


class NoTmpfile:
    """``os.open`` as on a filesystem without ``O_TMPFILE`` (``errno``), recording the names
    it creates; and ``os.pwrite``, which records what the spool's directory held, and the
    file's link count, at each write."""

    def __init__(self, directory: Path, code: int) -> None:
        self.directory = directory
        self.code = code
        self.created: list[str] = []
        self.tmpfile_refused = 0
        #: At each write: (names in the spool's directory, the written file's link count).
        self.seen_at_write: list[tuple[list[str], int]] = []
        self._open = os.open
        self._pwrite = os.pwrite

    def open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            self.tmpfile_refused += 1
            raise OSError(self.code, os.strerror(self.code))
        if flags & os.O_CREAT:
            self.created.append(os.fspath(path))
        return self._open(path, flags, mode, dir_fd=dir_fd)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        self.seen_at_write.append((sorted(os.listdir(self.directory)), os.fstat(fd).st_nlink))
        return self._pwrite(fd, data, offset)


@pytest.fixture(params=[errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL],
                ids=["EOPNOTSUPP", "EISDIR", "EINVAL"])
def no_tmpfile(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[NoTmpfile]:
    fake = NoTmpfile(tmp_path, request.param)
    monkeypatch.setattr(onnx_canonical.os, "open", fake.open)
    monkeypatch.setattr(onnx_canonical.os, "pwrite", fake.pwrite)
    yield fake


def test_without_o_tmpfile_the_file_has_no_name_before_its_first_byte(
        no_tmpfile: NoTmpfile, tmp_path: Path) -> None:
    before = _open_fds()
    writer = CanonicalWriter(tmp_path)
    try:
        write = writer.begin(SIZE)
        assert no_tmpfile.tmpfile_refused == 1  # the fallback it is about
        assert len(no_tmpfile.created) == 1 and no_tmpfile.created[0].startswith(".onnx-")
        assert os.listdir(tmp_path) == []  # named for a moment, gone before any write
        for block in BLOCKS:
            write(memoryview(block))
        canonical = writer.finish()
    finally:
        writer.close()
    with canonical:
        # Each write found the directory empty and the file linked nowhere.
        assert no_tmpfile.seen_at_write and all(
            names == [] and links == 0 for names, links in no_tmpfile.seen_at_write)
        data = os.pread(canonical.fileno(), SIZE + 1, 0)
        assert data == b"".join(BLOCKS) and canonical.size == SIZE
        assert canonical.sha256 == hashlib.sha256(data).hexdigest()
        mode = os.fstat(canonical.fileno()).st_mode & 0o777
        assert mode == 0o600
    assert _open_fds() == before and os.listdir(tmp_path) == []


def test_without_o_tmpfile_a_failed_write_leaves_no_file_and_no_descriptor(
        no_tmpfile: NoTmpfile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _open_fds()

    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer = CanonicalWriter(tmp_path)
    try:
        write = writer.begin(SIZE)
        write(memoryview(BLOCKS[0]))
        monkeypatch.setattr(onnx_canonical.os, "pwrite", full)
        with pytest.raises(AirlockError) as caught:
            write(memoryview(BLOCKS[1]))
        assert caught.value.reason is Reason.SPOOL_FULL
        with pytest.raises(ValueError):
            writer.finish()  # a file cut short is never handed over
    finally:
        writer.close()
    assert _open_fds() == before and os.listdir(tmp_path) == []


def test_without_o_tmpfile_a_name_that_cannot_be_removed_closes_its_descriptor(
        no_tmpfile: NoTmpfile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name the broker could not remove is never written through: the descriptor is
    closed and the writer fails (``INTERNAL``), before any byte."""
    before = _open_fds()

    def refused(path: Any, *, dir_fd: int | None = None) -> None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(onnx_canonical.os, "unlink", refused)
    assert _refused_at_begin(tmp_path).reason is Reason.INTERNAL
    assert no_tmpfile.seen_at_write == []
    assert _open_fds() == before


def test_o_tmpfile_refused_for_another_reason_is_not_a_fallback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only "this filesystem has no O_TMPFILE" makes a name: a full disk or a denied
    directory fails the job (``SPOOL_FULL`` / ``INTERNAL``) and creates nothing."""
    fake = NoTmpfile(tmp_path, errno.ENOSPC)
    monkeypatch.setattr(onnx_canonical.os, "open", fake.open)
    assert _refused_at_begin(tmp_path).reason is Reason.SPOOL_FULL
    assert fake.created == [] and os.listdir(tmp_path) == []

"""The fast path's copies: the hash is of exactly the bytes spooled; limits as for streaming."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock_broker import local_io
from airlock_broker.errors import AirlockError
from airlock_broker.intake import IntakeLimits

LIMITS = IntakeLimits(max_artifact_bytes=1 << 20, max_chunk_bytes=1 << 20, idle_seconds=60)


def _spool(tmp_path: Path, data: bytes, meta: pb.ConvertMetadata,
           limits: IntakeLimits = LIMITS) -> tuple[str, bytes]:
    (tmp_path / "in").write_bytes(data)
    src = os.open(tmp_path / "in", os.O_RDONLY)
    dst = os.open(tmp_path / "spool", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        spooled = local_io.spool_from_fd(src, dst, meta, limits)  # closes dst
    finally:
        os.close(src)
    return spooled.sha256, (tmp_path / "spool").read_bytes()


def test_spooled_bytes_and_hash_match_the_input_across_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_io, "BLOCK_BYTES", 4096)  # many blocks, both buffers in turn
    data = os.urandom(4096 * 9 + 17)
    sha, spooled = _spool(tmp_path, data, pb.ConvertMetadata(size_bytes=len(data)))
    assert spooled == data and sha == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("data", "meta", "reason"), [
    (b"x" * ((1 << 20) + 1), pb.ConvertMetadata(), "TOO_LARGE"),
    (b"x" * 100, pb.ConvertMetadata(size_bytes=50), "TOO_LARGE"),
    (b"x" * 100, pb.ConvertMetadata(size_bytes=200), "CHECKSUM_MISMATCH"),
    (b"x" * 100, pb.ConvertMetadata(sha256="0" * 64), "CHECKSUM_MISMATCH"),
    (b"", pb.ConvertMetadata(), "EMPTY_ARTIFACT"),
])
def test_the_streaming_paths_limits_apply(tmp_path: Path, data: bytes,
                                          meta: pb.ConvertMetadata, reason: str) -> None:
    with pytest.raises(AirlockError) as refused:
        _spool(tmp_path, data, meta)
    assert refused.value.reason.value == reason


def test_copy_writes_the_whole_file_at_explicit_offsets(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT)
    try:
        os.lseek(dst, 5000, os.SEEK_SET)  # the peer's offset is not used
        local_io.copy_file(src, dst, len(data))
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes() == data

"""The canonical form of a validated safetensors file, and reading it.

What validation hands back (safetensors_check.py) is *canonical*: the original data section
behind a header we wrote ourselves (compact JSON, sorted keys, capped metadata, padded with
spaces to 8 bytes like the reference writer), so no byte of the original header reaches a
caller. This module writes that header and streams, hashes and compares canonical files in
fixed-size blocks, each time checking that the file is still the one validation saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from airlock_broker.errors import Reason, error
from airlock_broker.validation.files import open_regular_file

METADATA_KEY = "__metadata__"
PREFIX_BYTES = 8
#: The reference writer pads the header with spaces so the data section starts 8-aligned.
ALIGNMENT = 8
HASH_BLOCK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class FileIdentity:
    """Enough of a file's stat to notice that it changed between validation and streaming.
    The ctime too: the file's owner (the sandbox's uid) can set its mtime back with
    ``utime``, but not its ctime, which that very call moves."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int = 0

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        """The identity of the file ``st`` describes."""
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class SafetensorsInfo:
    """What validation learned, and everything needed to stream the canonical file."""

    tensor_count: int
    #: Size of the data section (sum of all tensors' byte lengths).
    data_bytes: int
    dtypes: frozenset[str]
    #: ``__metadata__`` as kept in the canonical header (``None`` if absent or dropped).
    metadata: Mapping[str, str] | None
    #: Why the original ``__metadata__`` was left out of the canonical header, if it was.
    metadata_dropped: str | None
    #: Where the data section starts in the *original* file (8 + its header length).
    source_data_offset: int
    source: FileIdentity
    #: The 8-byte length prefix and the padded canonical JSON header.
    canonical_header: bytes
    canonical_size: int
    canonical_sha256: str
    #: :func:`names_digest` of the tensor names (signed into provenance, so that an index of
    #: several files can later be checked against them without reading a file again).
    names_sha256: str = ""


def names_digest(names: Iterable[str]) -> str:
    """The sha256 of a set of tensor names: of their sorted JSON list (names may hold any
    character, so no separator would do)."""
    listed = json.dumps(sorted(names), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(listed.encode("utf-8", "surrogatepass")).hexdigest()


def with_digest(path: Path, info: SafetensorsInfo) -> SafetensorsInfo:
    """``info`` with the canonical sha256 of the file it describes (still the same file)."""
    hasher = hashlib.sha256()
    for chunk in iter_canonical(path, info, rehash=False):
        hasher.update(chunk)
    return replace(info, canonical_sha256=hasher.hexdigest())


def canonical_and_data_digests(path: Path, info: SafetensorsInfo) -> tuple[str, str]:
    """The sha256 of the canonical file ``info`` describes and that of its data section alone,
    in one read: the data is hashed twice, on two threads (hashlib releases the GIL), so two
    cores make it about as fast as one hash. The file must still be the one ``info`` describes.
    """
    handle, st = open_regular_file(path)
    with handle, ThreadPoolExecutor(1, thread_name_prefix="airlock-hash") as other:
        if FileIdentity.of(st) != info.source:
            raise error(Reason.OUTPUT_INVALID, "output changed after it was validated")
        whole, data = hashlib.sha256(info.canonical_header), hashlib.sha256()
        done = 0
        while done < info.data_bytes:
            n = min(info.data_bytes - done, HASH_BLOCK_BYTES)
            block = os.pread(handle.fileno(), n, info.source_data_offset + done)
            if len(block) != n:
                raise error(Reason.OUTPUT_INVALID, "output shrank after it was validated")
            beside = other.submit(data.update, block)
            whole.update(block)
            beside.result()
            done += n
    return whole.hexdigest(), data.hexdigest()


def same_canonical(path: Path, info: SafetensorsInfo, other_path: Path,
                   other: SafetensorsInfo) -> bool:
    """Whether two validated files have the same canonical form: the same canonical header
    and byte-equal data sections, both files still the ones their infos describe. Comparing
    (two reads and a memcmp) is cheaper than hashing, so a file proved identical to one already
    hashed takes that digest instead of being hashed again."""
    if info.canonical_header != other.canonical_header or info.data_bytes != other.data_bytes:
        return False
    mine, st = open_regular_file(path)
    theirs, other_st = open_regular_file(other_path)
    with mine, theirs:
        if FileIdentity.of(st) != info.source or FileIdentity.of(other_st) != other.source:
            raise error(Reason.OUTPUT_INVALID, "output changed after it was validated")
        a, b = bytearray(HASH_BLOCK_BYTES), bytearray(HASH_BLOCK_BYTES)
        done = 0
        while done < info.data_bytes:
            n = min(info.data_bytes - done, HASH_BLOCK_BYTES)
            got_a = os.preadv(mine.fileno(), [memoryview(a)[:n]], info.source_data_offset + done)
            got_b = os.preadv(theirs.fileno(), [memoryview(b)[:n]],
                              other.source_data_offset + done)
            if got_a != n or got_b != n:
                raise error(Reason.OUTPUT_INVALID, "output shrank after it was validated")
            # bytearray equality is a memcmp; memoryview equality goes element by element.
            if (a != b) if n == HASH_BLOCK_BYTES else (a[:n] != b[:n]):
                return False
            done += n
    return True


def iter_canonical(
    path: Path, info: SafetensorsInfo, chunk_size: int = HASH_BLOCK_BYTES, *,
    rehash: bool = True,
) -> Iterator[bytes]:
    """Yield the canonical file in chunks of at most ``chunk_size`` bytes.

    The file must still be the one ``info`` describes (same inode, size and mtime); the bytes
    streamed are hashed on the way and a mismatch with ``info.canonical_sha256`` raises
    ``OUTPUT_INVALID`` at the end, so a caller that relays chunks must abort on that error.
    ``rehash=False`` skips that second hash for callers whose receiver checks the sha256.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    handle, st = open_regular_file(path)
    with handle:
        if FileIdentity.of(st) != info.source:
            raise error(Reason.OUTPUT_INVALID, "output changed after it was validated")
        digest = hashlib.sha256()
        for chunk in stream_canonical(handle, info.canonical_header, info.source_data_offset,
                             info.data_bytes, chunk_size):
            if rehash:
                digest.update(chunk)
            yield chunk
        if rehash and digest.hexdigest() != info.canonical_sha256:
            raise error(Reason.OUTPUT_INVALID, "output changed while it was streamed")


def canonical_header_bytes(
    tensors: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, str] | None
) -> bytes:
    """The length prefix plus compact, key-sorted JSON padded with spaces to 8-byte alignment."""
    doc: dict[str, Any] = {
        name: {
            "dtype": entry["dtype"],
            "shape": list(entry["shape"]),
            "data_offsets": list(entry["data_offsets"]),
        }
        for name, entry in tensors.items()
    }
    if metadata is not None:
        doc[METADATA_KEY] = dict(metadata)
    # ensure_ascii=False is safe: every string was checked to be encodable (no lone surrogates).
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    body += b" " * (-len(body) % ALIGNMENT)
    return struct.pack("<Q", len(body)) + body


def stream_canonical(
    handle: BinaryIO, header: bytes, data_offset: int, data_len: int, chunk_size: int
) -> Iterator[bytes]:
    """The canonical header, then ``data_len`` bytes of the original from ``data_offset``."""
    for start in range(0, len(header), chunk_size):
        yield header[start : start + chunk_size]
    handle.seek(data_offset)
    remaining = data_len
    while remaining > 0:
        chunk = handle.read(min(chunk_size, remaining))
        if not chunk:
            raise error(Reason.OUTPUT_INVALID, "output shrank while it was read")
        remaining -= len(chunk)
        yield chunk

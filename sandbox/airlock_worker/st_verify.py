"""Check a safetensors file the worker just wrote against what it meant to write, in place.

Reading it back through ``safe_open(...).get_tensor`` copies every tensor, and comparing the
copies with ``torch.equal`` on uint8 views is slow (byte-wise, one CPU): 350 ms of S3's
400 MiB, measured in the sandbox image. Here the file is mapped read-only instead; the header
is parsed with the strict JSON reader the broker uses; names, dtypes, shapes, offsets (which
must tile the data section exactly, as the format requires) and ``__metadata__`` are
compared; then every tensor's bytes are compared where they lie in the mapping, in chunks of
:data:`CHUNK` bytes, so the extra memory is one chunk's booleans whatever the tensor's size.
Raw bytes, never values: NaN != NaN and 0.0 == -0.0 would both mislead.

It proves the file holds what was meant, and catches honest bugs in the writer; a hostile
artifact controls this process and is the broker's validators' business, not this check's.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from airlock_sandbox.contract import WorkerExit
from airlock_sandbox.strict_json import StrictJSONError, loads_strict

from .errors import WorkerError

#: Bytes compared per step: large enough that the per-step overhead is noise, small enough
#: that the comparison's boolean scratch buffer stays small.
CHUNK = 4 * 1024 * 1024
#: safetensors' own header limit (MAX_HEADER_SIZE in the Rust crate).
MAX_HEADER_BYTES = 100_000_000
_PREFIX = 8


@dataclass(frozen=True)
class Meant:
    """One tensor as it was meant to be written: safetensors dtype code, shape, and a 1-D
    uint8 view of its bytes (a view, not a copy)."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray


def verify(path: str, meant: dict[str, Meant], metadata: dict[str, str] | None) -> None:
    """Raise CONVERSION_FAILED unless ``path`` holds exactly ``meant`` (and ``metadata``)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < _PREFIX:
            problem: str | None = "the written file is shorter than its length prefix"
        else:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                # Every view of the mapping lives inside _check's frame and is gone when it
                # returns, so the mapping can close (a live view would make close() fail).
                problem = _check(mapped, size, meant, metadata)
    if problem is not None:
        raise WorkerError(WorkerExit.CONVERSION_FAILED, problem)


def _check(mapped: mmap.mmap, size: int, meant: dict[str, Meant],
           metadata: dict[str, str] | None) -> str | None:
    (header_len,) = struct.unpack_from("<Q", mapped, 0)
    if header_len > min(MAX_HEADER_BYTES, size - _PREFIX):
        return "the written file's header length is out of range"
    try:
        header = loads_strict(mapped[_PREFIX:_PREFIX + header_len].decode("utf-8"), padding=" ")
    except (UnicodeDecodeError, StrictJSONError) as exc:
        return f"the written file's header is not valid JSON: {exc}"
    if not isinstance(header, dict):
        return "the written file's header is not a JSON object"
    if header.pop("__metadata__", None) != metadata:
        return "written metadata differs from the input"
    if set(header) != set(meant):
        return "written names differ from the input"
    data_len = size - _PREFIX - header_len
    spans: list[tuple[int, int]] = []
    for name, want in meant.items():
        span = _span(header[name], want)
        if span is None:
            return f"tensor {name!r} does not match after writing (dtype, shape or size)"
        spans.append(span)
    if not _tiles(spans, data_len):
        return "the written tensors do not tile the data section"
    data = np.frombuffer(mapped, dtype=np.uint8, offset=_PREFIX + header_len)
    scratch = np.empty(min(CHUNK, max((m.data.size for m in meant.values()), default=0)),
                       dtype=bool)
    for (begin, end), (name, want) in zip(spans, meant.items(), strict=True):
        if not _same_bytes(data[begin:end], want.data, scratch):
            return f"tensor {name!r} does not match after writing (bytes differ)"
    return None


def _span(entry: Any, want: Meant) -> tuple[int, int] | None:
    """The entry's ``[begin, end)`` if its dtype, shape and size are the ones meant."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return None
    shape, offsets = entry["shape"], entry["data_offsets"]
    if entry["dtype"] != want.dtype or not _ints(shape) or tuple(shape) != want.shape:
        return None
    if not _ints(offsets) or len(offsets) != 2:
        return None
    begin, end = offsets
    if end - begin != want.data.size:
        return None
    return begin, end


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _tiles(spans: list[tuple[int, int]], data_len: int) -> bool:
    """Sorted, the spans start at 0, follow each other without gap or overlap and end at the
    end of the file (safe_open refuses anything else; we no longer call it)."""
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            return False
        pos = end
    return pos == data_len


def _same_bytes(got: np.ndarray, want: np.ndarray, scratch: np.ndarray) -> bool:
    if got.size != want.size:
        return False
    for start in range(0, got.size, CHUNK):
        stop = min(start + CHUNK, got.size)
        out = scratch[:stop - start]
        np.equal(got[start:stop], want[start:stop], out=out)
        if not out.all():
            return False
    return True

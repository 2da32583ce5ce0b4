"""A safetensors file's header, read on the client without the safetensors package, and the
``model.safetensors.index.json`` built from the headers of validated shards.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, ``data_offsets``; an optional ``__metadata__`` map of strings), then the data.
The files read here were validated by the broker and matched their signed sha256, so a
header that does not read is an integrity failure, not a user's mistake. It is still parsed
strictly and under a cap: the client trusts no header it did not check.

De-duplicated names: the sandbox keeps one name of each group of tensors that are the same
view of one storage (tied embeddings) and records each removed name -> kept name in
``__metadata__``, as Hugging Face's ``convert.py`` does; :attr:`ShardHeader.deduplicated` is
that map, restricted to entries that name a kept tensor and are not tensors themselves.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from airlock_client._errors import IntegrityError
from airlock_sandbox.formats import SAFETENSORS_MAX_HEADER_BYTES
from airlock_sandbox.strict_json import StrictJSONError, loads_strict

METADATA = "__metadata__"
#: The most a broker may allow (its ``OutputLimits`` cap, 16 MiB unless raised, is at most
#: this): a signed shard whose header a broker allowed is read, whatever that broker's cap.
MAX_HEADER_BYTES = SAFETENSORS_MAX_HEADER_BYTES


@dataclass(frozen=True)
class ShardHeader:
    #: Tensor names in the file, sorted.
    tensors: tuple[str, ...]
    #: Bytes of tensor data (what ``metadata.total_size`` sums).
    data_bytes: int
    #: Removed name -> kept name, for tensors stored once under the kept name.
    deduplicated: Mapping[str, str] = field(default_factory=dict)


def read_header(path: str | os.PathLike[str]) -> ShardHeader:
    """Read and check the header of the safetensors file at ``path``."""
    name = Path(path).name
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise _bad(name, "shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise _bad(name, f"its header length {length} exceeds the file or the "
                       f"{MAX_HEADER_BYTES}-byte cap")
        raw = fh.read(length)
    try:
        doc = loads_strict(raw.decode("utf-8"), padding=" ")
    except (UnicodeDecodeError, StrictJSONError) as exc:
        raise _bad(name, f"its header is not strict JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise _bad(name, "its header is not an object")
    metadata = doc.pop(METADATA, None) or {}
    if not isinstance(metadata, dict):
        raise _bad(name, f"its {METADATA} is not an object")
    data_bytes = 0
    for tensor, spec in doc.items():
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise _bad(name, f"tensor {tensor[:80]!r} has no valid data_offsets")
        data_bytes += offsets[1] - offsets[0]
    if 8 + length + data_bytes != size:
        raise _bad(name, f"its tensors hold {data_bytes} bytes but the file has "
                   f"{size - 8 - length} after the header")
    deduplicated = {str(removed): kept for removed, kept in metadata.items()
                    if isinstance(kept, str) and kept in doc and removed not in doc}
    return ShardHeader(tuple(sorted(doc)), data_bytes, deduplicated)


def index_document(shards: Sequence[tuple[str, ShardHeader]]) -> bytes:
    """``model.safetensors.index.json`` for these (file name, header) pairs.

    ``weight_map`` maps every tensor stored in a file to that file and nothing else, so the
    index agrees with the files; the names stored once for several are listed under
    ``metadata.deduplicated`` (removed -> kept), beside ``total_size``."""
    weight_map: dict[str, str] = {}
    deduplicated: dict[str, str] = {}
    for filename, header in shards:
        for tensor in header.tensors:
            if tensor in weight_map:
                raise IntegrityError(f"tensor {tensor[:80]!r} is in both {weight_map[tensor]} "
                                     f"and {filename}")
            weight_map[tensor] = filename
        deduplicated.update(header.deduplicated)
    doc = {"metadata": {"total_size": sum(h.data_bytes for _, h in shards),
                        "deduplicated": dict(sorted(deduplicated.items()))},
           "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _bad(name: str, why: str) -> IntegrityError:
    return IntegrityError(f"the converted shard {name} is not readable safetensors: {why}")

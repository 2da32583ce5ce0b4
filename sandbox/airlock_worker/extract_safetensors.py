"""The integrity extraction's safetensors file (:mod:`.extract`), written by hand: its data
laid out exactly as ``safetensors`` 0.8 lays it out, its header the broker's canonical form
(validation/safetensors_canonical.py), after the converter's storable-dtype filter and same-view
dedupe (``st_torch``, which needs torch) mirrored without torch."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import struct
from typing import Any

from airlock_sandbox.contract import WorkerExit

from . import output
from .errors import WorkerError
from .extract_errors import Refused, Unextractable
from .extract_stand_ins import Tensor

_WRITE_CHUNK = 64 * 1024**2

#: ``safetensors`` writes tensors sorted by its Dtype enum, largest first, then by name.
#: Ascending enum order (safetensors 0.8), measured on the reference writer.
_ST_RANK = {name: rank for rank, name in enumerate([
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
    "F64", "I64", "U64",
])}


# -- st_torch.prepare without torch ---------------------------------------------------------


def prepare(tensors: dict[str, Tensor], warn: Any) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Mirror of ``st_torch.prepare``: storable dtypes, same-view aliases removed (removed ->
    kept in the metadata). Other views of a shared storage stay: the converter clones them,
    which changes no byte."""
    ready: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if t.dtype.st is None:
            warn(f"skipped {name}: dtype {t.dtype} cannot be stored in safetensors")
            continue
        ready[name] = t
    removed = _dedupe(ready)
    return ready, {"format": "pt", **removed}


def _dedupe(tensors: dict[str, Tensor]) -> dict[str, str]:
    """Mirror of ``st_torch._dedupe``: names grouped by storage (non-empty ones), the
    alphabetically first of each same view kept. Mutates ``tensors``."""
    by_storage: dict[int, list[str]] = collections.defaultdict(list)
    for name in sorted(tensors):
        t = tensors[name]
        if t.storage.nbytes:
            by_storage[id(t.storage)].append(name)
    removed: dict[str, str] = {}
    for names in by_storage.values():
        if len(names) < 2:
            continue
        views: dict[tuple[Any, ...], str] = {}
        for name in names:
            key = tensors[name].view_key
            if key in views:
                removed[name] = views[key]
                del tensors[name]
            else:
                views[key] = name
    return removed


# -- the safetensors writer ------------------------------------------------------------------


def _st_shape(t: Tensor) -> list[int]:
    if t.dtype.st == "F4":  # two fp4 values per byte: safetensors counts values
        if not t.shape:
            raise Unextractable("a 0-dim float4_e2m1fn_x2 tensor cannot be stored")
        return [*t.shape[:-1], t.shape[-1] * 2]
    return list(t.shape)


def header_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The header in the broker's canonical form (compact JSON, keys sorted, padded with
    spaces to 8 bytes) over the data in the order ``safetensors`` writes it, and the names in
    that order."""
    if "__metadata__" in tensors:
        raise Refused("a tensor is named __metadata__")
    order = sorted(tensors, key=lambda n: (-_ST_RANK[str(tensors[n].dtype.st)], n))
    doc: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        doc[name] = {"dtype": t.dtype.st, "shape": _st_shape(t),
                     "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    try:
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":"),
                         ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Refused("a tensor name is not valid UTF-8") from None
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def write_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str], path: str,
                      max_bytes: int, *, digest_only: bool = False,
                      in_place: bool = False) -> tuple[int, str]:
    """Write, then read the header back and check the size. Returns the tensor count and,
    with ``digest_only``, the sha256 of the data section, which is then not written: the
    file is its header and a hole as long as the data (JobSpec.data_digest_only).
    ``in_place``: ``path`` is the broker's empty append-only file, appended to from its
    first byte (JobSpec.output_in_place); otherwise it is created."""
    if not tensors:
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL, "the checkpoint contains no tensors")
    data_bytes = sum(t.nbytes for t in tensors.values())
    output.check_size(data_bytes, max_bytes)
    header, order = header_bytes(tensors, metadata)
    output.check_size(len(header) + data_bytes, max_bytes)
    digest = hashlib.sha256() if digest_only else None
    with open(path, "ab" if in_place else "xb") as f:
        f.write(header)
        for name in order:
            written = 0
            for chunk in tensors[name].chunks():
                for at in range(0, len(chunk), _WRITE_CHUNK):
                    piece = chunk[at:at + _WRITE_CHUNK]
                    if digest is None:
                        written += f.write(piece)
                    else:
                        digest.update(piece)
                        written += len(piece)
            if written != tensors[name].nbytes:
                raise Refused(f"tensor {name[:80]!r}: wrote {written} bytes, "
                              f"expected {tensors[name].nbytes}")
        if digest is not None:
            f.truncate(len(header) + data_bytes)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(len(header)) != header or size != len(header) + data_bytes:
            raise WorkerError(WorkerExit.CONVERSION_FAILED, "the written file does not match")
    return len(tensors), "" if digest is None else digest.hexdigest()

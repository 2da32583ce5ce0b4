"""A strict safetensors validator that reads the header only, and the canonical form it returns.

The file came out of a sandbox in which attacker code may have run, so the header is hostile
JSON (DESIGN §1.5). We are stricter than the reference parser wherever it is lenient (duplicate
keys, leading whitespace, unknown fields: research/conversion.md §5.2) and then ask it for a
second opinion. Tensor data is never loaded: outputs run to gigabytes and the broker's budget is
~150 MB, so hashing and streaming go through the file in fixed-size blocks.

What we hand back is *canonical* (safetensors_canonical.py): the same data section behind a
header we wrote ourselves, so no byte of the original header reaches a caller.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

from airlock_broker.errors import Reason, error
from airlock_broker.validation.files import describe_name, open_regular_file, read_upto
from airlock_broker.validation.header_budget import check_header_work
from airlock_broker.validation.limits import OutputLimits
from airlock_broker.validation.safetensors_canonical import (
    HASH_BLOCK_BYTES,
    METADATA_KEY,
    PREFIX_BYTES,
    FileIdentity,
    SafetensorsInfo,
    canonical_header_bytes,
    names_digest,
    stream_canonical,
)
from airlock_sandbox.strict_json import StrictJSONError, loads_strict

#: Bytes per element. Sub-byte (F4, F6_*) and exotic 8-bit (F8_E8M0, *FNUZ) dtypes are left
#: out: no converter of ours writes them, and readers disagree about them.
DTYPE_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
        "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
        "I32": 4, "U32": 4, "F32": 4,
        "I64": 8, "U64": 8, "F64": 8, "C64": 8,
    }
)  # fmt: skip

#: Dims and offsets must fit the reference parser's ``usize`` and torch / numpy's int64.
_MAX_INT = 2**63 - 1
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def validate_safetensors(
    path: Path, limits: OutputLimits, *, second_opinion: bool = True, digest: bool = True
) -> SafetensorsInfo:
    """Validate a safetensors file from its header alone and describe its canonical form.

    Raises ``OUTPUT_INVALID`` for any structural fault and ``OUTPUT_TOO_LARGE`` when a cap is
    exceeded. With ``second_opinion`` the reference ``safetensors.safe_open`` must also accept
    the canonical header (metadata only); the library is a dependency, so ``ImportError``
    propagates if it is missing. The canonical sha256 is computed by streaming the data section;
    ``digest=False`` leaves it empty, for a caller that proves the file identical to one whose
    digest it has (:func:`same_canonical`) or hashes it later (:func:`with_digest`).
    """
    handle, st = open_regular_file(path)
    with handle:
        size = st.st_size
        if size > limits.max_output_bytes:
            raise error(Reason.OUTPUT_TOO_LARGE, f"output is {size} bytes, over the cap")
        header_len = _read_header_len(handle, size, limits)
        raw = read_upto(handle, header_len)
        if len(raw) != header_len:
            raise error(Reason.OUTPUT_INVALID, "file shrank while its header was read")
        data_len = size - PREFIX_BYTES - header_len
        tensors, metadata = _parse_header(raw, limits)
        del raw
        data_bytes = _check_layout(tensors, data_len, limits)
        kept, dropped = _cap_metadata(metadata, limits)
        header = canonical_header_bytes(tensors, kept)
        names = frozenset(tensors)
        dtypes = frozenset(entry["dtype"] for entry in tensors.values())
        # The parsed header costs several times its size; drop it before the reference parser
        # builds its own copy (a 16 MiB header must not cost the broker hundreds of MB).
        del tensors, metadata
        if second_opinion:
            _reference_accepts(header, len(header) + data_bytes, names, kept)
        sha256 = ""
        if digest:
            hasher = hashlib.sha256()
            for chunk in stream_canonical(handle, header, PREFIX_BYTES + header_len, data_bytes,
                                 HASH_BLOCK_BYTES):
                hasher.update(chunk)
            sha256 = hasher.hexdigest()
    return SafetensorsInfo(
        tensor_count=len(names),
        data_bytes=data_bytes,
        dtypes=dtypes,
        metadata=None if kept is None else MappingProxyType(dict(kept)),
        metadata_dropped=dropped,
        source_data_offset=PREFIX_BYTES + header_len,
        source=FileIdentity.of(st),
        canonical_header=header,
        canonical_size=len(header) + data_bytes,
        canonical_sha256=sha256,
        names_sha256=names_digest(names),
    )


def _read_header_len(handle: BinaryIO, size: int, limits: OutputLimits) -> int:
    prefix = read_upto(handle, PREFIX_BYTES)
    if len(prefix) != PREFIX_BYTES:
        raise error(Reason.OUTPUT_INVALID, "file is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len < 2:  # the smallest header is "{}"
        raise error(Reason.OUTPUT_INVALID, f"header length {header_len} is too small")
    if header_len > size - PREFIX_BYTES:
        raise error(Reason.OUTPUT_INVALID, f"header length {header_len} runs past end of file")
    if header_len > limits.max_safetensors_header_bytes:
        raise error(
            Reason.OUTPUT_TOO_LARGE,
            f"header is {header_len} bytes, over the {limits.max_safetensors_header_bytes} cap",
        )
    return int(header_len)


def _encodable(text: str) -> bool:
    # JSON escapes can smuggle lone surrogates into a Python str; serde_json refuses them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) and _encodable(k) and _encodable(v)
        for k, v in value.items()
    )


def _parse_header(
    raw: bytes, limits: OutputLimits
) -> tuple[dict[str, dict[str, Any]], dict[str, str] | None]:
    """Strict JSON decode, then the shape of every entry. Returns (tensors, metadata)."""
    # The spec says the header MUST begin with '{'; the reference parser skips whitespace.
    if raw[:1] != b"{":
        raise error(Reason.OUTPUT_INVALID, "header does not begin with '{'")
    check_header_work(raw, limits)  # before a single object is built from it
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(Reason.OUTPUT_INVALID, "header is not valid UTF-8") from None
    try:
        doc = loads_strict(text, padding=" ")
    except StrictJSONError as exc:
        raise error(Reason.OUTPUT_INVALID, f"header is not strict JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise error(Reason.OUTPUT_INVALID, "header is not a JSON object")

    metadata = doc.pop(METADATA_KEY, None)
    if metadata is not None and not _is_string_map(metadata):
        raise error(Reason.OUTPUT_INVALID, "__metadata__ is not a map of strings to strings")
    if len(doc) > limits.max_tensors:
        raise error(
            Reason.OUTPUT_TOO_LARGE, f"{len(doc)} tensors, over the {limits.max_tensors} cap"
        )
    for name, entry in doc.items():
        _check_name(name, limits)
        _check_entry(name, entry, limits)
    return doc, metadata


def _check_name(name: str, limits: OutputLimits) -> None:
    shown = describe_name(name)
    if not name:
        raise error(Reason.OUTPUT_INVALID, "empty tensor name")
    if len(name) > limits.max_tensor_name_len:
        raise error(Reason.OUTPUT_INVALID, f"tensor name {shown} is over the length cap")
    # isprintable() is False for control characters, NUL, line/paragraph separators and lone
    # surrogates: names end up in logs and UIs, and third-party loaders have used them as paths.
    if not name.isprintable():
        raise error(Reason.OUTPUT_INVALID, f"tensor name {shown} has unprintable characters")
    if name.startswith("__"):
        raise error(Reason.OUTPUT_INVALID, f"tensor name {shown} uses the reserved '__' prefix")


def _is_int(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_INT  # bool and float are refused


def _check_entry(name: str, entry: Any, limits: OutputLimits) -> None:
    shown = describe_name(name)
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise error(
            Reason.OUTPUT_INVALID,
            f"tensor {shown} must have exactly the keys dtype, shape, data_offsets",
        )
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise error(Reason.OUTPUT_INVALID, f"tensor {shown} has an unsupported dtype")
    shape = entry["shape"]
    if isinstance(shape, list) and len(shape) > limits.max_tensor_rank:
        raise error(Reason.OUTPUT_INVALID, f"tensor {shown} has too many dims")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise error(Reason.OUTPUT_INVALID, f"tensor {shown} shape is not a list of dims >= 0")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise error(
            Reason.OUTPUT_INVALID, f"tensor {shown} data_offsets are not [begin, end], begin<=end"
        )


def _byte_length(shape: list[int], itemsize: int, bound: int) -> int | None:
    """prod(shape) * itemsize, or None once it exceeds ``bound`` (stops huge products early)."""
    if 0 in shape:
        return 0
    total = itemsize
    for dim in shape:
        total *= dim
        if total > bound:
            return None
    return total


def _check_layout(
    tensors: Mapping[str, Mapping[str, Any]], data_len: int, limits: OutputLimits
) -> int:
    """Each tensor's byte length matches its shape; together they tile the data section."""
    for name, entry in tensors.items():
        begin, end = entry["data_offsets"]
        expected = _byte_length(entry["shape"], DTYPE_SIZES[entry["dtype"]], data_len)
        if expected is None or expected != end - begin:
            raise error(
                Reason.OUTPUT_INVALID,
                f"tensor {describe_name(name)}: shape x dtype does not match its byte length",
            )
    # Sorted by offsets, each tensor must start where the previous ended: no holes (polyglot
    # room) and no overlaps (many tensors over one region was a known DoS).
    position = 0
    for begin, end in sorted(tuple(e["data_offsets"]) for e in tensors.values()):
        if begin != position:
            what = "hole before" if begin > position else "overlap at"
            raise error(Reason.OUTPUT_INVALID, f"tensor data has a {what} offset {begin}")
        position = end
    if position != data_len:
        what = "trailing bytes after" if position < data_len else "offsets past"
        raise error(Reason.OUTPUT_INVALID, f"{what} the end of the data section")
    return position


def _cap_metadata(
    metadata: dict[str, str] | None, limits: OutputLimits
) -> tuple[dict[str, str] | None, str | None]:
    """Metadata is free text: keep it only within the caps, otherwise drop it and say why."""
    if metadata is None:
        return None, None
    if len(metadata) > limits.max_metadata_entries:
        return None, f"{len(metadata)} entries, over the {limits.max_metadata_entries} cap"
    cap = limits.max_metadata_value_len
    if any(len(k) > cap or len(v) > cap for k, v in metadata.items()):
        return None, f"a key or value is over the {cap}-character cap"
    # Like tensor names: metadata ends up in logs, terminals and UIs (ANSI escapes, CR/LF log
    # injection, bidi overrides).
    if not all(k.isprintable() and v.isprintable() for k, v in metadata.items()):
        return None, "a key or value has control or other unprintable characters"
    return metadata, None


def _reference_accepts(
    header: bytes,
    total_size: int,
    names: frozenset[str],
    metadata: Mapping[str, str] | None,
) -> None:
    """Ask safetensors' own parser about the canonical header, reading no tensor data.

    It reads a sparse stand-in file (our header, then a hole as long as the data section), so
    what it judges is exactly what a caller will receive, and nothing is copied. The stand-in
    is a memfd: it has no name in any directory, so nobody else can open, replace or watch
    it, and a broker killed mid-check leaves nothing behind (a named file in the system's
    temporary directory did both).
    """
    from safetensors import safe_open  # a dependency: ImportError here is our bug

    with os.fdopen(os.memfd_create("airlock-st-stand-in", os.MFD_CLOEXEC), "r+b") as stand_in:
        stand_in.write(header)
        stand_in.truncate(total_size)
        stand_in.flush()
        try:
            # The broker's own descriptor, opened again through the link /proc made for it.
            with safe_open(f"/proc/self/fd/{stand_in.fileno()}", framework="numpy") as reader:
                seen_names = frozenset(reader.keys())
                seen_metadata = reader.metadata()
        except Exception as exc:  # SafetensorError, or anything else it throws at a bad header
            raise error(
                Reason.OUTPUT_INVALID, f"safetensors refused the header: {str(exc)[:200]}"
            ) from None
    if seen_names != names or (seen_metadata or None) != (dict(metadata) if metadata else None):
        raise error(Reason.OUTPUT_INVALID, "safetensors reads the header differently")

"""Integrity verification for PyTorch weights (DESIGN §5): beyond format safety.

The conversion ran in a sandbox where the artifact could execute code and tamper with the
converter ("Silent Sabotage"). A second, fresh sandbox reads the same checkpoint with a
pickle reader that only accepts tensor-rebuild globals and calls nothing the artifact names.
When both outputs hold the same tensors, byte for byte, the result is *integrity-verified*;
when they differ the conversion is rejected; when the second reading is impossible the
result stays *format-safe only*. Both files have already passed the strict validator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from airlock_broker.validation.files import open_regular_file
from airlock_broker.validation.safetensors_canonical import SafetensorsInfo

_BLOCK = 1024 * 1024


def difference(converted: Path, conv: SafetensorsInfo, extracted: Path,
               ext: SafetensorsInfo) -> str | None:
    """None when both files hold the same tensors and metadata; else the first difference."""
    if conv.canonical_sha256 and conv.canonical_sha256 == ext.canonical_sha256:
        return None
    a, b = _entries(conv), _entries(ext)
    if a.pop("__metadata__", None) != b.pop("__metadata__", None):
        return "the metadata (tied-weight names) differs"
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:3]
        return f"the tensor names differ (e.g. {only})"
    with open_regular_file(converted)[0] as fa, open_regular_file(extracted)[0] as fb:
        for name in sorted(a):
            ea, eb = a[name], b[name]
            if (ea["dtype"], ea["shape"]) != (eb["dtype"], eb["shape"]):
                return f"tensor {name[:80]!r}: dtype or shape differs"
            if not _same_bytes(fa, conv.source_data_offset + ea["data_offsets"][0],
                               fb, ext.source_data_offset + eb["data_offsets"][0],
                               ea["data_offsets"][1] - ea["data_offsets"][0]):
                return f"tensor {name[:80]!r}: values differ"
    return None


def _entries(info: SafetensorsInfo) -> dict[str, Any]:
    # The canonical header was produced by the broker from a validated file.
    doc: dict[str, Any] = json.loads(info.canonical_header[8:])
    return doc


def _same_bytes(fa: Any, offset_a: int, fb: Any, offset_b: int, length: int) -> bool:
    fa.seek(offset_a)
    fb.seek(offset_b)
    while length > 0:
        n = min(_BLOCK, length)
        if fa.read(n) != fb.read(n):
            return False
        length -= n
    return True

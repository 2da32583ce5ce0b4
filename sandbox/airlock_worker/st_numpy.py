"""numpy arrays -> safetensors, read back and compared by dtype, shape and raw bytes.

Used for ``.npy``/``.npz`` files, pickled dicts of arrays and ONNX initializers, so the
light profile never has to import torch."""

from __future__ import annotations

from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from airlock_sandbox.contract import WorkerExit

from .errors import WorkerError
from .output import check_size

#: What ``safetensors.numpy`` can store (it has no bf16/fp8: those arrive via torch).
_STORABLE_KINDS = frozenset("biuf")
_STORABLE_COMPLEX = frozenset({np.dtype("complex64")})


def is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype != object


def prepare(arrays: dict[str, Any], warn: Any) -> dict[str, np.ndarray]:
    """Little-endian, C-contiguous arrays of storable dtypes; anything else is refused."""
    ready: dict[str, np.ndarray] = {}
    refused: list[str] = []
    for name, arr in arrays.items():
        dtype = arr.dtype
        if dtype.kind not in _STORABLE_KINDS and dtype not in _STORABLE_COMPLEX:
            refused.append(f"{name} ({dtype})")
            continue
        if dtype.byteorder == ">":  # safetensors is little-endian; the values are unchanged
            warn(f"{name}: converted from big-endian {dtype}")
            arr = arr.astype(dtype.newbyteorder("<"))
        ready[name] = np.ascontiguousarray(arr)
    if refused:
        raise WorkerError(
            WorkerExit.UNSUPPORTED_MODEL,
            "dtypes safetensors cannot store: " + ", ".join(refused[:10]),
        )
    return ready


def write_verified(
    arrays: dict[str, np.ndarray], path: str, max_bytes: int,
    metadata: dict[str, str] | None = None, *, read_back: bool = True,
) -> int:
    """Save, read back, compare bytes (``read_back``: unless the broker compares the file with
    an independent reading, JobSpec.read_back). Returns the number of tensors written."""
    if not arrays:
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL, "no arrays to convert")
    check_size(sum(a.nbytes for a in arrays.values()), max_bytes)
    save_file(arrays, path, metadata=metadata)
    if not read_back:
        return len(arrays)
    with safe_open(path, framework="numpy") as f:
        if set(f.keys()) != set(arrays):
            raise WorkerError(WorkerExit.CONVERSION_FAILED, "written names differ from the input")
        for name, want in arrays.items():
            got = f.get_tensor(name)
            same = got.dtype == want.dtype and got.shape == want.shape
            if not same or got.tobytes() != want.tobytes():
                raise WorkerError(
                    WorkerExit.CONVERSION_FAILED, f"array {name!r} does not match after reload"
                )
    return len(arrays)

"""torch tensors -> safetensors, with HF convert semantics made exact:

* shared storage: names that are *the same view* of one storage are deduplicated (the
  removed -> kept mapping goes into ``__metadata__`` so loaders can re-tie them); names that
  are different views of one storage (a slice beside the whole) are cloned, because
  mapping a slice onto the whole, as ``_remove_duplicate_names`` would, changes the weights;
* everything is made contiguous;
* after writing, the file is checked in place against every kept tensor: names, dtypes,
  shapes, ``__metadata__`` and raw bytes (:mod:`.st_verify`; not ``torch.equal``: NaN != NaN
  and 0.0 == -0.0 would both mislead)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from safetensors.torch import save_file

from airlock_sandbox.contract import WorkerExit

from .errors import WorkerError
from .output import check_size
from .st_verify import Meant, verify

#: dtypes safetensors cannot store; converting them would change the weights silently.
_REFUSED = {torch.complex128, torch.complex32}

#: safetensors' dtype codes (its format spec), written out here rather than taken from the
#: writer's own table so that the check after writing does not trust the writer.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2: "F8_E5M2", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}


def is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def module_state(value: Any) -> dict[str, Any] | None:
    """Lets :func:`tensor_tree.flatten` descend into an ``nn.Module`` found in a checkpoint."""
    return value.state_dict() if isinstance(value, torch.nn.Module) else None


def prepare(tensors: dict[str, Any], warn: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Storable, contiguous, non-aliased tensors plus the ``__metadata__`` to save with them."""
    ready: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        usable = _storable(name, t, warn)
        if usable is not None:
            ready[name] = usable
    removed = _dedupe(ready)
    metadata = {"format": "pt", **removed}
    return {k: v.contiguous() for k, v in ready.items()}, metadata


def _storable(name: str, t: torch.Tensor, warn: Any) -> torch.Tensor | None:
    if t.device.type == "meta":
        warn(f"skipped {name}: meta tensor has no data")
        return None
    if t.is_quantized or t.dtype in _REFUSED:
        warn(f"skipped {name}: dtype {t.dtype} cannot be stored in safetensors")
        return None
    if t.layout != torch.strided:
        warn(f"densified {name}: {t.layout} tensor stored dense")
        t = t.to_dense()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.detach()


def _view_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def _dedupe(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Mutates ``tensors`` in place; returns removed -> kept."""
    by_storage: dict[tuple[str, int], list[str]] = defaultdict(list)
    for name in sorted(tensors):
        t = tensors[name]
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr():
            by_storage[(t.device.type, storage.data_ptr())].append(name)
    removed: dict[str, str] = {}
    for names in by_storage.values():
        if len(names) < 2:
            continue
        views: dict[tuple[Any, ...], str] = {}
        for name in names:  # sorted: the alphabetically first alias is kept, as HF does
            key = _view_key(tensors[name])
            if key in views:
                removed[name] = views[key]
                del tensors[name]
            else:
                views[key] = name
        kept = sorted(views.values(), key=lambda n: (not _is_whole(tensors[n]), n))
        for name in kept[1:]:  # other views of the same storage get storage of their own
            tensors[name] = tensors[name].clone()
    return removed


def _is_whole(t: torch.Tensor) -> bool:
    storage = t.untyped_storage()
    return t.data_ptr() == storage.data_ptr() and t.nbytes == storage.nbytes()


def write_verified(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str, max_bytes: int, *,
    read_back: bool = True,
) -> int:
    """Save, then (``read_back``: unless the broker compares the file with an independent
    reading, JobSpec.read_back) check the file in place against every tensor. Returns how
    many."""
    if not tensors:
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL, "the checkpoint contains no tensors")
    check_size(sum(t.nbytes for t in tensors.values()), max_bytes)
    save_file(tensors, path, metadata=metadata)
    if read_back:
        verify(path, {name: _meant(name, t) for name, t in tensors.items()}, metadata)
    return len(tensors)


def _meant(name: str, t: torch.Tensor) -> Meant:
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise WorkerError(WorkerExit.CONVERSION_FAILED,
                          f"tensor {name!r}: no safetensors code known for {t.dtype}")
    # A view of the tensor's own bytes (contiguous, on the CPU, detached: prepare() saw to it).
    return Meant(code, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy())

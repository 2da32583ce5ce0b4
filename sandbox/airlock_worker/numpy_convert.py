"""NUMPY / NUMPY_NPZ -> safetensors. ``numpy.load(allow_pickle=False)`` first; an object
array (which numpy can only unpickle) needs the policy's consent, and is converted only if
it holds arrays: a dict of arrays (``numpy.save(path, {...})``) or a sequence of arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from airlock_sandbox.contract import OutputFormat, WorkerExit

from . import st_numpy
from .errors import WorkerError
from .job import Job

SAFE_LOADER = "numpy.load(allow_pickle=False)"
PICKLE_LOADER = "numpy.load(allow_pickle=True)"


def _needs_pickle(exc: ValueError) -> bool:
    return "allow_pickle" in str(exc)


def convert_npy(job: Job) -> None:
    job.refuse_target(OutputFormat.ONNX, "a numpy array holds data, not a model")
    name = job.spec.inputs[0].name if len(job.spec.inputs) == 1 else "array"
    with job.loading():
        try:
            arrays = {name: np.load(job.artifact, allow_pickle=False)}
            job.loaded_safely(SAFE_LOADER)
        except ValueError as exc:
            if not _needs_pickle(exc):
                raise
            job.allow_code(PICKLE_LOADER, "the .npy file holds a pickled object array")
            arrays = _from_objects(job, name, np.load(job.artifact, allow_pickle=True))
    job.write_numpy_arrays(arrays, "safetensors.numpy")


def convert_npz(job: Job) -> None:
    job.refuse_target(OutputFormat.ONNX, "an .npz archive holds data, not a model")
    arrays: dict[str, Any] = {}
    pickled: list[str] = []
    with job.loading():
        with np.load(job.artifact, allow_pickle=False) as npz:
            for member in npz.files:
                try:
                    arrays[member] = npz[member]
                except ValueError as exc:
                    if not _needs_pickle(exc):
                        raise
                    pickled.append(member)
        if not pickled:
            job.loaded_safely(SAFE_LOADER)
        else:
            job.allow_code(PICKLE_LOADER, f"members {pickled[:5]} are pickled object arrays")
            with np.load(job.artifact, allow_pickle=True) as npz:
                for member in pickled:
                    arrays.update(_from_objects(job, member, npz[member]))
    job.write_numpy_arrays(arrays, "safetensors.numpy")


def _from_objects(job: Job, name: str, arr: np.ndarray) -> dict[str, Any]:
    """The arrays inside an object array, or UNSUPPORTED_MODEL naming what was found."""
    if arr.dtype != object:
        return {name: arr}
    if arr.shape == ():
        flat = job.flatten(arr.item(), st_numpy.is_array)
        job.note_flattened(flat)
        if flat.tensors:
            # A bare array inside the object is named after the file, not "tensor".
            return {name if k == "tensor" and len(flat.tensors) == 1 else k: v
                    for k, v in flat.tensors.items()}
    elif all(st_numpy.is_array(item) for item in arr.flat):
        return {f"{name}.{i}": item for i, item in enumerate(arr.flat)}
    kinds = sorted({type(item).__name__ for item in arr.flat})[:5]
    raise WorkerError(
        WorkerExit.UNSUPPORTED_MODEL,
        f"{name!r} is an object array of {kinds}, not arrays: nothing safetensors can hold",
    )

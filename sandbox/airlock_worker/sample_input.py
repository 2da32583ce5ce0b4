"""The caller's parity sample (``airlock convert --sample-input``): rows of the caller's own,
which the parity check runs on instead of generated ones.

The broker checked only the bytes' size and ``.npy`` magic (contract.check_sample) and put them
at ``IN_DIR/SAMPLE_NAME``; this is the only place they are parsed. The header is read first
(``numpy.lib.format``, a literal parser), so that an array whose header promises more than the
file holds, or Python objects, is refused before anything is allocated for it; then the array
is loaded with ``numpy.load(allow_pickle=False)``. Against the converted model's input it must
fit exactly: one input, the same number of dimensions, the same size in every fixed dimension,
numbers of a kind the input takes (no float rows for an integer input). Every refusal is
``SAMPLE_INVALID`` with a sentence saying what the sample holds and what the model takes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from airlock_sandbox.contract import MAX_SAMPLE_BYTES, WorkerExit, check_sample

from .errors import WorkerError, one_line

#: Parity runs the original model on every row: a few thousand say what they can, and keep a
#: slow reference (a Gaussian process, neighbours) inside the job's deadline.
MAX_SAMPLE_ROWS = 4096


def _refused(message: str) -> WorkerError:
    return WorkerError(WorkerExit.SAMPLE_INVALID, message)


def read(path: str) -> np.ndarray:
    """The sample at ``path`` as a numeric array, or ``SAMPLE_INVALID``."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SAMPLE_BYTES + 1)
    except FileNotFoundError:
        raise WorkerError(WorkerExit.BAD_JOB_SPEC, "the job names a parity sample, but the "
                                                   "input directory holds none") from None
    try:
        check_sample(raw)
    except ValueError as exc:
        raise _refused(str(exc)) from None
    shape, dtype = _header(raw)
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:  # numpy's own refusal, whatever its type
        raise _refused(f"the parity sample is not a readable .npy file: "
                       f"{one_line(str(exc), 160)}") from None
    if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
        raise _refused("the parity sample is not a readable .npy file")
    return array


def _header(raw: bytes) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The array's shape and dtype from its header, checked against the bytes that follow."""
    from numpy.lib import format as npy

    fh = io.BytesIO(raw)
    try:
        version = npy.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = npy.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = npy.read_array_header_2_0(fh)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} (numpy.save "
                             "writes 1.0 for numbers)")
    except ValueError as exc:
        raise _refused(f"the parity sample's .npy header is not readable: "
                       f"{one_line(str(exc), 160)}") from None
    if dtype.hasobject:
        raise _refused("the parity sample holds Python objects (it would need a pickle); "
                       "save an array of numbers")
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise _refused(f"the parity sample holds {dtype} values; it must hold numbers "
                       "(integers, floats or booleans)")
    if not shape or shape[0] == 0:
        raise _refused(f"the parity sample has shape {list(shape)}: it holds no rows")
    expected = math.prod(shape) * dtype.itemsize
    held = len(raw) - fh.tell()
    if held != expected:
        raise _refused(f"the parity sample's header promises {expected} bytes of data "
                       f"(shape {list(shape)}, {dtype}) but the file holds {held}")
    return tuple(shape), dtype


def feeds(sample: np.ndarray, inputs: list[dict[str, Any]],
          warn: Callable[[str], None]) -> dict[str, np.ndarray]:
    """The sample as the feeds of a graph with ``inputs`` (``[{name, dtype, shape}]``, -1 for
    a free dimension), cast to the input's dtype; ``SAMPLE_INVALID`` when it does not fit.
    ``warn`` is told when only the first MAX_SAMPLE_ROWS rows are used."""
    if len(inputs) != 1:
        names = ", ".join(repr(str(spec["name"])) for spec in inputs[:4])
        raise _refused(f"the converted model has {len(inputs)} inputs ({names}); a parity "
                       "sample is one array, for a model with one input")
    (spec,) = inputs
    name, want = str(spec["name"]), [int(d) for d in spec["shape"]]
    try:
        dtype = np.dtype(spec["dtype"])
    except TypeError:
        dtype = np.dtype(object)
    if dtype.kind not in "biuf":
        raise _refused(f"the model's input {name!r} takes {spec['dtype']} values, which a "
                       "sample of numbers cannot feed")
    got = list(sample.shape)
    if len(got) != len(want):
        raise _refused(f"the parity sample has shape {got} ({len(got)} dimensions); the "
                       f"model's input {name!r} has shape {_shown(want)} ({len(want)} "
                       "dimensions)")
    for axis, (size, wanted) in enumerate(zip(got, want, strict=True)):
        if wanted >= 0 and size != wanted:
            what = (f"{size} features per row; the model takes {wanted}"
                    if len(want) == 2 and axis == 1 else
                    f"{size} in dimension {axis}; the model takes {wanted}")
            raise _refused(f"the parity sample (shape {got}) has {what} (input {name!r} of "
                           f"shape {_shown(want)})")
    kinds = {"b": "b", "i": "biu", "u": "bu", "f": "biuf"}[dtype.kind]
    if sample.dtype.kind not in kinds:
        raise _refused(f"the parity sample holds {sample.dtype} values; the model's input "
                       f"{name!r} takes {dtype}, which they cannot be cast to without loss")
    if sample.shape[0] > MAX_SAMPLE_ROWS and want[0] < 0:
        warn(f"parity used the sample's first {MAX_SAMPLE_ROWS} of {sample.shape[0]} rows")
        sample = sample[:MAX_SAMPLE_ROWS]
    with np.errstate(over="ignore", invalid="ignore"):
        cast = sample.astype(dtype)
    if dtype.kind == "f" and sample.dtype.kind == "f":
        overflow = np.isfinite(sample) & ~np.isfinite(cast)
        if overflow.any():
            raise _refused(f"the parity sample holds values beyond {dtype}'s range, which the "
                           f"model's input {name!r} takes")
    if dtype.kind in "iu" and sample.dtype.kind in "iu" and not np.array_equal(cast, sample):
        raise _refused(f"the parity sample holds integers beyond {dtype}'s range, which the "
                       f"model's input {name!r} takes")
    return {name: cast}


def _shown(shape: list[int]) -> str:
    return "[" + ", ".join("N" if d < 0 else str(d) for d in shape) + "]"

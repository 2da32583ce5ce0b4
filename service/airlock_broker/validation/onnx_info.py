"""What a validated ONNX model is said to be, as plain values, and the size cap checked before
one is read: what the broker needs of ONNX validation without importing onnx (its import costs
about a second, ``ml_dtypes`` above all; only the validator processes parse models).
"""

from __future__ import annotations

from dataclasses import dataclass

from airlock_broker.errors import Reason, error
from airlock_broker.validation.limits import ONNX_TOO_LARGE_ADVICE, OutputLimits

Dim = int | str | None


@dataclass(frozen=True)
class ValueSpec:
    """One graph input or output, as plain values.

    ``type`` is ``"tensor"`` or a description such as ``"seq(map(int64,tensor(float)))"``;
    ``elem_type`` and ``shape`` are set for dense tensors only (``shape`` is ``None`` when
    unknown; a dim is an int, a symbolic name, or ``None``).
    """

    name: str
    type: str
    elem_type: str | None
    shape: tuple[Dim, ...] | None


@dataclass(frozen=True)
class OnnxInfo:
    """What a caller may want to know about a validated model."""

    ir_version: int
    opsets: tuple[tuple[str, int], ...]
    inputs: tuple[ValueSpec, ...]
    outputs: tuple[ValueSpec, ...]
    node_count: int
    producer_name: str
    producer_version: str


def check_onnx_size(size: int, limits: OutputLimits) -> None:
    """``OUTPUT_TOO_LARGE`` for a file over the cap."""
    if size > limits.max_onnx_bytes:
        raise error(
            Reason.OUTPUT_TOO_LARGE,
            f"ONNX output is {size} bytes, over the {limits.max_onnx_bytes}-byte cap "
            f"([output] max_onnx_bytes); {ONNX_TOO_LARGE_ADVICE}",
        )

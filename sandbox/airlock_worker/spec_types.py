"""The request's tensor specs (numpy dtype names, ``-1`` for a free dimension) mapped onto
what each converter wants. Pure mapping; the libraries are imported by the callers."""

from __future__ import annotations

from typing import Any

from airlock_sandbox.contract import TensorSpec, WorkerExit

from .errors import WorkerError

#: numpy dtype names a request may use, and the skl2onnx data type class for each.
SKL2ONNX_TYPES: dict[str, str] = {
    "float32": "FloatTensorType",
    "float64": "DoubleTensorType",
    "float16": "Float16TensorType",
    "int64": "Int64TensorType",
    "int32": "Int32TensorType",
    "int16": "Int16TensorType",
    "int8": "Int8TensorType",
    "uint8": "UInt8TensorType",
    "bool": "BooleanTensorType",
    "str": "StringTensorType",
    "string": "StringTensorType",
}

#: Rows per parity batch; a second batch of one row catches a batch dimension baked in.
PARITY_ROWS = 64
#: Rows in the example given to the torch exporters: not 0/1, which tracers specialise on.
EXPORT_ROWS = 2


def check_dtype(spec: TensorSpec) -> str:
    if spec.dtype not in SKL2ONNX_TYPES:
        raise WorkerError(
            WorkerExit.BAD_JOB_SPEC, f"input {spec.name!r}: unsupported dtype {spec.dtype!r}"
        )
    return spec.dtype


def onnx_shape(spec: TensorSpec) -> list[int | None]:
    """skl2onnx wants ``None`` for a free dimension."""
    return [None if d < 0 else d for d in spec.shape]


def concrete_shape(shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
    """A free first dimension becomes ``rows``; other free dimensions become 1."""
    return tuple((rows if i == 0 else 1) if d < 0 else d for i, d in enumerate(shape))


def free_axes(spec: TensorSpec) -> dict[int, str]:
    """``dynamic_axes`` entry for the legacy torch exporter: the free dims of one input."""
    return {
        i: ("batch" if i == 0 else f"{spec.name}_dim{i}")
        for i, d in enumerate(spec.shape)
        if d < 0
    }


def skl2onnx_initial_types(inputs: tuple[TensorSpec, ...], n_features: int | None,
                           data_types: Any = None) -> list[Any]:
    """One skl2onnx input per tensor spec, or ``X: float[None, n_features]`` by default; a
    single ``[-1, -1]`` input (a dtype without a shape: ``--input-dtype float64``) is
    ``n_features`` wide. ``data_types``: a module of the same type classes (onnxmltools'
    own, which its converters insist on); skl2onnx's by default."""
    if data_types is None:
        from skl2onnx.common import data_types

    if not inputs:
        if n_features is None:
            raise WorkerError(
                WorkerExit.INPUT_SPEC_REQUIRED,
                "the model does not record n_features_in_; give the input shapes",
            )
        return [("X", data_types.FloatTensorType([None, int(n_features)]))]
    if len(inputs) == 1 and n_features is not None and len(inputs[0].shape) == 2 \
            and inputs[0].shape[1] < 0:
        inputs = (TensorSpec(inputs[0].name, inputs[0].dtype,
                             (inputs[0].shape[0], int(n_features))),)
    return [
        (spec.name, getattr(data_types, SKL2ONNX_TYPES[check_dtype(spec)])(onnx_shape(spec)))
        for spec in inputs
    ]

"""Finishing an ONNX model before it leaves the sandbox: one opset per domain in domain order
(the same model serialises to the same bytes in every sandbox, whatever the converter's set
iteration order), no external data (the broker rejects it anyway, DESIGN §1.5), a full
checker pass, one serialisation."""

from __future__ import annotations

from typing import Any

import onnx
from onnx.external_data_helper import _get_all_tensors, uses_external_data

from airlock_sandbox.contract import WorkerExit

from .errors import WorkerError, describe

#: A single serialized ModelProto cannot exceed protobuf's 2 GiB limit.
PROTOBUF_LIMIT = 2**31 - 1


def finish(model: onnx.ModelProto) -> bytes:
    """Canonical bytes of a checked, self-contained model, or a :class:`WorkerError`."""
    _merge_opsets(model)
    refuse_external_data(model)
    if model.ByteSize() > PROTOBUF_LIMIT:
        raise WorkerError(WorkerExit.OUTPUT_TOO_LARGE,
                          f"ONNX model is {model.ByteSize()} bytes, over protobuf's 2 GiB limit; "
                          "convert the weights to safetensors instead (--to safetensors)")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise WorkerError(WorkerExit.CONVERSION_FAILED, f"ONNX checker: {describe(exc)}") from None
    return model.SerializeToString()


def _merge_opsets(model: onnx.ModelProto) -> None:
    """Some converters (onnxmltools' XGBoost) import a domain twice; keep the highest, and
    list the domains in order."""
    best: dict[str, int] = {}
    for entry in model.opset_import:
        best[entry.domain] = max(best.get(entry.domain, 0), entry.version)
    if [(e.domain, e.version) for e in model.opset_import] != sorted(best.items()):
        del model.opset_import[:]
        for domain, version in sorted(best.items()):
            model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def graph_inputs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """``[{name, dtype, shape}]`` of the real inputs (not initializers); ``-1`` = free."""
    initializers = {t.name for t in model.graph.initializer}
    found = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else None
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        found.append({"name": value.name, "dtype": str(dtype) if dtype is not None else "?",
                      "shape": shape})
    return found


def refuse_external_data(model: onnx.ModelProto) -> None:
    """Before anything reads initializers: external data would make the loader open files."""
    if any(uses_external_data(t) for t in _get_all_tensors(model)):
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL, "ONNX model references external data")

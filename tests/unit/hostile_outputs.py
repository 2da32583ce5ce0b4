"""Builders for the hostile files a subverted converter could leave in the out dir.

Each builder produces exactly one defect on top of a file that is otherwise valid, so a test that
sees it refused proves the validator caught *that* defect.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# --- safetensors ------------------------------------------------------------------------------


def st_file(
    header: dict[str, Any] | str | bytes,
    data: bytes = b"",
    *,
    header_len: int | None = None,
    pad: bool = True,
) -> bytes:
    """A safetensors file from a header (dict, raw text or raw bytes) and a data section.

    ``header_len`` overrides the 8-byte length prefix (to lie about it); ``pad`` pads with
    spaces to 8 bytes like the reference writer.
    """
    if isinstance(header, dict):
        raw = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    if pad:
        raw += b" " * (-len(raw) % 8)
    length = len(raw) if header_len is None else header_len
    return struct.pack("<Q", length) + raw + data


def entry(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    """One tensor entry of a safetensors header."""
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def two_f32_tensors() -> tuple[dict[str, Any], bytes]:
    """A valid header and data: ``a`` F32[2] at [0, 8), ``b`` F32[1] at [8, 12)."""
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 8, 12)}
    data = np.array([1.0, 2.0, 3.0], dtype="<f4").tobytes()
    return header, data


# --- ONNX -------------------------------------------------------------------------------------

OPSET = 17


def _model(graph: onnx.GraphProto, **kwargs: Any) -> onnx.ModelProto:
    kwargs.setdefault("opset_imports", [helper.make_opsetid("", OPSET)])
    return helper.make_model(graph, ir_version=8, **kwargs)


def add_model() -> onnx.ModelProto:
    """y = x + w with an initializer ``w``: valid, small, runs in onnxruntime."""
    w = numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), name="w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[w],
    )
    return _model(graph)


def mark_external(tensor: TensorProto, location: str = "../../etc/passwd") -> None:
    """Turn a tensor into a reference to a file beside (or far from) the model."""
    tensor.ClearField("float_data")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        kv = tensor.external_data.add()
        kv.key, kv.value = key, value


def external_initializer() -> onnx.ModelProto:
    model = add_model()
    mark_external(model.graph.initializer[0])
    return model


def external_data_entries_only() -> onnx.ModelProto:
    """external_data set but data_location left DEFAULT: still a filesystem reference."""
    model = add_model()
    kv = model.graph.initializer[0].external_data.add()
    kv.key, kv.value = "location", "w.bin"
    return model


def external_sparse_initializer() -> onnx.ModelProto:
    """onnx's own external-data walker misses sparse initializers."""
    values = numpy_helper.from_array(np.array([5.0], dtype=np.float32), name="sw")
    indices = numpy_helper.from_array(np.array([1], dtype=np.int64), name="sw_idx")
    mark_external(values)
    sparse = helper.make_sparse_tensor(values, indices, [2])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "sw"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        sparse_initializer=[sparse],
    )
    return _model(graph)


def external_constant_attribute() -> onnx.ModelProto:
    """A Constant node whose ``value`` attribute tensor lives in an external file."""
    value = numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), name="c")
    mark_external(value)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=value),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return _model(graph)


def _branch(name: str, tensor: TensorProto) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Constant", [], [f"{name}_out"], value=tensor)],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2])],
    )


def if_model(then_tensor: TensorProto | None = None) -> onnx.ModelProto:
    """``If(cond)`` choosing between two constant branches; optionally a hostile then-branch."""
    plain = numpy_helper.from_array(np.array([0.0, 0.0], dtype=np.float32), name="e")
    then_tensor = then_tensor or numpy_helper.from_array(
        np.array([1.0, 1.0], dtype=np.float32), name="t"
    )
    node = helper.make_node(
        "If", ["cond"], ["y"],
        then_branch=_branch("then", then_tensor), else_branch=_branch("else", plain),
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return _model(graph)


def external_in_if_branch() -> onnx.ModelProto:
    hidden = numpy_helper.from_array(np.array([1.0, 1.0], dtype=np.float32), name="t")
    mark_external(hidden)
    return if_model(hidden)


def external_in_loop_body() -> onnx.ModelProto:
    """A Loop whose body's Constant reads external data."""
    hidden = numpy_helper.from_array(np.array([1.0, 1.0], dtype=np.float32), name="k")
    mark_external(hidden)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Constant", [], ["k"], value=hidden),
            helper.make_node("Add", ["acc_in", "k"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        "g",
        [
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return _model(graph)


def nested_ifs(depth: int) -> onnx.ModelProto:
    """``depth`` If nodes, each inside the previous one's then-branch."""
    inner = _branch("leaf", numpy_helper.from_array(np.zeros(2, np.float32), name="z"))
    for level in range(depth):
        plain = _branch(f"else{level}", numpy_helper.from_array(np.ones(2, np.float32), "o"))
        node = helper.make_node(
            "If", ["cond"], [f"out{level}"], then_branch=inner, else_branch=plain
        )
        inner = helper.make_graph(
            [node], f"level{level}", [],
            [helper.make_tensor_value_info(f"out{level}", TensorProto.FLOAT, [2])],
        )  # fmt: skip
    graph = helper.make_graph(
        list(inner.node),
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        list(inner.output),
    )
    return _model(graph)


def function_model(*, external: bool = False) -> onnx.ModelProto:
    """A model calling a model-local function ``local.AddOne`` (ORT inlines and runs these)."""
    one = numpy_helper.from_array(np.array([1.0], dtype=np.float32), name="one")
    if external:
        mark_external(one)
    function = helper.make_function(
        "local",
        "AddOne",
        ["a"],
        ["b"],
        [
            helper.make_node("Constant", [], ["one"], value=one),
            helper.make_node("Add", ["a", "one"], ["b"]),
        ],
        [helper.make_opsetid("", OPSET)],
    )
    graph = helper.make_graph(
        [helper.make_node("AddOne", ["x"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return _model(
        graph,
        functions=[function],
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("local", 1)],
    )


def custom_op(domain: str, op_type: str = "Evil") -> onnx.ModelProto:
    """A node from ``domain``; ``com.evil`` is unknown, ``com.microsoft`` is ORT contrib."""
    graph = helper.make_graph(
        [helper.make_node(op_type, ["x"], ["y"], domain=domain)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return _model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(domain, 1)]
    )


def external_in_training_info() -> onnx.ModelProto:
    """A training graph (ignored at inference) whose initializer reads external data."""
    model = add_model()
    hidden = numpy_helper.from_array(np.array([1.0], dtype=np.float32), name="lr")
    mark_external(hidden)
    algorithm = helper.make_graph(
        [helper.make_node("Identity", ["lr"], ["lr_out"])],
        "train",
        [],
        [helper.make_tensor_value_info("lr_out", TensorProto.FLOAT, [1])],
        initializer=[hidden],
    )
    info = model.training_info.add()
    info.algorithm.CopyFrom(algorithm)
    return model

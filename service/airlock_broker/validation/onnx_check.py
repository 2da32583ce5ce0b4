"""Validating an ONNX output as hostile protobuf, and re-serialising it canonically.

The model came out of a sandbox in which attacker code may have run (DESIGN §1.5). Beyond
``onnx.checker`` we refuse what the checker lets through (research/conversion.md §5.1): external
data in any tensor anywhere (onnx's own walker misses sparse tensors and training graphs),
operator domains outside an allowlist (unknown and ``com.microsoft`` ops pass the checker),
model-local functions (ORT inlines and runs them), and we strip the free-text fields.

:func:`validate_onnx_bytes` is a pure function (bytes in, canonical bytes and a summary out,
:class:`~airlock_broker.errors.AirlockError` for a bad model) so that it can run in a separate,
rlimited process: a crash in onnx's C++ must not take the broker down (see ``onnx_pool``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from airlock_broker.errors import Reason, error
from airlock_broker.validation.files import describe_name, open_regular_file, read_upto
from airlock_broker.validation.limits import ONNX_TOO_LARGE_ADVICE, OutputLimits
from airlock_broker.validation.onnx_info import Dim, OnnxInfo, ValueSpec, check_onnx_size

#: The highest opset version onnx itself knows for each built-in domain; later is unreviewed.
_KNOWN_OPSETS = {
    "": onnx.defs.onnx_opset_version(),
    "ai.onnx": onnx.defs.onnx_opset_version(),
    "ai.onnx.ml": onnx.defs.onnx_ml_opset_version(),
}
#: Message types reached by the walk whose free text we clear.
_FREE_TEXT_FIELDS = ("doc_string", "metadata_props")
#: Type nesting in a graph signature (seq(map(..., tensor))) we are willing to describe.
_MAX_TYPE_DEPTH = 8

def read_onnx_file(path: Path, limits: OutputLimits) -> bytes:
    """Read an ONNX output whole, refusing it *before* reading if it is over the cap."""
    handle, _st = open_regular_file(path)
    with handle:
        return read_onnx_handle(handle, limits)


def read_onnx_handle(handle: BinaryIO, limits: OutputLimits) -> bytes:
    """Read an open ONNX output whole (a validator gets it as a descriptor), refusing it
    *before* reading if it is not a regular file or is over the cap."""
    st = os.fstat(handle.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise error(Reason.OUTPUT_INVALID, "ONNX output is not a regular file")
    check_onnx_size(st.st_size, limits)
    data = read_upto(handle, st.st_size + 1)
    if len(data) != st.st_size:
        raise error(Reason.OUTPUT_INVALID, "ONNX output changed size while it was read")
    return data


def validate_onnx_file(path: Path, limits: OutputLimits) -> tuple[bytes, OnnxInfo]:
    """:func:`read_onnx_file`, then :func:`validate_onnx_bytes`, in this process."""
    return validate_onnx_bytes(read_onnx_file(path, limits), limits)


def validate_onnx_bytes(data: bytes, limits: OutputLimits) -> tuple[bytes, OnnxInfo]:
    """Validate a serialised ModelProto and return its canonical bytes and a summary.

    Raises ``OUTPUT_TOO_LARGE`` over the size / node caps and ``OUTPUT_INVALID`` for anything
    else refused. Never touches the filesystem: the model is parsed from ``data`` only, so no
    external data can be followed even by mistake.
    """
    if len(data) > limits.max_onnx_bytes:
        raise error(Reason.OUTPUT_TOO_LARGE,
                    f"ONNX output is {len(data)} bytes, over the {limits.max_onnx_bytes}-byte "
                    f"cap ([output] max_onnx_bytes); {ONNX_TOO_LARGE_ADVICE}")
    if not data:
        raise error(Reason.OUTPUT_INVALID, "ONNX output is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # DecodeError, or whatever else the parser throws at hostile bytes
        raise error(Reason.OUTPUT_INVALID, f"not an ONNX protobuf: {_short(exc)}") from None
    # Unknown fields survive a parse/serialise round trip: a place to smuggle bytes through.
    model.DiscardUnknownFields()

    if not 1 <= model.ir_version <= onnx.IR_VERSION:
        raise error(Reason.OUTPUT_INVALID, f"unsupported IR version {model.ir_version}")
    if not model.HasField("graph"):
        raise error(Reason.OUTPUT_INVALID, "model has no graph")
    local_functions = _local_functions(model, limits)
    _check_opsets(model, limits, local_functions)
    node_count = _walk_and_strip(model, limits, local_functions)
    _strip_model_text(model, limits)
    info = _summarise(model, node_count, limits)

    canonical = model.SerializeToString(deterministic=True)
    # A hostile file can use a denser wire encoding than the serialiser writes back.
    if len(canonical) > limits.max_onnx_bytes:
        raise error(Reason.OUTPUT_TOO_LARGE,
                    f"canonical ONNX is {len(canonical)} bytes, over the "
                    f"{limits.max_onnx_bytes}-byte cap; {ONNX_TOO_LARGE_ADVICE}")
    del model  # the checker parses its own copy; do not hold two parsed models at once
    try:
        # Checked in its canonical form, which is what a caller receives. full_check adds
        # strict shape inference; check_custom_domain refuses ops no schema describes, which
        # includes calls to local functions (_check_node_domain covers that case).
        onnx.checker.check_model(
            canonical, full_check=True, check_custom_domain=not local_functions
        )
    except Exception as exc:  # ValidationError, InferenceError, and their relatives
        raise error(Reason.OUTPUT_INVALID, f"onnx.checker refused it: {_short(exc)}") from None
    return canonical, info


def _short(exc: BaseException, limit: int = 300) -> str:
    # Parser and checker messages quote names from the model: escape them, and keep them short.
    text = ascii(f"{type(exc).__name__}: {exc}")[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


def _local_functions(model: onnx.ModelProto, limits: OutputLimits) -> frozenset[tuple[str, str]]:
    if not model.functions:
        return frozenset()
    if not limits.allow_onnx_functions:
        raise error(Reason.OUTPUT_INVALID, "model-local functions are not allowed")
    declared = frozenset((f.domain, f.name) for f in model.functions)
    if not all(isinstance(part, str) for pair in declared for part in pair):
        raise error(Reason.OUTPUT_INVALID, "function name or domain is not valid UTF-8")
    return declared


def _domain_allowed(
    domain: str, limits: OutputLimits, local_functions: frozenset[tuple[str, str]]
) -> bool:
    return domain in limits.allowed_onnx_domains or any(d == domain for d, _ in local_functions)


def _check_opset_domain(
    domain: str, limits: OutputLimits, local_functions: frozenset[tuple[str, str]]
) -> None:
    if not _domain_allowed(domain, limits, local_functions):
        raise error(Reason.OUTPUT_INVALID, f"opset domain {describe_name(domain)} not allowed")


def _check_opsets(
    model: onnx.ModelProto, limits: OutputLimits, local_functions: frozenset[tuple[str, str]]
) -> None:
    """Domains allowlisted, versions known, one version per domain; exact repeats removed;
    sorted by domain.

    skl2onnx writes the default domain twice with the same version and the checker accepts
    that, so an exact repeat is dropped (the canonical form lists each domain once); two
    *different* versions of one domain are ambiguous and refused. The order means nothing,
    and skl2onnx's follows Python's per-process string hashing: sorted, one model converted
    twice has one canonical form.
    """
    versions: dict[str, int] = {}
    unique = []
    for opset in model.opset_import:
        domain = opset.domain
        if not isinstance(domain, str):  # proto2 hands back bytes for invalid UTF-8
            raise error(Reason.OUTPUT_INVALID, "opset domain is not valid UTF-8")
        _check_opset_domain(domain, limits, local_functions)
        known = _KNOWN_OPSETS.get(domain)
        if known is not None and not 1 <= opset.version <= known:
            raise error(
                Reason.OUTPUT_INVALID, f"opset {describe_name(domain)} v{opset.version} unknown"
            )
        key = "" if domain == "ai.onnx" else domain  # two spellings of the default domain
        if key in versions:
            if versions[key] != opset.version:
                raise error(
                    Reason.OUTPUT_INVALID,
                    f"opset domain {describe_name(domain)} imported with two versions",
                )
            continue
        versions[key] = opset.version
        unique.append(onnx.OperatorSetIdProto(domain=domain, version=opset.version))
    unique.sort(key=lambda o: o.domain)
    if [(o.domain, o.version) for o in unique] != \
            [(o.domain, o.version) for o in model.opset_import]:
        del model.opset_import[:]
        model.opset_import.extend(unique)


def _children(message: Message) -> Iterator[Message]:
    """The sub-messages of ``message``; refuses string fields that are not valid UTF-8.

    onnx.proto is proto2, where protobuf hands back a *bytes* object for a string field holding
    invalid UTF-8, and every name comparison and printability check downstream assumes str.
    """
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if field.is_repeated else (value,)
            if not all(isinstance(v, str) for v in values):
                raise error(
                    Reason.OUTPUT_INVALID, f"field {field.full_name} is not valid UTF-8"
                )
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                yield from value
            else:
                yield value


def _walk_and_strip(
    model: onnx.ModelProto, limits: OutputLimits, local_functions: frozenset[tuple[str, str]]
) -> int:
    """Visit every message of the model once; check tensors, nodes and graphs; clear free text.

    The walk is by reflection over *all* message fields rather than a list of the places onnx
    puts tensors today, so sparse tensors, attribute subgraphs, functions, training graphs and
    any field a future IR adds are covered. Returns the node count.
    """
    nodes = 0
    # (message, graph nesting depth); an explicit stack, so hostile nesting cannot recurse us.
    stack: list[tuple[Message, int]] = [(model, -1)]
    while stack:
        message, depth = stack.pop()
        for name in _FREE_TEXT_FIELDS:
            if name in message.DESCRIPTOR.fields_by_name:
                message.ClearField(name)
        children = list(_children(message))  # first: it refuses non-UTF-8 strings
        if isinstance(message, onnx.GraphProto):
            depth += 1
            if depth > limits.max_subgraph_depth:
                raise error(
                    Reason.OUTPUT_INVALID,
                    f"subgraphs nest deeper than {limits.max_subgraph_depth} levels",
                )
        elif isinstance(message, onnx.TensorProto):
            _check_tensor(message)
        elif isinstance(message, onnx.NodeProto):
            nodes += 1
            if nodes > limits.max_onnx_nodes:
                raise error(
                    Reason.OUTPUT_TOO_LARGE, f"more than {limits.max_onnx_nodes} nodes"
                )
            _check_node_domain(message, limits, local_functions)
        elif isinstance(message, onnx.OperatorSetIdProto):  # functions carry their own
            _check_opset_domain(message.domain, limits, local_functions)
        stack.extend((child, depth) for child in children)
    return nodes


def _check_tensor(tensor: onnx.TensorProto) -> None:
    # Either marker alone makes onnx or ORT go to the filesystem (CVE-2022-25882 and its
    # successors through CVE-2026-34446; ORT still follows hard links).
    if tensor.data_location != onnx.TensorProto.DEFAULT or len(tensor.external_data) > 0:
        raise error(
            Reason.OUTPUT_INVALID,
            f"tensor {describe_name(tensor.name)} refers to external data",
        )


def _check_node_domain(
    node: onnx.NodeProto, limits: OutputLimits, local_functions: frozenset[tuple[str, str]]
) -> None:
    if (node.domain, node.op_type) in local_functions:
        return
    allowed = node.domain in limits.allowed_onnx_domains
    # With local functions present the checker cannot run with check_custom_domain (it knows
    # no schema for them), so an op from a non-built-in domain must be one of the functions.
    if local_functions and node.domain not in _KNOWN_OPSETS:
        allowed = False
    if not allowed:
        raise error(
            Reason.OUTPUT_INVALID,
            f"operator {describe_name(node.op_type)} from domain {describe_name(node.domain)}"
            " is not allowed",
        )


def _strip_model_text(model: onnx.ModelProto, limits: OutputLimits) -> None:
    # doc_string and metadata_props went in the walk. Short provenance strings are kept;
    # anything long or unprintable is free text, and dropped.
    for name in ("producer_name", "producer_version", "domain"):
        value: str = getattr(model, name)
        if len(value) > limits.max_onnx_producer_len or not value.isprintable():
            model.ClearField(name)


def _summarise(model: onnx.ModelProto, node_count: int, limits: OutputLimits) -> OnnxInfo:
    graph = model.graph
    return OnnxInfo(
        ir_version=model.ir_version,
        opsets=tuple(sorted((o.domain, o.version) for o in model.opset_import)),
        inputs=tuple(_value_spec(v, limits) for v in graph.input),
        outputs=tuple(_value_spec(v, limits) for v in graph.output),
        node_count=node_count,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
    )


def _value_spec(value: onnx.ValueInfoProto, limits: OutputLimits) -> ValueSpec:
    # Signature names reach callers and logs: same rules as tensor names in safetensors.
    if not value.name or len(value.name) > limits.max_tensor_name_len or not (
        value.name.isprintable()
    ):
        raise error(
            Reason.OUTPUT_INVALID, f"graph input/output name {describe_name(value.name)} refused"
        )
    tp = value.type
    if tp.WhichOneof("value") == "tensor_type":
        tensor = tp.tensor_type
        shape = _shape(tensor) if tensor.HasField("shape") else None
        return ValueSpec(value.name, "tensor", _elem_name(tensor.elem_type), shape)
    return ValueSpec(value.name, _describe_type(tp, 0), None, None)


def _shape(tensor: Any) -> tuple[Dim, ...]:
    dims: list[Dim] = []
    for dim in tensor.shape.dim:
        which = dim.WhichOneof("value")
        if which == "dim_value":
            dims.append(dim.dim_value)
        elif which == "dim_param" and dim.dim_param.isprintable():
            dims.append(dim.dim_param[:64])
        else:  # unknown, or a symbolic name not fit to show: reported as free
            dims.append(None)
    return tuple(dims)


def _elem_name(elem_type: int) -> str:
    try:
        return str(onnx.TensorProto.DataType.Name(elem_type)).lower()
    except ValueError:
        return f"unknown({elem_type})"


def _describe_type(tp: onnx.TypeProto, depth: int) -> str:
    if depth > _MAX_TYPE_DEPTH:
        return "..."
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        return f"tensor({_elem_name(tp.tensor_type.elem_type)})"
    if which == "sparse_tensor_type":
        return f"sparse_tensor({_elem_name(tp.sparse_tensor_type.elem_type)})"
    if which == "sequence_type":
        return f"seq({_describe_type(tp.sequence_type.elem_type, depth + 1)})"
    if which == "optional_type":
        return f"optional({_describe_type(tp.optional_type.elem_type, depth + 1)})"
    if which == "map_type":
        key = _elem_name(tp.map_type.key_type)
        return f"map({key},{_describe_type(tp.map_type.value_type, depth + 1)})"
    return "unknown"

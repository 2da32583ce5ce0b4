"""ONNX and safetensors inputs: no code to run, so they are only checked and rewritten
canonically (ONNX re-serialized; safetensors with sorted names and contiguous offsets)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from airlock_sandbox.contract import OutputFormat, Target, WorkerExit
from airlock_sandbox.strict_json import StrictJSONError, loads_strict

from . import output
from .errors import WorkerError
from .job import Job

#: A header this large is not a model's; reading it would only cost memory.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_COPY_CHUNK = 8 * 1024 * 1024
#: Bits per element of every dtype safetensors 0.8 knows.
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


# -- ONNX ----------------------------------------------------------------------------------


def convert_onnx(job: Job) -> None:
    import onnx

    from . import onnx_out

    with job.open_artifact() as f:
        data = f.read(onnx_out.PROTOBUF_LIMIT + 1)
    with job.loading():
        model = onnx.load_model_from_string(data)
    job.loaded_safely("onnx.load_model_from_string")
    onnx_out.refuse_external_data(model)
    if job.spec.target is not Target.SAFETENSORS:
        job.write_onnx(model, "passthrough", reference=None)
        return
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    job.write_numpy_arrays(arrays, "onnx initializers -> safetensors.numpy")


# -- safetensors ---------------------------------------------------------------------------


def convert_safetensors(job: Job) -> None:
    job.refuse_target(OutputFormat.ONNX, "safetensors holds weights only, no model code")
    job.loaded_safely("safetensors header (canonical rewrite)")
    with open(job.artifact_path(), "rb") as src:
        size = os.fstat(src.fileno()).st_size
        header, data_start = _read_header(src, size)
        metadata = header.pop("__metadata__", None)
        entries = _entries(header, size - data_start)
        names = sorted(entries)
        new_header: dict[str, Any] = {}
        if isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()):
            new_header["__metadata__"] = metadata
        elif metadata is not None:
            job.report.warn("dropped __metadata__: values must be strings")
        offset = 0
        for name in names:
            dtype, shape, (begin, end) = entries[name]
            new_header[name] = {"dtype": dtype, "shape": shape,
                                "data_offsets": [offset, offset + end - begin]}
            offset += end - begin
        raw = json.dumps(new_header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        output.check_size(8 + len(raw) + offset, job.spec.max_output_bytes)
        with output.staged(job.out_dir, OutputFormat.SAFETENSORS,
                           job.spec.max_output_bytes) as tmp:
            with open(tmp, "xb") as dst:
                dst.write(struct.pack("<Q", len(raw)) + raw)
                for name in names:
                    begin, end = entries[name][2]
                    _copy(src, dst, data_start + begin, end - begin)
            _library_agrees(tmp, names)
    job.report.converter = "canonical rewrite"
    job.report.tensor_count = len(names)
    job.report.output_format = OutputFormat.SAFETENSORS.value


def _invalid(why: str) -> WorkerError:
    return WorkerError(WorkerExit.CONVERSION_FAILED, f"invalid safetensors file: {why}")


def _read_header(src: Any, size: int) -> tuple[dict[str, Any], int]:
    (length,) = struct.unpack("<Q", src.read(8))
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise _invalid("header length out of range")
    try:
        # The broker reads the same header with the same strict reader (one meaning or none).
        header = loads_strict(src.read(length).decode("utf-8"), padding=" ")
    except (StrictJSONError, UnicodeDecodeError) as exc:
        raise _invalid(f"header is not strict JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _invalid("header is not an object")
    return header, 8 + length


def _entries(header: dict[str, Any], data_len: int) -> dict[str, tuple[str, list[int], list[int]]]:
    """Every tensor entry, checked: known dtype, shape x dtype = byte length, offsets that
    tile the data section exactly (no gaps, no overlaps, nothing beyond)."""
    entries: dict[str, tuple[str, list[int], list[int]]] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _invalid(f"entry {name[:80]!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPE_BITS:
            raise WorkerError(WorkerExit.UNSUPPORTED_MODEL, f"unknown dtype {str(dtype)[:20]!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _invalid(f"bad shape for {name[:80]!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise _invalid(f"bad data_offsets for {name[:80]!r}")
        count = 1
        for d in shape:
            count *= d
        bits = count * _DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise _invalid(f"{name[:80]!r}: shape and dtype do not match its byte length")
        entries[name] = (dtype, shape, offsets)
    position = 0
    for _, _, (begin, end) in sorted(entries.values(), key=lambda e: (e[2][0], e[2][1])):
        if begin != position:
            raise _invalid("tensor data overlaps or leaves gaps")
        position = end
    if position != data_len:
        raise _invalid("data section length does not match the header")
    return entries


def _copy(src: Any, dst: Any, start: int, length: int) -> None:
    src.seek(start)
    while length:
        chunk = src.read(min(length, _COPY_CHUNK))
        if not chunk:
            raise _invalid("file ended early")
        dst.write(chunk)
        length -= len(chunk)


def _library_agrees(path: str, names: list[str]) -> None:
    """A second opinion on what we wrote, from the reference parser."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        if sorted(f.keys()) != names:
            raise WorkerError(WorkerExit.CONVERSION_FAILED, "rewritten file lists other tensors")

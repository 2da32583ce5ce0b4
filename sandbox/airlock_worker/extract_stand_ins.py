"""The inert objects the restricted reading of a checkpoint builds (:mod:`.extract`): torch's
dtypes, storage types, ``torch.device``, ``torch.Size``, layouts and ``OrderedDict`` as
stand-ins, and tensors as bounds-checked strided views of the archive's storage records.

The pickle VM can BUILD (``__setstate__`` or setattr) and SETITEMS on any object it holds,
including what ``find_class`` returned. Everything here refuses: a frozen, slotted dataclass
would otherwise get a generated ``__setstate__`` that rewrites its fields (a pickle could
redefine ``torch.float32``, and our reading would no longer be torch's).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .extract_errors import NOT_EXTRACTABLE, Refused, Unextractable


class RecordSource(Protocol):
    """Where storages' bytes are: a zip's records (extract_archive.Archive) or a legacy
    file's spans (extract_legacy.LegacyFile)."""

    def record_bytes(self, record: Any) -> memoryview: ...


def refuse_build(self: Any, state: Any) -> None:
    raise Refused(f"the pickle tries to modify a {type(self).__name__}")


@dataclass(frozen=True, slots=True)
class DType:
    """Stand-in for a ``torch.dtype``: its name, width and safetensors name (``None``:
    the converter refuses to store it, ``""``: safetensors cannot take it at all)."""

    name: str
    itemsize: int
    st: str | None

    __setstate__ = refuse_build

    def __str__(self) -> str:  # as str(torch.float32), should a dtype be a dict key
        return f"torch.{self.name}"

    __repr__ = __str__  # as repr(torch.float32), inside a tuple key: "(torch.float32,)"


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

@dataclass(frozen=True, slots=True)
class StorageType:
    """Stand-in for ``torch.FloatStorage`` & co. as named in a persistent id."""

    name: str
    dtype: DType

    __setstate__ = refuse_build

    def __str__(self) -> str:  # torch's StorageType prints otherwise
        raise Unextractable(f"{NOT_EXTRACTABLE}: a dict key is a storage type")

    __repr__ = __str__


STORAGE_TYPES: dict[tuple[str, str], StorageType] = {
    ("torch", f"{prefix}Storage"): StorageType(f"{prefix}Storage", DTYPES[name])
    for prefix, name in [
        ("Float", "float32"), ("Double", "float64"), ("Half", "float16"),
        ("BFloat16", "bfloat16"), ("Long", "int64"), ("Int", "int32"), ("Short", "int16"),
        ("Char", "int8"), ("Byte", "uint8"), ("Bool", "bool"),
        ("ComplexFloat", "complex64"), ("ComplexDouble", "complex128"),
    ]
}
STORAGE_TYPES[("torch.storage", "UntypedStorage")] = StorageType("UntypedStorage",
                                                                   DTYPES["uint8"])
STORAGE_TYPES[("torch", "UntypedStorage")] = STORAGE_TYPES[("torch.storage", "UntypedStorage")]


class device(str):  # named as torch's, for the "skipped" warnings
    """Stand-in for ``torch.device``: its string form, which is all a checkpoint needs."""

    __slots__ = ()

    def __repr__(self) -> str:  # as torch's, inside a tuple key: "(device(type='cpu'),)"
        kind, _, index = self.partition(":")
        return f"device(type='{kind}', index={index})" if index else f"device(type='{kind}')"


class layout(str):
    """Stand-in for ``torch.layout`` (``torch.serialization.get_layout``)."""

    __slots__ = ()

    __repr__ = str.__str__  # as repr(torch.strided): "torch.strided", no quotes


class Size(tuple[int, ...]):
    """Stand-in for ``torch.Size``; prints like it, should it be a dict key."""

    __slots__ = ()

    def __str__(self) -> str:
        return f"torch.Size([{', '.join(str(int(d)) for d in self)}])"

    __repr__ = __str__


def make_device(*args: Any) -> device:
    if not args or len(args) > 2 or not all(isinstance(a, (str, int)) for a in args):
        raise Refused("malformed torch.device")
    text = str(args[0]) if len(args) == 1 else f"{args[0]}:{args[1]}"
    return device(text[:64])


def make_size(dims: Any = ()) -> Size:
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int for d in dims):
        raise Refused("malformed torch.Size")
    return Size(dims)


def get_layout(name: Any) -> layout:
    if not isinstance(name, str):
        raise Refused("malformed layout")
    return layout(name[:64])


class OrderedDictStandIn(dict[Any, Any]):
    """``collections.OrderedDict`` as the pickle builds it: a dict (insertion-ordered) with
    no instance ``__dict__``, so a BUILD cannot shadow ``items`` or ``get``, which the
    flattening calls. ``nn.Module.state_dict()`` BUILDs its ``_metadata`` (module versions)
    onto it: accepted and dropped, it holds no weights. The reading's own subclass
    (``RestrictedUnpickler._ordered_dict_type``) records any other state, which torch would
    set and this stand-in does not model."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        pass


OrderedDictStandIn.__name__ = "OrderedDict"


@dataclass(frozen=True, slots=True)
class _TypeMarker:
    """``torch.Tensor`` / ``torch.nn.Parameter`` as the ``new_type`` of
    ``_rebuild_from_type_v2`` (a plain tensor or parameter that carried attributes)."""

    name: str

    __setstate__ = refuse_build

    def __str__(self) -> str:  # a dict key torch would print as "<class ...>"
        raise Unextractable(f"{NOT_EXTRACTABLE}: a dict key is {self.name}")

    __repr__ = __str__


TENSOR_TYPE = _TypeMarker("torch.Tensor")
PARAMETER_TYPE = _TypeMarker("torch.nn.Parameter")


# -- storages and tensors -----------------------------------------------------------------


class Storage:
    """One storage: a zip's ``data/<key>`` record or a legacy file's span, its declared
    dtype and size checked against it; the bytes are fetched only when a tensor is written
    (``record`` is None until a legacy file's storage is placed)."""

    __slots__ = ("_archive", "dtype", "key", "nbytes", "record")

    def __init__(self, archive: RecordSource, key: str, dtype: DType, nbytes: int,
                 record: Any) -> None:
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
        raise Unextractable(f"{NOT_EXTRACTABLE}: a storage is used as a dict key")

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
        raise Unextractable(f"{NOT_EXTRACTABLE}: a tensor is used as a dict key")

    __repr__ = __str__


def is_tensor(value: Any) -> bool:
    return isinstance(value, Tensor)


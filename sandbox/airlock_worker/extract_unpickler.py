"""``data.pkl`` of a PyTorch zip checkpoint read without executing anything it names
(:mod:`.extract`): :class:`RestrictedUnpickler` hands out only our stand-ins for the
tensor-rebuild globals, and :class:`Poison` for every other global."""

from __future__ import annotations

import io
import math
import pickle
from typing import Any, Protocol

from airlock_sandbox.contract import DICT_ATTRIBUTES_GLOBAL, TENSOR_ATTRIBUTES_GLOBAL

from .extract_archive import Archive
from .extract_errors import NOT_EXTRACTABLE, Refused, Unextractable
from .extract_stand_ins import (
    DTYPES,
    PARAMETER_TYPE,
    STORAGE_TYPES,
    TENSOR_TYPE,
    DType,
    OrderedDictStandIn,
    RecordSource,
    Storage,
    StorageType,
    Tensor,
    get_layout,
    make_device,
    make_size,
    refuse_build,
)
from .pickle_poison import Poison, PoisonJar

#: Nodes looked at when deciding whether an unknown object holds tensor data.
MAX_SCAN_NODES = 1_000_000
MAX_DIMS = 64
#: Sizes, strides and offsets are int64 in torch.
INT64 = 2**63


def holds_data(root: Any) -> bool:
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


# -- the restricted unpickler ----------------------------------------------------------------


class _Allowed:
    """An allowlisted callable as the pickle sees it: callable, and nothing else (a function
    or bound method would let BUILD set attributes on it)."""

    __slots__ = ("_fn", "name")
    _fn: Any
    name: str

    def __init__(self, name: str, fn: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise Refused("the pickle tries to modify a rebuild function")

    __setstate__ = refuse_build

    def __repr__(self) -> str:  # torch's function prints with its address
        raise Unextractable(f"{NOT_EXTRACTABLE}: a dict key is {self.name}")

    __str__ = __repr__


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise Refused(f"{what} must be an int, not a {type(value).__name__}")
    if not 0 <= value < INT64:
        raise Refused(f"{what} must be a non-negative int64, not {value}")
    return value


def _dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS:
        raise Refused(f"{what} must be a tuple of at most {MAX_DIMS} ints")
    for v in value:  # negative strides are refused here too
        if type(v) is not int or not 0 <= v < INT64:
            _int(v, what)
    return tuple(value)


class Readable(Protocol):
    """What the unpickler reads from besides bytes: a file's ``read`` and ``readline``."""

    def read(self, n: int = -1, /) -> bytes: ...

    def readline(self) -> bytes: ...


def check_storage_id(pid: tuple[Any, ...]) -> tuple[StorageType, str, int]:
    """``("storage", type, key, location, numel)``, as both layouts begin a storage's
    persistent id: the stand-in type, the key and the size in bytes it declares."""
    if pid[0] not in ("storage", b"storage"):
        raise Refused(f"unknown persistent id kind {str(pid[0])[:40]!r}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, StorageType):
        name = getattr(storage_type, "global_name", type(storage_type).__name__)
        raise Unextractable(f"{NOT_EXTRACTABLE}: storage type {name}")
    if not isinstance(key, str):
        # torch names the record f"data/{key}": a bytes key b"0" (SHORT_BINBYTES, which its
        # weights_only loader refuses, so the converter loads the file fully) is the
        # record "data/b'0'" there, not "data/0". No torch.save writes one.
        raise Refused("storage key is not a string")
    return storage_type, key, _int(numel, "storage size") * storage_type.dtype.itemsize


class RestrictedUnpickler(pickle.Unpickler):
    """``data.pkl`` with our stand-ins for the tensor-rebuild globals and :class:`Poison`
    for every other one. Nothing the pickle names is imported or called."""

    def __init__(self, data: bytes | memoryview | Readable, archive: RecordSource) -> None:
        stream = io.BytesIO(data) if isinstance(data, (bytes, memoryview)) else data
        super().__init__(stream, encoding="utf-8")  # as torch.load passes
        self._archive = archive
        self._storages: dict[str, Storage] = {}
        self._record_keys: dict[str, str] = {}
        self._jar = PoisonJar()
        calls = {
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
            ("torch.tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
            ("torch", "Size"): make_size,
            ("torch", "device"): make_device,
            ("torch.serialization", "get_layout"): get_layout,
        }
        self.allowed: dict[tuple[str, str], Any] = {
            **{key: _Allowed(f"{key[0]}.{key[1]}", fn) for key, fn in calls.items()},
            ("collections", "OrderedDict"): self._ordered_dict_type(),
            ("torch", "Tensor"): TENSOR_TYPE,
            ("torch._tensor", "Tensor"): TENSOR_TYPE,
            ("torch.nn.parameter", "Parameter"): PARAMETER_TYPE,
            **STORAGE_TYPES,
            **{("torch", name): dt for name, dt in DTYPES.items()},
        }
        self._tensor_rebuilds = frozenset(
            id(self.allowed[("torch._utils", name)]) for name in (
                "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                "_rebuild_parameter", "_rebuild_parameter_with_state"))

    @property
    def poisoned(self) -> list[str]:
        return self._jar.poisoned

    def _ordered_dict_type(self) -> type[OrderedDictStandIn]:
        """``collections.OrderedDict`` for this reading: a BUILD on one is
        :meth:`_dict_attributes`'s to judge."""
        judge = self._dict_attributes

        class OrderedDict(OrderedDictStandIn):  # prints as torch's, should it be a key
            __slots__ = ()
            __module__ = "collections"
            __qualname__ = "OrderedDict"

            def __setstate__(self, state: Any) -> None:
                judge(state)

        return OrderedDict

    def _dict_attributes(self, state: Any) -> None:
        """A BUILD on an ``OrderedDict``: torch's ``weights_only`` loader puts the state in
        its ``__dict__`` (``inst.__dict__.update(state)``), so ``items``, ``keys``, ``values``
        or ``get`` there shadow the methods the converter's flattening (and
        ``load_state_dict``) calls, and torch's dict lists other tensors than the reading,
        which keeps no attributes, does. ``nn.Module.state_dict()`` sets only ``_metadata``
        (module versions): dropped, as before. Anything else is recorded as a refused
        global, so the reading never answers alone and the conversion is compared with it."""
        if isinstance(state, dict) and all(
                type(k) is str and k == "_metadata" for k in state):
            return
        self.poison_class(*DICT_ATTRIBUTES_GLOBAL.rsplit(".", 1))

    # -- the two hooks the pickle VM calls --------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        return found if found is not None else self.poison_class(module, name)

    def poison_class(self, module: str, name: str) -> type[Poison]:
        return self._jar.poison_class(module, name)

    def persistent_load(self, pid: Any) -> Storage:
        if not isinstance(pid, tuple) or len(pid) != 5:
            raise Refused("unknown persistent id in data.pkl")
        storage_type, key, nbytes = check_storage_id(pid)
        cached = self._storages.get(key)  # as torch: the first reference defines the storage
        if cached is not None:
            if cached.nbytes == 0 and cached.dtype != storage_type.dtype:
                # torch keeps only a storage with data (its data_ptr is not 0): without
                # mmap an empty one is made again with each reference's dtype, with mmap
                # the first is kept. The two loads give its tensors different dtypes.
                raise Refused(f"empty storage data/{key[:80]} is referenced as "
                              f"{cached.dtype} and as {storage_type.dtype}")
            return cached
        assert isinstance(self._archive, Archive)
        record = self._archive.record(f"data/{key}")
        if record is None:
            raise Refused(f"storage record data/{key[:80]} is missing")
        other = self._record_keys.setdefault(record.orig_filename, key)
        if other != key:  # "a" and "A": one record to torch's lookup, two storages
            raise Refused(f"storages {other[:40]!r} and {key[:40]!r} are one record")
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
        if math.prod(shape) * dt.itemsize >= INT64:
            raise Refused("tensor too large")
        return Tensor(storage, dt, offset, shape, strides)

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> Tensor:
        return self._tensor(storage, offset, size, stride, None)

    def _rebuild_tensor_v2(self, storage: Any, offset: Any, size: Any, stride: Any,
                           requires_grad: Any = False, backward_hooks: Any = None,
                           metadata: Any = None) -> Tensor:
        if metadata:
            raise Unextractable(f"{NOT_EXTRACTABLE}: a tensor has conj/neg bits set")
        return self._tensor(storage, offset, size, stride, None)

    def _rebuild_tensor_v3(self, storage: Any, offset: Any, size: Any, stride: Any,
                           requires_grad: Any, backward_hooks: Any, dt: Any,
                           metadata: Any = None) -> Tensor:
        if not isinstance(dt, DType):
            name = getattr(dt, "global_name", type(dt).__name__)
            raise Unextractable(f"{NOT_EXTRACTABLE}: unsupported tensor dtype {name}")
        if metadata:
            raise Unextractable(f"{NOT_EXTRACTABLE}: a tensor has conj/neg bits set")
        return self._tensor(storage, offset, size, stride, dt)

    def _rebuild_parameter(self, data: Any, requires_grad: Any = False,
                           backward_hooks: Any = None, state: Any = None) -> Tensor:
        """A parameter is its data, unless it carries attributes (``state``: see
        ``_attributes``)."""
        if not isinstance(data, Tensor):
            raise Refused("a parameter is rebuilt from something that is not a tensor")
        self._attributes(state)
        return data

    def _attributes(self, state: Any) -> None:
        """Attributes pickled with a tensor, which ``torch.load`` (``weights_only`` too) sets
        on it with ``torch._utils._set_obj_state``: ``setattr(tensor, "data", other)`` swaps
        its weights, ``real`` or ``imag`` overwrite them. The reading does not model
        ``setattr`` on a tensor, so a tensor that carries any attribute is recorded as that
        refused global: the reading is then never the answer alone, and the conversion (what
        torch loads) is compared with it. An empty state sets nothing."""
        if state is None or _empty(state):
            return
        self.poison_class(*TENSOR_ATTRIBUTES_GLOBAL.rsplit(".", 1))

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        """A plain tensor or parameter with Python attributes: the tensor is ``func(*args)``,
        its attributes see ``_attributes``. A tensor *subclass* is someone's code: its
        rebuild is recorded, never run."""
        if (isinstance(func, _Allowed) and id(func) in self._tensor_rebuilds
                and (new_type is TENSOR_TYPE or new_type is PARAMETER_TYPE)
                and isinstance(args, tuple)):
            self._attributes(state)
            return func(*args)
        poison = self.poison_class("torch._tensor", "_rebuild_from_type_v2(subclass)")
        return poison(func, new_type, args, state)


def _empty(state: Any) -> bool:
    """A tensor's pickled state that sets nothing: ``{}``, or ``({}, {})`` (its ``__dict__``
    and its slots, as ``torch._utils._get_obj_state`` makes them)."""
    if isinstance(state, tuple):
        return all(isinstance(part, dict) and not part for part in state)
    return isinstance(state, dict) and not state

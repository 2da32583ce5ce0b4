"""The estimator policy loader: a scikit-learn-family pickle or joblib file read with only the
globals :mod:`.estimator_allowlist` allows (PickleBall's idea, CCS 2025), so that no code the
artifact names runs.

It is joblib's own unpickler (plain pickles, joblib's array records and its zlib / gzip /
bz2 / xz / lz4 containers) with ``find_class`` replaced. Two readings:

- **strict** (``safe_only`` jobs): the first global outside the allowlist ends the reading
  with :class:`PolicyRefused`, which names it;
- **tolerant** (the integrity reading of an ``allow_code`` job, DESIGN §5): a refused global
  becomes a :class:`.pickle_poison.Poison` that records what the pickle does with it, and the
  reading goes on; the names are reported. If the model needs what was refused, its
  conversion fails; if the refused code only tampered with the first sandbox's conversion,
  the two outputs differ and the broker says so.

Beyond ``find_class``, the pickle VM can set state on anything it holds: BUILD on a class or
function this loader handed out (``setattr(LogisticRegression, "predict", ...)``, a
function's ``__defaults__``) would change library code for the rest of the job, so it is
refused.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from airlock_sandbox.contract import WorkerExit

from .errors import WorkerError
from .estimator_allowlist import MODULE_ALIASES, SUBSTITUTES, entries
from .pickle_poison import PoisonJar, global_label

_ALLOWED = entries()


class PolicyRefused(WorkerError):
    """A strict reading met a global outside the allowlist (or a forbidden operation)."""

    def __init__(self, refused: str, message: str, names: list[str] | None = None) -> None:
        super().__init__(WorkerExit.POLICY_VIOLATION, message)
        self.refused = refused
        #: Every global refused so far (a tolerant reading that could not go on without them).
        self.names = names or [refused]


@dataclass(frozen=True)
class Reading:
    obj: Any
    #: Globals a tolerant reading replaced with poison, in the order the pickle named them.
    refused: list[str]


def resolve(key: str) -> Any:
    """The object an allowlist entry names (``module:qualname``), imported from the library;
    never called with a name the allowlist does not hold."""
    if key in SUBSTITUTES:
        return SUBSTITUTES[key]
    module, _, qualname = key.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _unpickler_class() -> type:
    """joblib's NumpyUnpickler with our find_class and BUILD (joblib imported on demand:
    the light profile never loads it)."""
    from joblib.numpy_pickle import NumpyArrayWrapper, NumpyUnpickler
    from joblib.numpy_pickle_utils import Unpickler

    class PolicyUnpickler(NumpyUnpickler):  # type: ignore[misc]
        dispatch = NumpyUnpickler.dispatch.copy()

        def __init__(self, fh: IO[bytes], tolerant: bool,
                     outer: PolicyUnpickler | None = None) -> None:
            super().__init__("", fh, ensure_native_byte_order=True)
            self.tolerant = tolerant
            # A joblib object array's nested pickle (below) shares what the outer one
            # refused and handed out.
            self.jar: PoisonJar = outer.jar if outer is not None else PoisonJar()
            self.handed_out: set[int] = outer.handed_out if outer is not None else set()

        def find_class(self, module: str, name: str) -> Any:
            if self.proto < 3 and self.fix_imports:  # as pickle's own find_class
                if (module, name) in _compat_pickle.NAME_MAPPING:
                    module, name = _compat_pickle.NAME_MAPPING[(module, name)]
                elif module in _compat_pickle.IMPORT_MAPPING:
                    module = _compat_pickle.IMPORT_MAPPING[module]
            if not isinstance(module, str) or not isinstance(name, str):
                raise PolicyRefused("?", "the pickle names a global that is not a string")
            key = f"{MODULE_ALIASES.get(module, module)}:{name}"
            if key not in _ALLOWED:
                if self.tolerant:
                    return self.jar.poison_class(module, name)
                label = global_label(module, name)
                raise PolicyRefused(label, f"the pickle names {label}, which the policy "
                                           "loader does not allow")
            obj = resolve(key)
            self.handed_out.add(id(obj))
            return obj

        def load_build(self) -> None:
            target = self.stack[-2] if len(self.stack) >= 2 else None
            if isinstance(target, type) or id(target) in self.handed_out:
                name = getattr(target, "__qualname__", type(target).__name__)
                raise PolicyRefused(str(name)[:120], "the pickle tries to modify "
                                    f"{str(name)[:120]}, a class or function of a library")
            Unpickler.load_build(self)  # the plain BUILD; joblib's array records below
            top = self.stack[-1]
            if isinstance(top, NumpyArrayWrapper):
                self.stack[-1] = self._read_array(top)
            _check_made(self.stack[-1])

        def _read_array(self, wrapper: Any) -> Any:
            """What ``NumpyUnpickler.load_build`` does with a joblib array record, except
            that an object array's elements, a nested pickle, are read by a
            :class:`PolicyUnpickler` too (joblib reads them with a plain
            ``pickle._Unpickler`` that only borrows ``find_class``: none of the rules
            above applied there)."""
            import numpy as np

            dtype = getattr(wrapper, "dtype", None)
            if not isinstance(dtype, np.dtype):
                raise PolicyRefused("joblib.numpy_pickle.NumpyArrayWrapper(state)",
                                    "a joblib array record whose dtype is not a numpy dtype")
            if not dtype.hasobject:
                return wrapper.read(self, self.ensure_native_byte_order)
            array = PolicyUnpickler(self.file_handle, self.tolerant, outer=self).load()
            if not isinstance(array, np.ndarray) or not array.dtype.hasobject:
                raise PolicyRefused("joblib.numpy_pickle.NumpyArrayWrapper(state)",
                                    "a joblib object array record whose nested pickle is not "
                                    "an object array")
            return array

        def load_reduce(self) -> None:
            _check_call(self.stack[-2], self.stack[-1], {})
            NumpyUnpickler.load_reduce(self)
            _check_made(self.stack[-1])

        def load_newobj(self) -> None:
            _check_call(self.stack[-2], self.stack[-1], {})
            NumpyUnpickler.load_newobj(self)
            _check_made(self.stack[-1])

        def load_newobj_ex(self) -> None:
            _check_call(self.stack[-3], self.stack[-2], self.stack[-1])
            NumpyUnpickler.load_newobj_ex(self)
            _check_made(self.stack[-1])

        def _instantiate(self, klass: Any, args: Any) -> None:  # OBJ and INST
            _check_call(klass, args, {})
            NumpyUnpickler._instantiate(self, klass, args)
            _check_made(self.stack[-1])

        def load_setitem(self) -> None:
            NumpyUnpickler.load_setitem(self)
            _check_made(self.stack[-1])

        def load_setitems(self) -> None:
            NumpyUnpickler.load_setitems(self)
            _check_made(self.stack[-1])

        dispatch[b"b"[0]] = load_build  # BUILD
        dispatch[b"R"[0]] = load_reduce  # REDUCE
        dispatch[b"\x81"[0]] = load_newobj  # NEWOBJ
        dispatch[b"\x92"[0]] = load_newobj_ex  # NEWOBJ_EX
        dispatch[b"s"[0]] = load_setitem  # SETITEM
        dispatch[b"u"[0]] = load_setitems  # SETITEMS

    return PolicyUnpickler


#: ``numpy.ndarray``'s parameters after ``shape`` and ``dtype``: a buffer (and where in it)
#: makes an array over bytes the pickle chose, which for an object dtype are pointers.
_ARRAY_BUFFER_PARAMETERS = frozenset({"buffer", "offset", "strides"})


def _check_call(callable_: Any, args: Any, kwargs: Any) -> None:
    """Refuse ``numpy.ndarray(shape, dtype, buffer, ...)`` by any opcode that calls or
    instantiates a class (REDUCE, NEWOBJ, NEWOBJ_EX, OBJ, INST): numpy makes an object
    array over the buffer's bytes, so the pickle would hand out any object at an address it
    writes, and forged ones elsewhere. numpy's own pickles never call it so (they name
    ``_reconstruct`` and set the state)."""
    import numpy as np

    if not (isinstance(callable_, type) and issubclass(callable_, np.ndarray)
            and callable_.__new__ is np.ndarray.__new__):
        return
    # The VM unpacks any iterable and any mapping: only a tuple or list (OBJ, INST) and a
    # dict are counted; anything else is refused for this class.
    over = (not isinstance(args, (tuple, list)) or len(args) > 2
            or type(kwargs) is not dict or not _ARRAY_BUFFER_PARAMETERS.isdisjoint(kwargs))
    if over:
        raise PolicyRefused("numpy.ndarray(buffer)", "the pickle builds a numpy array over "
                            "a buffer of its own, whose bytes numpy would take for memory "
                            "addresses; the policy loader does not allow it")


def _is_dunder(key: Any) -> bool:
    return isinstance(key, str) and len(key) > 4 and key[:2] == key[-2:] == "__"


def _check_made(obj: Any) -> None:
    """Refuse an object the pickle built with a dunder name among its attributes: in its
    ``__dict__`` (BUILD, an estimator's ``__setstate__``), or as a key of a mapping whose
    keys are its attributes (scikit-learn's ``Bunch``). Libraries look such names up on the
    instance: numpy takes ``__array_interface__`` / ``__array_struct__`` from it when it
    coerces the object to an array (an array over any address the pickle gives: read,
    write, or objects forged from its bytes), ``copy`` and ``pickle`` take
    ``__reduce_ex__`` / ``__deepcopy__``, scikit-learn ``__sklearn_clone__``. No estimator's
    state holds one."""
    if isinstance(obj, type):
        return
    import numpy as np

    if isinstance(obj, np.dtype):
        _check_dtype(obj)
        return
    sparse = sys.modules.get("scipy.sparse")
    if sparse is not None and sparse.issparse(obj):
        _rebuild_sparse(obj)
    try:
        attributes = object.__getattribute__(obj, "__dict__")
    except (AttributeError, TypeError):
        attributes = None
    names: list[Any] = list(attributes) if isinstance(attributes, dict) else []
    if isinstance(obj, dict) and getattr(type(obj), "__getattr__", None) is not None:
        names.extend(obj.keys())
    for name in names:
        if _is_dunder(name):
            label = f"attribute {name[:80]}"
            raise PolicyRefused(label, f"the pickle gives a {type(obj).__name__[:80]} the "
                                f"attribute {name[:80]}, which libraries look up on the "
                                "instance; the policy loader does not allow it")
    if isinstance(attributes, dict):
        _check_method_names(obj, attributes)


@contextmanager
def _decompressed(fh: IO[bytes]) -> Iterator[IO[bytes]]:
    """The pickle stream of a plain or compressed joblib file (joblib's own detection)."""
    from joblib.numpy_pickle_utils import _validate_fileobject_and_memmap

    with _validate_fileobject_and_memmap(fh, "", None) as (stream, _):
        if isinstance(stream, str):  # joblib < 0.10 kept arrays in files beside the pickle
            raise PolicyRefused("joblib<0.10", "a joblib file older than joblib 0.10 keeps its "
                                "arrays in other files; the policy loader reads one file")
        yield stream


def read(fh: IO[bytes], *, tolerant: bool) -> Reading:
    """Unpickle ``fh`` under the policy; raise :class:`PolicyRefused` (strict) or return the
    object with the globals that were poisoned (tolerant)."""
    unpickler_class = _unpickler_class()
    with _decompressed(fh) as stream:
        unpickler = unpickler_class(stream, tolerant)
        try:
            obj = unpickler.load()
        except WorkerError:
            raise
        except Exception as exc:
            # A tolerant reading whose poison broke the load (object.__new__ of a poisoned
            # class, a reducer given one): the pickle needs what was refused, so say so.
            poisoned = unpickler.jar.poisoned
            if not poisoned:
                raise
            raise PolicyRefused(poisoned[0], f"the pickle cannot be read without {poisoned[0]}, "
                                f"which the policy loader does not allow "
                                f"({type(exc).__name__})", poisoned) from None
    return Reading(obj, unpickler.jar.poisoned)


#: Structured dtypes nest; numpy's own limit is far below what a pickle could build.
_MAX_DTYPE_DEPTH = 32


def _check_dtype(dtype: Any, depth: int = 0) -> None:
    """Refuse a dtype that numpy's constructor would not make from its own description.
    ``dtype.__setstate__`` (BUILD) takes fields, offsets and flags from the pickle as they
    are: a dtype with an object field whose flags say it holds none (numpy then copies the
    array's raw bytes into it: pointers), or an object field overlapping an integer one
    (which the constructor refuses), makes objects from the artifact's numbers."""

    def refuse(why: str) -> PolicyRefused:
        return PolicyRefused("numpy.dtype(state)", f"the pickle sets a numpy dtype's state "
                             f"to one numpy would not construct ({why}); the policy loader "
                             "does not allow it")

    if depth > _MAX_DTYPE_DEPTH:
        raise refuse("nested too deeply")
    try:
        fresh = _constructed(dtype, depth)
    except PolicyRefused:
        raise
    except Exception as exc:
        raise refuse(type(exc).__name__) from None
    if not (fresh == dtype and fresh.flags == dtype.flags
            and fresh.hasobject == dtype.hasobject and fresh.itemsize == dtype.itemsize
            and fresh.alignment == dtype.alignment):
        raise refuse("its flags, sizes or fields differ")
    if dtype.subdtype is not None:
        _check_dtype(dtype.subdtype[0], depth + 1)
    for name in dtype.names or ():
        _check_dtype(dtype.fields[name][0], depth + 1)


def _constructed(dtype: Any, depth: int) -> Any:
    """``dtype`` made again by numpy's constructor from what it says it is."""
    import numpy as np

    if depth > _MAX_DTYPE_DEPTH:
        raise PolicyRefused("numpy.dtype(state)", "the pickle nests a numpy dtype too deeply")
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return np.dtype((_constructed(base, depth + 1), shape))
    if dtype.names is not None:
        fields = dtype.fields
        spec: Any = {
            "names": list(dtype.names),
            "formats": [_constructed(fields[n][0], depth + 1) for n in dtype.names],
            "offsets": [fields[n][1] for n in dtype.names],
            "itemsize": dtype.itemsize,
        }
        titles = [fields[n][2] if len(fields[n]) > 2 else None for n in dtype.names]
        if any(t is not None for t in titles):
            spec["titles"] = titles
        return np.dtype(spec, align=dtype.isalignedstruct)
    return np.dtype(dtype.str)


def _rebuild_sparse(matrix: Any) -> None:
    """A scipy sparse matrix the pickle built (BUILD sets its ``__dict__`` as it is; the
    constructor checks only shapes) made again by its constructor from copies of its arrays
    and fully checked: scipy's C++ routines (``toarray``, products, ``tocsr``) index their
    buffers with its indices unchecked, so an index outside the matrix is a write outside a
    buffer (skl2onnx's SVM converter calls ``toarray``). Copies, so that BUILD on one of the
    pickle's arrays afterwards cannot change the matrix. A matrix with no state yet (NEWOBJ
    before its BUILD) is left for that BUILD."""
    import numpy as np

    state = object.__getattribute__(matrix, "__dict__")
    if "_shape" not in state:
        return
    kind = type(matrix)
    try:
        shape = tuple(int(n) for n in state["_shape"])
        data = np.array(state["data"], copy=True)
        if matrix.format in ("csr", "csc"):
            fresh = kind((data, np.array(state["indices"], copy=True),
                          np.array(state["indptr"], copy=True)), shape=shape)
            fresh.check_format(full_check=True)
        elif matrix.format == "coo":
            coords = tuple(np.array(c, copy=True) for c in state["coords"])
            fresh = kind((data, coords), shape=shape)  # _check: every index in the shape
        else:
            raise ValueError(f"format {matrix.format!r}")
        if fresh.data.dtype.hasobject:
            raise ValueError("object data")
    except Exception as exc:
        raise PolicyRefused(f"{kind.__module__}.{kind.__qualname__}(state)"[:120],
                            f"the pickle builds a scipy sparse matrix scipy would not "
                            f"({type(exc).__name__}: {str(exc)[:120]}); the policy loader "
                            "does not allow it") from None
    state.clear()
    state.update(object.__getattribute__(fresh, "__dict__"))


_RESPONSE_METHODS = frozenset({"predict", "predict_proba", "predict_log_proba",
                               "decision_function"})
#: Attributes whose values scikit-learn calls as methods (``getattr(estimator, name)(X)``),
#: by the class that keeps them (``module``, ``qualname``), and the names its own ``fit``
#: or constructor writes there: stacking's ``_transform``, ``_get_response_values`` for the
#: threshold classifiers and ``ClassifierChain``.
_METHOD_NAME_ATTRIBUTES: dict[tuple[str, str], dict[str, frozenset[str]]] = {
    ("sklearn.ensemble._stacking", "_BaseStacking"): {
        "stack_method_": frozenset({"predict", "predict_proba", "decision_function", "drop"}),
    },
    ("sklearn.model_selection._classification_threshold", "BaseThresholdClassifier"): {
        "response_method": frozenset({"auto", "predict_proba", "decision_function"}),
    },
    ("sklearn.multioutput", "ClassifierChain"): {
        "chain_method_": _RESPONSE_METHODS,
        "chain_method": _RESPONSE_METHODS,
    },
}


def _check_method_names(obj: Any, attributes: dict[str, Any]) -> None:
    """Refuse an estimator whose state names a method scikit-learn will call that its own
    ``fit`` would never have named: the pickle would choose which method of its estimators
    parity runs (``Pipeline.fit``, whose ``memory`` then writes where the pickle says)."""
    for (module, qualname), checked in _METHOD_NAME_ATTRIBUTES.items():
        cls = getattr(sys.modules.get(module), qualname, None)
        if cls is None or not isinstance(obj, cls):
            continue
        for attribute, allowed in checked.items():
            if attribute not in attributes:
                continue
            value = attributes[attribute]
            values = value if isinstance(value, (list, tuple)) else [value]
            if not all(type(v) is str and v in allowed for v in values):
                raise PolicyRefused(
                    f"{type(obj).__name__}.{attribute}"[:120],
                    f"the pickle sets {type(obj).__name__[:80]}.{attribute}, the name of a "
                    f"method scikit-learn calls, to {str(value)[:80]!r}; the policy loader "
                    f"allows only {', '.join(sorted(allowed))}")

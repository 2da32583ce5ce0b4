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
    from joblib.numpy_pickle import NumpyUnpickler

    class PolicyUnpickler(NumpyUnpickler):  # type: ignore[misc]
        dispatch = NumpyUnpickler.dispatch.copy()

        def __init__(self, fh: IO[bytes], tolerant: bool) -> None:
            super().__init__("", fh, ensure_native_byte_order=True)
            self.tolerant = tolerant
            self.jar = PoisonJar()
            self.handed_out: set[int] = set()

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
            NumpyUnpickler.load_build(self)

        dispatch[b"b"[0]] = load_build  # BUILD

    return PolicyUnpickler


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

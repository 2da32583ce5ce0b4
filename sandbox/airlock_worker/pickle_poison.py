"""What a restricted reading hands a pickle for a global it does not allow: a :class:`Poison`
class per name, which records whatever the pickle does with it and runs nothing. Shared by
the checkpoint reader (:mod:`.extract_unpickler`) and the estimator policy loader
(:mod:`.policy_loader`), so both readings treat an unknown global the same way."""

from __future__ import annotations

import _compat_pickle
from typing import Any, ClassVar

from .extract_errors import NOT_EXTRACTABLE, Refused, Unextractable

#: Distinct globals the pickle may name before we stop recording them.
MAX_POISON_GLOBALS = 10_000


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
        raise Unextractable(f"{NOT_EXTRACTABLE}: a dict key is a {self.global_name}")

    __repr__ = __str__


def global_label(module: str, name: str) -> str:
    """``module.name`` as a person reads it (protocol 2 writes ``__builtin__`` for
    ``builtins``), bounded."""
    shown = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{shown}.{name}"[:120]


class PoisonJar:
    """One :class:`Poison` class per global name a reading refused, in the order named."""

    def __init__(self) -> None:
        self._classes: dict[tuple[str, str], type[Poison]] = {}

    @property
    def poisoned(self) -> list[str]:
        return [cls.global_name for cls in self._classes.values()]

    def poison_class(self, module: str, name: str) -> type[Poison]:
        cls = self._classes.get((module, name))
        if cls is None:
            if len(self._classes) >= MAX_POISON_GLOBALS:
                raise Refused(f"the pickle names more than {MAX_POISON_GLOBALS} globals")
            cls = _Immutable("Poison", (Poison,), {"global_name": global_label(module, name),
                                                   "__slots__": ()})
            self._classes[(module, name)] = cls
        return cls

"""The policy loader's allowlist (sandbox/airlock_worker/estimator_allowlist.py) walked entry by
entry against the rule its docstring states, in the library versions the image pins.

The rule, mechanised:
1. every entry is named once and resolves in these versions;
2. a CLASS entry is a class that is data: not a metaclass, module, function, method or
   partial type, and defined where the entry says (a pickle names the defining module);
3. a function is allowed only as a RECONSTRUCTOR entry;
4. Python code the pickle VM can reach through an entry (a function entry itself; a class's
   ``__new__``, ``__init__``, ``__setstate__``, ``__setitem__``, ``append``, ``extend``,
   ``add``, inherited or not) names none of the builtins or functions that run code, import
   modules or open files (CODE_RUNNERS), in its own code or nested code;
5. an entry whose reachable code is not Python (C, Cython) sits in a group marked native,
   whose ``why`` says what it does with its arguments;
6. known gadgets are not entries.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from typing import Any

import pytest

from airlock_worker.estimator_allowlist import ALLOWLIST, SUBSTITUTES, Kind, entries
from airlock_worker.estimator_classes import ESTIMATOR_CLASSES
from airlock_worker.policy_loader import resolve

#: Names whose presence in reachable code means the code can run, import or open something.
CODE_RUNNERS = frozenset({
    "eval", "exec", "compile", "__import__", "import_module", "reload", "system", "popen",
    "Popen", "spawnv", "spawnve", "execv", "execve", "execvp", "fork", "open", "load",
    "loads", "run_path", "run_module", "getattr", "setattr", "delattr", "globals",
    "__builtins__", "attrgetter", "methodcaller", "partial", "ctypes", "cdll",
})
#: What the pickle VM calls on an object it built or was handed.
VM_REACHED = ("__new__", "__init__", "__setstate__", "__setitem__", "append", "extend", "add")
#: Reachable Python code that names a CODE_RUNNER and was read by a person: the name, where,
#: and why it is harmless. Keep this short; every line is a decision.
REVIEWED: dict[tuple[str, str], str] = {
    ("numpy.ma:MaskedArray.__new__", "getattr"):
        "reads the attributes _baseclass, _fill_value and _hardmask of its data, by name",
    ("numpy.ma:MaskedArray.__setitem__", "getattr"): "reads the attribute _data, by name",
    **{(f"{lib}:Booster.{attr}", "ctypes"):
       "hands the model bytes to the library's parser (the group's why)"
       for lib in ("xgboost.core", "lightgbm.basic") for attr in ("__init__", "__setstate__")},
}

GADGETS = (
    "builtins:eval", "builtins:exec", "builtins:compile", "builtins:getattr",
    "builtins:setattr", "builtins:__import__", "builtins:open", "builtins:type",
    "builtins:globals", "builtins:breakpoint", "os:system", "posix:system", "os:popen",
    "subprocess:Popen", "subprocess:run", "functools:partial", "functools:reduce",
    "operator:attrgetter", "operator:methodcaller", "operator:itemgetter",
    "importlib:import_module", "runpy:run_path", "pickle:loads", "_pickle:loads",
    "marshal:loads", "types:FunctionType", "types:CodeType", "code:InteractiveInterpreter",
    "numpy:load", "numpy._core:_ufunc_reconstruct", "numpy.lib.npyio:load",
    "numpy.testing._private.utils:runstring", "joblib:load", "torch:load",
    "copyreg:__newobj_ex__", "pdb:run", "timeit:timeit", "sys:modules",
)


def _entries() -> list[tuple[str, Any]]:
    return [(name, group) for group in ALLOWLIST for name in group.names]


def _resolved() -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: resolve(name) for name, _ in _entries()}


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _python_code(obj: Any) -> types.CodeType | None:
    fn = getattr(obj, "__func__", obj)
    fn = getattr(fn, "__wrapped__", fn)
    code = getattr(fn, "__code__", None)
    return code if isinstance(code, types.CodeType) else None


def _reached(name: str, obj: Any, kind: Kind) -> list[tuple[str, Any]]:
    """(label, callable) the pickle VM can run through this entry."""
    if kind is Kind.RECONSTRUCTOR:
        return [(name, obj)]
    found = []
    for attr in VM_REACHED:
        member = inspect.getattr_static(obj, attr, None)
        if member is None:
            continue
        found.append((f"{name}.{attr}", getattr(obj, attr)))
    return found


def test_every_entry_is_named_once() -> None:
    names = [name for name, _ in _entries()]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    assert set(entries()) == set(names)
    assert all(":" in n and " " not in n for n in names)


def test_every_entry_resolves() -> None:
    resolved = _resolved()
    assert len(resolved) == len(_entries())
    assert all(obj is not None for obj in resolved.values())


def test_classes_are_data_types_and_functions_are_declared_reconstructors() -> None:
    forbidden_bases = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
                       types.MethodType, functools.partial, staticmethod, classmethod,
                       property, types.CodeType)
    for (name, group), obj in zip(_entries(), _resolved().values(), strict=True):
        if group.kind is Kind.CLASS:
            assert isinstance(obj, type), f"{name} is not a class"
            assert not issubclass(obj, forbidden_bases), f"{name} is a {obj.__mro__[1]}"
        else:
            assert not isinstance(obj, type), f"{name} is a class listed as a function"
            assert callable(obj), name


def test_reachable_python_code_names_nothing_that_runs_code() -> None:
    offenders = []
    for (name, group), obj in zip(_entries(), _resolved().values(), strict=True):
        for label, fn in _reached(name, obj, group.kind):
            code = _python_code(fn)
            if code is None:
                continue
            for hit in sorted(_code_names(code) & CODE_RUNNERS):
                if (label, hit) not in REVIEWED:
                    offenders.append(f"{label} names {hit}")
    assert not offenders, offenders


def test_entries_without_python_code_are_declared_native() -> None:
    undeclared = []
    for (name, group), obj in zip(_entries(), _resolved().values(), strict=True):
        if group.native or name in SUBSTITUTES:
            continue
        for label, fn in _reached(name, obj, group.kind):
            if _python_code(fn) is None and not _is_object_slot(obj, label):
                undeclared.append(label)
    assert not undeclared, f"native code in groups not marked native: {undeclared}"


def _is_object_slot(obj: Any, label: str) -> bool:
    """A slot inherited unchanged from a builtin type (``object.__init__``, ``dict.__setitem__``
    of a dict subclass): Python's own container code."""
    attr = label.rsplit(".", 1)[-1]
    if not isinstance(obj, type):
        return False
    return any(base.__module__ == "builtins" and attr in vars(base)
               and getattr(obj, attr) == getattr(base, attr) for base in obj.__mro__)


def test_every_group_says_why() -> None:
    for group in ALLOWLIST:
        assert len(group.why) > 40, group.names[:2]


@pytest.mark.parametrize("gadget", GADGETS)
def test_known_gadgets_are_not_entries(gadget: str) -> None:
    assert gadget not in entries()


def test_the_generated_estimator_list_covers_the_installed_libraries() -> None:
    """scripts/gen-estimator-classes.py was run for these versions (re-run it after an
    upgrade and review the diff)."""
    from sklearn.utils import all_estimators

    listed = set(ESTIMATOR_CLASSES)
    missing = [f"{cls.__module__}:{cls.__qualname__}" for _, cls in all_estimators()
               if f"{cls.__module__}:{cls.__qualname__}" not in listed]
    assert not missing, missing
    for name in ("xgboost.sklearn:XGBClassifier", "lightgbm.sklearn:LGBMRegressor"):
        assert name in listed

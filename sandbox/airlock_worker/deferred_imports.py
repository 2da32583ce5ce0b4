"""SciPy and numpy packages a sklearn container imports only when its job uses them.

scikit-learn imports ``scipy.stats`` (``sklearn.utils.fixes``), ``scipy.interpolate``
(``sklearn.preprocessing._polynomial``, for ``SplineTransformer``) and ``scipy.integrate``
(``sklearn.metrics._ranking``, for ``auc``) as it imports, and a sklearn container's warm-up
imports scikit-learn. Nothing in them runs until a job fits or transforms with a model that
calls them (``QuantileTransformer``'s normal output, ``MinCovDet``, ``IsotonicRegression``'s
fit, a ``SplineTransformer``...); a conversion of a linear model or a forest never does.
Measured in the sandbox image, ``--cpus 1``, on a quiet machine:

- ``scipy.stats``, the largest single import of that warm-up (with its distributions and the
  SciPy packages only they use): 0.587-0.609 CPU-s with it and 0.472-0.479 deferred, five runs
  each, alternating; 179 MiB resident against 166 (1656 modules against 1566).
- ``scipy.interpolate`` and ``scipy.integrate`` on top (2026-12-06, four runs each,
  alternating, on a slower boot): 0.842-0.933 CPU-s without, 0.707-0.905 with, median 0.85
  against 0.74; 1501 modules against 1566. ``scipy.optimize`` is imported all the same
  (``sklearn.linear_model`` imports its submodules by name), so only their own code and
  ``scipy.interpolate``'s splines go.
- ``numpy.f2py`` and ``numpy.testing`` (2026-12-07, eight runs each, alternating, on a busy
  machine): SciPy's array-API layer runs ``from numpy import *``, which imports every
  subpackage numpy lists, the Fortran wrapper generator and the test helpers among them;
  skl2onnx and onnxmltools bind three ``numpy.testing`` asserts at import. 0.630-0.749
  CPU-s with them, 0.626-0.826 deferred, median 0.709 against 0.656; 1501 modules against
  1480. (``numpy.ma`` stays: ``sklearn.model_selection`` binds its ``MaskedArray`` class.)

So the warm-up puts a stand-in module under the package's name (``defer``) before scikit-learn
imports it. Nothing is changed about what a job may do or what it computes; only when the
package's code runs:

- ``import scipy.stats`` and ``from scipy import stats`` bind the stand-in. Any attribute read
  from it imports the real package (Python's own import, with its own locks) and answers from
  it; from then on ``sys.modules`` and ``scipy.stats`` hold the real package. While the
  package runs, its parent's attribute is left unset, so that its own ``import
  scipy.stats.X.Y as z`` finds the package, not the stand-in.
- ``from scipy.stats import NAME`` reads ``NAME`` at import time. For the few names
  scikit-learn binds so (``EARLY``) the stand-in gives a forwarder that imports the package
  when it is first called or read from (so only functions and objects used so belong there,
  such as a class whose attributes alone are read, ``BSpline.construct_fast``: never a class
  something subclasses or tests ``isinstance`` against, never a submodule).
  Any other name imports the package at once: a scikit-learn that binds a new one is slower,
  not wrong (``tests/unit/test_deferred_imports.py`` says which name).
- A submodule imported before the package (an unpickled frozen distribution names
  ``scipy.stats._distn_infrastructure``) imports the package first, as Python does, and then
  the submodule once: the package may have imported it already (``_SubmoduleFinder``).

What a job computes is the same (the test compares the ONNX bytes, the reports and SciPy's
results with and without). The container is single-use, so nothing outlives its job.

pandas is not deferred but hidden (``hidden``): scikit-learn tries ``import pandas`` as it
imports (``sklearn.utils.fixes``) and binds ``None`` when it is missing, a name nothing
reads; everywhere else it looks pandas up in ``sys.modules`` when it runs, so a stand-in
there would import pandas in every job's first ``predict``. Hidden during the warm-up, the
import fails as if pandas were not installed (measured in the sandbox image, ``--cpus 1``:
1801 modules and 0.90-1.02 CPU-s with it, 1482 and 0.64-0.73 without); a job whose model was
fitted on a DataFrame imports it itself (column_inputs.py), and scikit-learn finds it from
then on.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

#: Packages deferred in a sklearn container, and the names imported from each (``from P import
#: NAME``) while scikit-learn 1.9 and its converters import.
EARLY: dict[str, frozenset[str]] = {
    "scipy.stats": frozenset({"chi2", "gmean", "rankdata", "spearmanr"}),
    "scipy.interpolate": frozenset({"BSpline"}),  # only its attributes are read (no isinstance)
    "scipy.integrate": frozenset({"trapezoid"}),
    "numpy.f2py": frozenset(),
    # skl2onnx.helpers.investigate, onnxmltools.utils.utils_backend: functions only
    "numpy.testing": frozenset({"assert_almost_equal", "assert_array_almost_equal",
                                "assert_array_equal"}),
}


class _StandIn(types.ModuleType):
    """What ``sys.modules[name]`` holds until the package is first used."""

    def __init__(self, spec: importlib.machinery.ModuleSpec, early: frozenset[str]) -> None:
        super().__init__(spec.name)
        self.__spec__ = spec
        self.__loader__ = spec.loader
        self.__file__ = spec.origin
        self.__package__ = spec.name
        self.__path__ = list(spec.submodule_search_locations or ())
        self._airlock_early = early
        self._airlock_real: types.ModuleType | None = None
        self._airlock_lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:  # only for names not set above
        if self._airlock_real is None and name in self._airlock_early:
            return _Forwarder(self, name)
        return getattr(self.load(), name)

    def load(self) -> types.ModuleType:
        """The real package, imported on the first call."""
        real = self._airlock_real
        if real is None:
            with self._airlock_lock:  # only the swap: the import takes Python's own locks
                if sys.modules.get(self.__name__) is self:
                    del sys.modules[self.__name__]
                # While the package runs, ``import PARENT.NAME.SUB as x`` in it reads the
                # parent's attribute: the package itself, not this stand-in (Python sets it
                # once the package is imported).
                parent, _, child = self.__name__.rpartition(".")
                if parent and getattr(sys.modules.get(parent), child, None) is self:
                    delattr(sys.modules[parent], child)
            real = importlib.import_module(self.__name__)
            self._airlock_real = real
        return real

    @property
    def loaded(self) -> bool:
        return self._airlock_real is not None


class _Forwarder:
    """A name bound from a package before the package was imported: calling it, or reading
    an attribute of it, imports the package and uses the real object."""

    __slots__ = ("_module", "_name")

    def __init__(self, module: _StandIn, name: str) -> None:
        self._module = module
        self._name = name

    def _target(self) -> Any:
        return getattr(self._module.load(), self._name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._target()(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target(), attr)

    def __repr__(self) -> str:
        return f"<{self._module.__name__}.{self._name}, imported on first use>"


class _Existing(importlib.abc.Loader):
    """Loads a submodule of a deferred package: imports the package, then hands back the
    submodule, which the package's own import may have created already."""

    def __init__(self, stand_in: _StandIn, name: str) -> None:
        self._stand_in = stand_in
        self._name = name
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        self._stand_in.load()
        module = sys.modules.get(self._name) or importlib.import_module(self._name)
        self._spec = module.__spec__  # the import system overwrites it with ``spec``
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self._spec  # already executed: only its own spec back


class _SubmoduleFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: a submodule of a package still deferred is loaded by
    ``_Existing``; anything else is left to the finders after it."""

    def __init__(self, stand_in: _StandIn) -> None:
        self._stand_in = stand_in

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        package = self._stand_in.__name__
        if (self._stand_in.loaded or not fullname.startswith(package + ".")
                or sys.modules.get(package) is not self._stand_in):
            return None
        return importlib.util.spec_from_loader(fullname, _Existing(self._stand_in, fullname))


def defer(package: str, early: Iterable[str]) -> _StandIn | None:
    """Put a stand-in for ``package`` in ``sys.modules``; None (and nothing done) if the
    package is imported already or not installed. ``early``: names bound from it at import
    time, which get forwarders."""
    if package in sys.modules:
        return None
    try:
        spec = importlib.util.find_spec(package)  # imports the parent package, if any
    except ImportError:  # the parent is not installed
        return None
    if spec is None or spec.loader is None:
        return None
    stand_in = _StandIn(spec, frozenset(early))
    sys.meta_path.insert(0, _SubmoduleFinder(stand_in))
    sys.modules[package] = stand_in
    parent, _, child = package.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, stand_in)
    return stand_in


def defer_all(early: dict[str, frozenset[str]] = EARLY) -> list[str]:
    """Defer each package of ``early``; the names of those deferred."""
    return [package for package, names in early.items() if defer(package, names)]


#: Packages the sklearn warm-up must not import at all (the module's docstring).
HIDDEN = frozenset({"pandas"})


class _Hidden(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path`` meanwhile: a hidden package (or module) is not found."""

    def __init__(self, packages: frozenset[str]) -> None:
        self.packages = packages

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if any(fullname == p or fullname.startswith(p + ".") for p in self.packages):
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden for now)",
                                      name=fullname)
        return None


@contextlib.contextmanager
def hidden(packages: frozenset[str] = HIDDEN) -> Iterator[None]:
    """While it lasts, importing one of ``packages`` (or a submodule) fails as if it were not
    installed; one imported already stays as it is. Also skops_import.py's."""
    finder = _Hidden(packages)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)

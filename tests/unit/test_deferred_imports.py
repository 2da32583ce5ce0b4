"""A sklearn container defers ``scipy.stats``, ``scipy.interpolate``, ``scipy.integrate``,
``numpy.f2py`` and ``numpy.testing`` until its job uses them (airlock_worker.deferred_imports):
the warm-up must not import them with the pinned scikit-learn, and a job must compute the same
either way: the same ONNX bytes and reports, the same results through the names scikit-learn
and the converters bound early, and one module object per submodule when an unpickled object
names a submodule before anything used the package.

No artifact is loaded: the models are built (fitted) in the test's own processes, and the two
pickles are made here, of a SciPy distribution and of a fitted ``SplineTransformer`` (whose
splines are ``scipy.interpolate`` objects)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import scipy.stats
from sklearn.preprocessing import SplineTransformer

from tests.unit.fresh_interpreters import printed_results

ROOT = Path(__file__).resolve().parents[2]

#: In a fresh interpreter: the deferred packages imported first ("eager", which leaves nothing
#: to defer) or not; the sklearn warm-up; two conversions through the worker's path; then the
#: package used, first through a pickled frozen distribution (a submodule) or first through
#: the names scikit-learn bound at import (``EARLY``). Prints all of it.
_RUN = r'''
import importlib, json, os, pickle, sys, traceback
import numpy as np
sys.path[:0] = [sys.argv[1] + "/sandbox", sys.argv[1]]
variant, frozen, spline = sys.argv[3], bytes.fromhex(sys.argv[4]), bytes.fromhex(sys.argv[5])
packages = sys.argv[6].split(",")
from airlock_worker import deferred_imports, profiles
if variant == "eager":
    for package in packages:
        importlib.import_module(package)
first_load = []
real_load = deferred_imports._StandIn.load
def load(self):
    if not first_load:
        first_load.append("".join(traceback.format_stack(limit=8)[:-1]))
    return real_load(self)
deferred_imports._StandIn.load = load
def deferred():
    return not first_load and all(isinstance(sys.modules.get(package), deferred_imports._StandIn)
                                  for package in packages)
profiles.warm_up("sklearn")
out = {"deferred_after_warm_up": deferred()}
from tests.unit.worker_outputs import two_conversions
out.update(two_conversions(sys.argv[2], variant))
out["deferred_after_conversions"] = deferred()
out["first_load"] = first_load[0] if first_load else ""

def unpickled():
    dist = pickle.loads(frozen)  # names scipy.stats._distn_infrastructure
    splines = pickle.loads(spline)  # names scipy.interpolate._bsplines
    import scipy.stats, scipy.stats._distn_infrastructure as infra
    import scipy.interpolate, scipy.interpolate._bsplines as bsplines
    return {"value": float(dist.ppf(0.25)),
            "isinstance": isinstance(dist, scipy.stats.distributions.rv_frozen)
                          and isinstance(splines.bsplines_[0], scipy.interpolate.BSpline),
            "one_module": sys.modules["scipy.stats._distn_infrastructure"] is infra
                          and scipy.stats._distn_infrastructure is infra
                          and type(dist).__module__ == infra.__name__
                          and sys.modules["scipy.interpolate._bsplines"] is bsplines
                          and scipy.interpolate._bsplines is bsplines
                          and type(splines.bsplines_[0]).__module__ == bsplines.__name__,
            "splines": splines.transform([[0.25], [0.5], [2.0]]).round(12).tolist()}

def early_names():
    from sklearn._loss import link
    from sklearn.covariance import _robust_covariance
    from sklearn.metrics import _ranking
    from sklearn.preprocessing import SplineTransformer, _polynomial
    from sklearn import isotonic
    x = [[0.0], [0.5], [1.0], [1.5], [3.0]]
    return [_ranking.rankdata([3.0, 1.0, 2.0, 2.0], "max").tolist(),
            float(link.gmean([1.0, 2.0, 4.0])),
            float(isotonic.spearmanr([1, 2, 3, 4], [1, 3, 2, 4])[0]),
            float(_robust_covariance.chi2(3).isf(0.5)),
            float(_robust_covariance.chi2.ppf(0.5, 3)),
            float(_ranking.trapezoid([1.0, 2.0, 4.0], [0.0, 1.0, 3.0])),
            float(_ranking.auc([0.0, 0.5, 1.0], [0.0, 0.75, 1.0])),
            float(_polynomial.BSpline.construct_fast(
                np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0]), 2)(0.5)),
            SplineTransformer(n_knots=3, degree=2).fit(x).transform(x).round(12).tolist(),
            numpy_asserts()]

def numpy_asserts():
    """The numpy.testing names the converters bound: they pass and fail as numpy's own."""
    from skl2onnx.helpers import investigate
    from onnxmltools.utils import utils_backend
    checks = ((investigate.assert_almost_equal, 1.0, 1.0 + 1e-9, 1.0, 1.1),
              (utils_backend.assert_array_almost_equal, [1.0, 2.0], [1.0, 2.0], [1.0], [1.5]),
              (utils_backend.assert_array_equal, [1, 2], [1, 2], [1, 2], [1, 3]))
    out = []
    for check, same, close, one, other in checks:
        check(same, close)
        try:
            check(one, other)
            out.append("passed")
        except AssertionError:
            out.append("failed")
    return out

if variant == "submodule-first":
    out["unpickled"], out["early_names"] = unpickled(), early_names()
else:
    out["early_names"], out["unpickled"] = early_names(), unpickled()
import scipy, scipy.stats, scipy.interpolate, scipy.integrate, numpy.f2py, numpy.testing
# Reading a name loads a package nothing used yet (numpy.f2py's, here).
names_read = all(hasattr(module, name) for module, name in (
    (scipy.stats, "norm"), (scipy.interpolate, "BSpline"), (scipy.integrate, "quad"),
    (numpy.f2py, "run_main"), (numpy.testing, "assert_allclose")))
out["real_module_in_place"] = names_read and all(
    sys.modules[package] is getattr(sys.modules[package.rpartition(".")[0]],
                                    package.rpartition(".")[2])
    and type(sys.modules[package]) is type(os) for package in packages)
print("RESULT " + json.dumps(out, sort_keys=True))
'''

VARIANTS = ("eager", "names-first", "submodule-first")
#: What the warm-up leaves unimported (about 0.3 CPU-s of a sklearn container's start).
DEFERRED = ("scipy.stats", "scipy.interpolate", "scipy.integrate", "numpy.f2py",
            "numpy.testing")


def test_deferred_packages_are_not_imported_by_the_warm_up_and_change_no_result(
        tmp_path: Path) -> None:
    frozen = pickle.dumps(scipy.stats.uniform(loc=1.0, scale=2.0)).hex()
    spline = pickle.dumps(SplineTransformer(n_knots=4).fit(np.linspace(0, 2, 9)[:, None])).hex()
    results = dict(zip(VARIANTS, printed_results(
        *(["-c", _RUN, str(ROOT), str(tmp_path), variant, frozen, spline, ",".join(DEFERRED)]
          for variant in VARIANTS)), strict=True))
    eager = results.pop("eager")
    assert eager.pop("deferred_after_warm_up") is False  # the control: nothing to defer
    assert eager.pop("deferred_after_conversions") is False
    eager.pop("first_load")
    for variant, result in results.items():
        # The warm-up, and converting a pipeline and a forest, never imported the packages.
        # If this fails after a scikit-learn upgrade, first_load says which import read a
        # name not in deferred_imports.EARLY.
        assert result.pop("deferred_after_warm_up") is True, result["first_load"]
        assert result.pop("deferred_after_conversions") is True, result["first_load"]
        result.pop("first_load")
        # Used afterwards, the package is the real one, and every result is the same.
        assert result == eager, variant
    assert {key: eager["unpickled"][key] for key in ("value", "isinstance", "one_module")} \
        == {"value": 1.5, "isinstance": True, "one_module": True}
    assert len(eager["unpickled"]["splines"]) == 3
    assert eager["early_names"][-1] == ["failed"] * 3  # each forwarded assert still asserts
    assert eager["real_module_in_place"] is True
    assert set(eager) == {"pipeline", "forest", "unpickled", "early_names",
                          "real_module_in_place"}


#: A package tree of the test's own: ``pkgx.heavy`` counts its runs in ``pkgx.RUNS``, and its
#: submodule imports its own submodule through the parents while both are still running
#: (``import a.b.c.d as x``, as ``scipy.spatial.transform`` does). ``sub`` is also bound early
#: (``from pkgx.heavy import sub``), so the stand-in has a forwarder for that name.
_TREE = {
    "pkgx/__init__.py": "RUNS = []\n",
    "pkgx/heavy/__init__.py": ("import pkgx, time\npkgx.RUNS.append('heavy')\n"
                               "time.sleep(0.2)  # long enough for first uses to meet\n"
                               "import pkgx.heavy.sub\n"
                               "def twice(x):\n    return 2 * x\n"
                               "class Base:\n    pass\n"),
    "pkgx/heavy/sub/__init__.py": ("import pkgx\npkgx.RUNS.append('sub')\n"
                                   "import pkgx.heavy.sub.leaf as leaf\n"),
    "pkgx/heavy/sub/leaf.py": "import pkgx\npkgx.RUNS.append('leaf')\nVALUE = 7\n",
}

_MECHANISM = r'''
import json, sys
sys.path[:0] = [sys.argv[1] + "/sandbox", sys.argv[2]]
import pkgx
from airlock_worker import deferred_imports
stand_in = deferred_imports.defer("pkgx.heavy", {"twice", "sub"})
out = {}
if sys.argv[3] == "name-first":
    from pkgx.heavy import twice      # a forwarder: nothing has run yet
    out["before"] = list(pkgx.RUNS)
    out["value"] = twice(21)
elif sys.argv[3] == "threads":          # eight first uses at once, through all three ways
    import threading
    from pkgx.heavy import twice
    out["before"] = list(pkgx.RUNS)
    start, values = threading.Barrier(8), []
    def use(way):
        start.wait()
        if way == 0:
            values.append(twice(21))
        elif way == 1:
            values.append(stand_in.twice(21))
        else:
            import pkgx.heavy.sub.leaf as leaf
            values.append(leaf.VALUE * 6)
    threads = [threading.Thread(target=use, args=(i % 3,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    out["value"] = values[0] if values == [42] * 8 else values
else:
    import pkgx.heavy.sub.leaf as leaf  # a submodule before the package
    out["before"] = []
    out["value"] = leaf.VALUE * 6
import pkgx.heavy, pkgx.heavy.sub.leaf
out["runs"] = sorted(pkgx.RUNS)
out["one_leaf"] = (pkgx.heavy.sub.leaf is sys.modules["pkgx.heavy.sub.leaf"]
                   is sys.modules["pkgx.heavy.sub"].leaf)
out["real"] = sys.modules["pkgx.heavy"] is pkgx.heavy and type(pkgx.heavy) is type(sys)
out["through_stand_in"] = stand_in.Base is pkgx.heavy.Base
print("RESULT " + json.dumps(out, sort_keys=True))
'''


def test_a_deferred_package_runs_once_whichever_way_and_however_often_it_is_first_used(
        tmp_path: Path) -> None:
    for name, text in _TREE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cases = ("name-first", "submodule-first", "threads")
    for case, result in zip(cases, printed_results(
            *(["-c", _MECHANISM, str(ROOT), str(tmp_path), case] for case in cases)),
            strict=True):
        assert result == {
            "before": [], "value": 42, "runs": ["heavy", "leaf", "sub"], "one_leaf": True,
            "real": True, "through_stand_in": True}, case


def test_nothing_is_deferred_that_is_imported_already_or_not_installed() -> None:
    import sys

    from airlock_worker import deferred_imports

    before = (dict(sys.modules), list(sys.meta_path))
    assert deferred_imports.defer("json", ()) is None  # imported already
    assert deferred_imports.defer("airlock_no_such_package.sub", ()) is None
    assert deferred_imports.defer("json.airlock_no_such_module", ()) is None
    assert (dict(sys.modules), list(sys.meta_path)) == before


#: In a fresh interpreter: the sklearn warm-up, two conversions of models fitted on arrays,
#: then pandas imported by hand, as a DataFrame's job does (column_inputs.frame).
_PANDAS = r'''
import json, sys
sys.path[:0] = [sys.argv[1] + "/sandbox", sys.argv[1]]
from airlock_worker import profiles
profiles.warm_up("sklearn")
out = {"after_warm_up": "pandas" in sys.modules}
from tests.unit.worker_outputs import two_conversions
two_conversions(sys.argv[2], "plain")
out["after_conversions"] = "pandas" in sys.modules
import pandas
out["importable"] = callable(pandas.DataFrame)
print("RESULT " + json.dumps(out))
'''


def test_pandas_is_hidden_from_the_warm_up_and_left_to_a_dataframes_job(tmp_path: Path) -> None:
    """scikit-learn imports pandas as it imports, when installed (sklearn.utils.fixes): 320
    modules, ~0.25 CPU-s of every sklearn container's start, for the few jobs whose model was
    fitted on a DataFrame."""
    (result,) = printed_results(["-c", _PANDAS, str(ROOT), str(tmp_path)])
    assert result == {"after_warm_up": False, "after_conversions": False, "importable": True}

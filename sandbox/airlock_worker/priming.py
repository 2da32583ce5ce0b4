"""Pay a profile's first-call costs while the container is warm and idle.

Every container runs exactly one job, so without this every job pays what a library does
only on its first call in a process: skl2onnx's lazy imports and converter/parser lookups,
the ONNX checker's schema tables, ONNX Runtime's environment and first session. Measured in
the sandbox image (bench.profile, S1): the first job in a process spent 11 ms in skl2onnx and
8 ms in parity, later ones 7 and 3. So the warm-up runs one tiny conversion through the same
functions a job calls, on a model built here from code (never read from a file), and
discards the result. Nothing reaches the output directory or the report.

What a job could observe of it: the same process state a job of that kind leaves behind, and
nothing it would not have set up itself. skl2onnx's converter registry is only read (the
model holds no XGBoost/LightGBM step, so ``_register_boosters`` registers nothing); parity
draws from its own seeded generator, not numpy's global one; the priming Report is thrown
away. The conversions are deterministic, so a job's output is the same bytes either way
(``tests/unit/test_worker_priming.py`` checks that against a fresh process).

Cost: ~20 ms of CPU per sklearn container (measured with ``--cpus 1``), against ~8 ms saved
per job. Not primed: the torch profile (its first-call costs, torch.load + save_file + the
check of a small state dict, are ~4 ms, noise beside a real checkpoint's write) and tree
ensembles (priming a 2-tree forest too cost 10 ms more per container and saved ~1 ms on S2).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from airlock_sandbox.formats import PROFILE_SKLEARN

from .report import Report

#: Features of the priming model: small, but more than one so that no code path special-cases it.
_FEATURES = 3


def prime(profile: str) -> None:
    """Run the profile's conversion once on a model of our own; a no-op for other profiles."""
    if profile == PROFILE_SKLEARN:
        _prime_sklearn()


def priming_pipeline() -> Any:
    """StandardScaler + LogisticRegression, "fitted" by setting the attributes ``fit`` would
    (as unpickling does): no solver runs and nothing beyond skl2onnx's own imports is
    imported (skl2onnx imports the scikit-learn modules it has converters for)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    scaler.mean_ = np.zeros(_FEATURES)
    scaler.var_ = np.ones(_FEATURES)
    scaler.scale_ = np.ones(_FEATURES)
    scaler.n_samples_seen_ = 2
    scaler.n_features_in_ = _FEATURES
    classifier = LogisticRegression()
    classifier.classes_ = np.array([0, 1])
    classifier.coef_ = np.linspace(-1.0, 1.0, _FEATURES).reshape(1, _FEATURES)
    classifier.intercept_ = np.zeros(1)
    classifier.n_iter_ = np.array([1], dtype=np.int32)
    classifier.n_features_in_ = _FEATURES
    return Pipeline([("scale", scaler), ("classify", classifier)])


def _prime_sklearn() -> None:
    """The ONNX half of ``sklearn_convert._estimator_to_onnx`` + ``Job.write_onnx``, minus
    the write: convert, finish (checker), graph inputs, parity (ORT session + two runs)."""
    from skl2onnx import convert_sklearn

    from . import onnx_out, parity, sklearn_convert
    from .spec_types import skl2onnx_initial_types

    model = priming_pipeline()
    initial_types = skl2onnx_initial_types((), model.n_features_in_)
    onx = sklearn_convert._convert(convert_sklearn, model, initial_types,
                                   sklearn_convert.SKLEARN_OPSET)
    data = onnx_out.finish(onx)
    report = Report()
    parity.check(data, onnx_out.graph_inputs(onx), sklearn_convert._reference(model), report)
    if not report.parity or not all(entry.passed for entry in report.parity):
        raise RuntimeError("priming: the priming model failed its own parity check")

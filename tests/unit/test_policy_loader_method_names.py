"""State that names a method: scikit-learn calls ``getattr(estimator, name)(X)`` with names
an estimator keeps (``StackingClassifier/Regressor.stack_method_``, the threshold
classifiers' ``response_method``, ``ClassifierChain.chain_method_``), so a pickle that
names only allowlisted classes chose which method of its estimators parity runs on the
parity rows. skl2onnx ignores ``stack_method_`` for a regressor, so the conversion passed and
parity called ``Pipeline.fit(X)``: with the pipeline's ``memory`` set to a path, joblib's
cache wrote directories and pickles there (the marker below), under ``safe_only``."""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from airlock_worker import policy_loader
from airlock_worker.policy_loader import PolicyRefused


def _data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.RandomState(0).rand(30, 3)
    return x, (x.sum(axis=1) > 1.5).astype(int)


def _stacking_that_fits_a_cached_pipeline(cache: Path) -> Any:
    from sklearn.ensemble import StackingRegressor
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _data()
    model = StackingRegressor(
        [("p", Pipeline([("s", StandardScaler()), ("l", LinearRegression())]))],
        final_estimator=LinearRegression(), cv=2).fit(x, y.astype(float))
    model.estimators_[0].memory = str(cache)
    model.stack_method_ = ["fit"]
    return model


def test_a_stacking_method_name_cannot_make_parity_fit_a_pipeline(tmp_path: Path) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    cache = tmp_path / "written-by-the-artifact"
    data = pickle.dumps(_stacking_that_fits_a_cached_pipeline(cache), protocol=4)
    try:
        model = policy_loader.read(io.BytesIO(data), tolerant=False).obj
    except PolicyRefused as exc:
        assert "stack_method_" in str(exc)
        assert not cache.exists()
        return
    # What the worker does next (sklearn_convert): convert, then parity runs predict.
    convert_sklearn(model, initial_types=[("x", FloatTensorType([None, 3]))],
                    target_opset={"": 18, "ai.onnx.ml": 3})
    x, _ = _data()
    # The pipeline's final fit has no y and raises, after its transformers were cached.
    with contextlib.suppress(Exception):
        model.predict(x.astype(np.float32))
    written = sorted(str(p.relative_to(tmp_path)) for p in cache.rglob("*"))[:4]
    pytest.fail(f"admitted; parity's predict wrote {written}")


def _threshold(name: str) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import FixedThresholdClassifier

    x, y = _data()
    model = FixedThresholdClassifier(LogisticRegression()).fit(x, y)
    model.response_method = name
    return model


def _chain(name: str) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.multioutput import ClassifierChain

    x, y = _data()
    model = ClassifierChain(LogisticRegression()).fit(x, np.column_stack([y, 1 - y]))
    model.chain_method_ = name
    return model


def _stacking_classifier(name: str) -> Any:
    from sklearn.ensemble import StackingClassifier
    from sklearn.linear_model import LogisticRegression

    x, y = _data()
    model = StackingClassifier([("l", LogisticRegression())], cv=2).fit(x, y)
    model.stack_method_ = [name]
    return model


@pytest.mark.parametrize("make", [_threshold, _chain, _stacking_classifier])
@pytest.mark.parametrize("tolerant", [False, True])
def test_method_names_in_state_are_the_libraries_own(make: Any, tolerant: bool) -> None:
    data = pickle.dumps(make("fit"), protocol=4)
    with pytest.raises(PolicyRefused, match="method"):
        policy_loader.read(io.BytesIO(data), tolerant=tolerant)
    fine = {_threshold: "predict_proba", _chain: "predict_proba",
            _stacking_classifier: "decision_function"}[make]
    got = policy_loader.read(io.BytesIO(pickle.dumps(make(fine), protocol=4)),
                             tolerant=tolerant).obj
    x, _ = _data()
    np.testing.assert_array_equal(got.predict(x), make(fine).predict(x))

"""The estimator policy loader (sandbox/airlock_worker/policy_loader.py) on pickles this test
writes: estimators of every family read back as the unsafe load reads them; globals outside
the allowlist are refused by name (strict) or poisoned (tolerant) and never run; the pickle VM
cannot modify the library classes and functions it is handed."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest

from airlock_sandbox.contract import WorkerExit
from airlock_worker import policy_loader
from airlock_worker.pickle_poison import Poison
from airlock_worker.policy_loader import PolicyRefused
from tests.unit.test_estimator_allowlist import GADGETS


def _joblib(obj: Any, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    joblib.dump(obj, buf, **kwargs)
    return buf.getvalue()


def _read(data: bytes, tolerant: bool = False) -> policy_loader.Reading:
    return policy_loader.read(io.BytesIO(data), tolerant=tolerant)


@pytest.fixture(scope="module")
def fitted() -> dict[str, Any]:
    import lightgbm
    import xgboost
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    x, y = make_classification(n_samples=80, n_features=4, n_informative=3, n_redundant=0,
                               random_state=0)
    labels = np.where(y == 1, "fraud", "ok").astype(object)
    return {
        "pipeline": make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y),
        "forest": RandomForestClassifier(n_estimators=4, random_state=0).fit(x, y),
        "knn_kdtree": KNeighborsClassifier(algorithm="kd_tree").fit(x, y),
        "string_labels": LogisticRegression().fit(x, labels),
        "columns": ColumnTransformer([("s", StandardScaler(), [0, 1]),
                                      ("o", OneHotEncoder(), [2])]).fit(np.round(x)),
        "grid": GridSearchCV(LogisticRegression(), {"C": [0.1, 1.0]}, cv=2).fit(x, y),
        "xgboost": xgboost.XGBClassifier(n_estimators=3, random_state=0).fit(x, y),
        "lightgbm": lightgbm.LGBMClassifier(n_estimators=3, verbose=-1).fit(x, y),
        "x": x,
    }


@pytest.mark.parametrize("name", ["pipeline", "forest", "knn_kdtree", "string_labels",
                                  "columns", "grid", "xgboost", "lightgbm"])
@pytest.mark.parametrize("how", ["joblib", "joblib_zlib", "joblib_xz", "protocol0",
                                 "protocol2", "protocol5"])
def test_estimators_read_as_the_unsafe_load_reads_them(fitted: dict[str, Any], name: str,
                                                        how: str) -> None:
    model, x = fitted[name], fitted["x"]
    data = {"joblib": lambda m: _joblib(m), "joblib_zlib": lambda m: _joblib(m, compress=3),
            "joblib_xz": lambda m: _joblib(m, compress=("xz", 3)),
            "protocol0": lambda m: pickle.dumps(m, protocol=0),
            "protocol2": lambda m: pickle.dumps(m, protocol=2),
            "protocol5": lambda m: pickle.dumps(m, protocol=5)}[how](model)
    reading = _read(data)
    assert reading.refused == []
    got = reading.obj
    assert type(got) is type(model)
    data_in = np.round(x) if name == "columns" else x
    method = "transform" if name == "columns" else "predict_proba"
    np.testing.assert_array_equal(getattr(got, method)(data_in),
                                  getattr(model, method)(data_in))


def _global_pickle(module: str, name: str) -> bytes:
    """A protocol-0 pickle whose value is the global itself."""
    return f"c{module}\n{name}\n.".encode()


@pytest.mark.parametrize("gadget", GADGETS)
def test_gadgets_are_refused_by_name_and_poisoned_when_tolerant(gadget: str) -> None:
    module, _, name = gadget.partition(":")
    with pytest.raises(PolicyRefused) as info:
        _read(_global_pickle(module, name))
    assert info.value.refused == f"{module}.{name}"
    assert f"names {module}.{name}" in str(info.value)
    reading = _read(_global_pickle(module, name), tolerant=True)
    assert issubclass(reading.obj, Poison) and reading.refused == [f"{module}.{name}"]


class _Touch:
    """Pickles as a call of ``os.makedirs(path)``: proof, if the path appears, that it ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return os.makedirs, (self.path,)


@pytest.mark.parametrize("carrier", ["pickle", "joblib_object_array", "joblib_attribute"])
def test_a_payload_never_runs_in_either_reading(carrier: str, tmp_path: Path) -> None:
    from sklearn.linear_model import LinearRegression

    marker = tmp_path / "ran"
    touch = _Touch(marker)
    if carrier == "pickle":
        data = pickle.dumps(touch, protocol=4)
    elif carrier == "joblib_object_array":  # joblib unpickles object arrays on their own
        data = _joblib(np.array([1, touch], dtype=object))
    else:
        model = LinearRegression().fit([[0.0], [1.0]], [0.0, 1.0])
        model.hook = touch  # type: ignore[attr-defined]
        data = _joblib(model)
    with pytest.raises(PolicyRefused) as info:
        _read(data)
    assert info.value.refused in ("os.makedirs", "posix.makedirs")
    reading = _read(data, tolerant=True)
    assert reading.refused == [info.value.refused]
    assert not marker.exists()
    if carrier == "joblib_attribute":  # the model is there; only the hook is poison
        assert isinstance(reading.obj.hook, Poison)
        np.testing.assert_allclose(reading.obj.predict([[2.0]]), [2.0])


def test_the_pickle_cannot_modify_a_class_it_is_handed() -> None:
    from sklearn.linear_model import LogisticRegression

    before = LogisticRegression.predict
    # GLOBAL LogisticRegression; (None, {"predict": 1}); BUILD: setattr on the class
    data = (b"\x80\x02csklearn.linear_model._logistic\nLogisticRegression\n"
            b"N}X\x07\x00\x00\x00predictK\x01s\x86b.")
    with pytest.raises(PolicyRefused, match="tries to modify"):
        _read(data)
    with pytest.raises(PolicyRefused, match="tries to modify"):
        _read(data, tolerant=True)
    assert LogisticRegression.predict is before


def test_the_pickle_cannot_modify_a_function_it_is_handed() -> None:
    import copyreg

    before = copyreg._reconstructor.__defaults__
    data = b"\x80\x02ccopyreg\n_reconstructor\nN}X\x0c\x00\x00\x00__defaults__)s\x86b."
    with pytest.raises(PolicyRefused, match="tries to modify"):
        _read(data)
    assert copyreg._reconstructor.__defaults__ == before


def test_codecs_encode_is_only_what_protocol_2_writes() -> None:
    assert _read(pickle.dumps(b"\x00\xffab", protocol=2)).obj == b"\x00\xffab"
    # _codecs.encode("x", "zlib"): a codec lookup the substitute refuses
    data = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(ValueError, match="latin1"):
        _read(data)


def test_numpy_1_pickles_name_numpy_core() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    data = pickle.dumps(array, protocol=0).replace(b"numpy._core.multiarray",
                                                   b"numpy.core.multiarray")
    assert b"cnumpy.core.multiarray\n_reconstruct" in data
    np.testing.assert_array_equal(_read(data).obj, array)


def test_a_tolerant_reading_that_cannot_go_on_without_a_refused_global_names_them() -> None:
    """cloudpickle rebuilds a class by value through refused functions; the poison it gets
    back breaks the load (``object.__new__`` of it). That is the policy's refusal, named,
    not a failed load, so an allow_code job goes on to the full load (jobs._read_first)."""
    from tests.fixtures import custom_step

    with pytest.raises(PolicyRefused) as info:
        _read(custom_step.pipeline_bytes(), tolerant=True)
    assert info.value.exit == WorkerExit.POLICY_VIOLATION
    assert info.value.names and info.value.refused == info.value.names[0]
    assert info.value.refused.startswith("cloudpickle")
    assert "policy loader does not allow" in info.value.message

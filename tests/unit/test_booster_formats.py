"""Native booster files (XGBoost JSON/UBJ, LightGBM text): recognised by their bytes on the
host's prefix alone, re-checked whole by the worker, and converted in-process under
``safe_only`` with no artifact code run. Models are fitted here on random data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from airlock_sandbox.contract import (
    ARTIFACT_NAME,
    JobSpec,
    LoadingPolicy,
    WorkerExit,
)
from airlock_sandbox.formats import (
    PREFIX_BYTES,
    ArtifactFormat,
    detect_prefix,
    profile_for,
)
from airlock_worker import detect
from airlock_worker import job as worker_job
from airlock_worker.errors import WorkerError
from airlock_worker.report import Report
from tests.fixtures.mlflow_models import REQUIREMENTS

xgboost = pytest.importorskip("xgboost")
lightgbm = pytest.importorskip("lightgbm")

_FEATURES = 6


def _data(classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((120, _FEATURES)).astype(np.float32)
    return x, (np.abs(x[:, 0] * 3).astype(int) % classes)


def _xgb_classifier(classes: int = 2) -> object:
    x, y = _data(classes)
    return xgboost.XGBClassifier(n_estimators=4, max_depth=3).fit(x, y)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("boosters")
    x, y = _data()
    clf = _xgb_classifier()
    reg = xgboost.XGBRegressor(n_estimators=4, max_depth=3).fit(x, x[:, 1])
    lgb = lightgbm.LGBMClassifier(n_estimators=4, num_leaves=4, verbose=-1).fit(x, y)
    lgb3 = lightgbm.LGBMClassifier(n_estimators=3, num_leaves=4, verbose=-1).fit(*_data(3))
    paths = {
        "xgb.json": where / "model.json", "xgb.ubj": where / "model.ubj",
        "xgb_reg.ubj": where / "reg.ubj", "xgb3.json": where / "multi.json",
        "booster.json": where / "booster.json",
        "lgb.txt": where / "model.txt", "lgb3.txt": where / "multi.txt",
    }
    clf.save_model(paths["xgb.json"])
    clf.save_model(paths["xgb.ubj"])
    reg.save_model(paths["xgb_reg.ubj"])
    _xgb_classifier(3).save_model(paths["xgb3.json"])
    clf.get_booster().save_model(paths["booster.json"])
    lgb.booster_.save_model(paths["lgb.txt"])
    lgb3.booster_.save_model(paths["lgb3.txt"])
    return paths


def _prefix(path: Path) -> ArtifactFormat:
    data = path.read_bytes()
    return detect_prefix(data[:PREFIX_BYTES], len(data))


# -- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "fmt"), [
    ("xgb.json", ArtifactFormat.XGBOOST_JSON), ("booster.json", ArtifactFormat.XGBOOST_JSON),
    ("xgb3.json", ArtifactFormat.XGBOOST_JSON), ("xgb.ubj", ArtifactFormat.XGBOOST_UBJ),
    ("xgb_reg.ubj", ArtifactFormat.XGBOOST_UBJ), ("lgb.txt", ArtifactFormat.LIGHTGBM_TEXT),
    ("lgb3.txt", ArtifactFormat.LIGHTGBM_TEXT),
])
def test_real_booster_files_are_recognised_by_prefix_and_whole(
        models: dict[str, Path], name: str, fmt: ArtifactFormat) -> None:
    assert _prefix(models[name]) is fmt
    assert detect.detect(str(models[name])) is fmt
    assert profile_for(fmt) == "sklearn"


@pytest.mark.parametrize("name", ["xgb.json", "xgb.ubj", "lgb.txt"])
def test_the_host_decides_a_booster_from_its_prefix_alone(
        models: dict[str, Path], name: str) -> None:
    from airlock_broker.conversion.format_decision import decide
    from airlock_broker.errors import AirlockError, Reason

    data = models[name].read_bytes()
    decision = decide(data[:PREFIX_BYTES], len(data), None)
    assert decision.format is _prefix(models[name])
    assert (decision.profile, decision.integrity) == ("sklearn", False)
    with pytest.raises(AirlockError) as err:  # a booster declared as anything is contradicted
        decide(data[:PREFIX_BYTES], len(data), "pickle")
    assert err.value.reason is Reason.FORMAT_MISMATCH


def test_a_booster_is_recognised_by_its_bytes_not_its_name(
        models: dict[str, Path], tmp_path: Path) -> None:
    renamed = tmp_path / "model.pkl"
    renamed.write_bytes(models["xgb.ubj"].read_bytes())
    assert detect.detect(str(renamed)) is ArtifactFormat.XGBOOST_UBJ


@pytest.mark.parametrize("content", [
    b'{"a": 1, "version": [3, 2, 0]}',  # plain JSON
    b'{"learner": "not a model", "version": [3, 2, 0]}',  # mentions learner
    b'{"learner":{"generic_param":{"nthread":"0"}},"version":[3,2,0]}',  # save_config()
    b'[{"learner":{"attributes":{}}}]',
    b'  {"note": {"learner":{"attributes":{}}}}',
    b"tree\nversion=\n",  # LightGBM's first line without a version
    b"trees\nversion=v4\n",
    b"{U\x07learner{U\x0aattribute{",  # UBJ, wrong second key
    b"{U\x07learnerS",  # UBJ, learner is no object
])
def test_near_misses_are_not_boosters(content: bytes) -> None:
    assert detect_prefix(content[:PREFIX_BYTES], len(content)) is ArtifactFormat.UNKNOWN


@pytest.mark.parametrize("name", ["xgb.json", "xgb.ubj", "lgb.txt"])
def test_a_booster_cut_short_is_refused_before_any_parser(
        models: dict[str, Path], tmp_path: Path, name: str) -> None:
    data = models[name].read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(data[: len(data) // 3])
    assert _prefix(cut) is _prefix(models[name])  # the host cannot tell; the worker can
    with pytest.raises(WorkerError) as err:
        detect.detect(str(cut))
    assert err.value.exit is WorkerExit.UNSUPPORTED_FORMAT
    assert "cut short" in err.value.message


def test_a_truncated_ubj_length_field_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    data = models["xgb.ubj"].read_bytes()
    cut = tmp_path / "cut.ubj"
    cut.write_bytes(data[:30])  # inside the second key's length field
    assert _prefix(cut) is ArtifactFormat.UNKNOWN


@pytest.mark.parametrize(("head", "tail"), [
    (b'{"learner":{"attributes":{', b""),
    (b"tree\nversion=v4\n", b""),
    # ends as a LightGBM model should: its parser would loop on the NUL bytes until the
    # deadline (lightgbm 4.7), so a NUL byte is refused first
    (b"tree\nversion=v4\n", b"\nend of trees\n"),
])
def test_a_booster_signature_before_a_pickle_is_refused_unread(
        tmp_path: Path, head: bytes, tail: bytes) -> None:
    """A file that opens like a booster and carries a pickle: the worker refuses it whole
    (nothing unpickles it: the booster handler never does)."""
    path = tmp_path / "hostile"
    path.write_bytes(head + pickle.dumps({"x": 1}, protocol=4) + tail)
    with pytest.raises(WorkerError) as err:
        detect.detect(str(path))
    assert err.value.exit is WorkerExit.UNSUPPORTED_FORMAT


# -- conversion, in-process -----------------------------------------------------------------


def _run(tmp_path: Path, source: Path, fmt: ArtifactFormat,
         policy: LoadingPolicy = LoadingPolicy.SAFE_ONLY) -> tuple[Report, Path]:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    (in_dir / ARTIFACT_NAME).write_bytes(source.read_bytes())
    report = Report()
    spec = JobSpec(job_id="t", artifact_format=fmt, policy=policy)
    worker_job.run(spec, str(in_dir), str(out_dir), report)
    return report, out_dir


@pytest.mark.parametrize("name", ["xgb.json", "xgb.ubj", "xgb_reg.ubj", "xgb3.json",
                                  "booster.json", "lgb.txt", "lgb3.txt"])
def test_boosters_convert_under_safe_only_with_parity(
        models: dict[str, Path], tmp_path: Path, name: str) -> None:
    fmt = _prefix(models[name])
    report, out_dir = _run(tmp_path, models[name], fmt)
    assert report.executed_artifact_code is False
    assert report.output_format == "onnx"
    assert all(entry.passed for entry in report.parity)
    assert len(report.parity) == (1 if "reg" in name else 2)  # labels and probabilities
    assert report.loader.startswith(("xgboost.Booster", "lightgbm.Booster"))
    assert report.inputs[0]["shape"] == [-1, _FEATURES]
    assert [p.name for p in out_dir.iterdir()]
    assert json.loads(report.to_json())["executed_artifact_code"] is False


def test_a_booster_asked_for_safetensors_is_refused(
        models: dict[str, Path], tmp_path: Path) -> None:
    from airlock_sandbox.contract import Target

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    (in_dir / ARTIFACT_NAME).write_bytes(models["lgb.txt"].read_bytes())
    spec = JobSpec(job_id="t", artifact_format=ArtifactFormat.LIGHTGBM_TEXT,
                   target=Target.SAFETENSORS)
    with pytest.raises(WorkerError) as err:
        worker_job.run(spec, str(in_dir), str(out_dir), Report())
    assert err.value.exit is WorkerExit.UNSUPPORTED_MODEL


def test_a_broken_xgboost_body_fails_with_one_sentence(tmp_path: Path) -> None:
    body = tmp_path / "bad.json"
    body.write_bytes(b'{"learner":{"attributes":{},"junk":1},"version":[3,2,0]}')
    with pytest.raises(WorkerError) as err:
        _run(tmp_path, body, ArtifactFormat.XGBOOST_JSON)
    assert err.value.exit is WorkerExit.CONVERSION_FAILED
    assert err.value.message.startswith("XGBoost could not read the model")
    assert "Stack trace" not in err.value.message


# -- MLflow xgboost / lightgbm flavors ------------------------------------------------------


def _mlflow_plan(flavors: dict[str, object], *names: str) -> object:
    import zipfile

    from airlock_worker import mlflow_model

    members = {n: zipfile.ZipInfo(n) for n in ("MLmodel", *names)}
    return mlflow_model.plan({"flavors": flavors}, members)


def test_mlflow_booster_flavors_name_their_native_file() -> None:
    xgb = _mlflow_plan({"xgboost": {"data": "model.ubj", "model_format": "ubj",
                                    "model_class": "xgboost.sklearn.XGBClassifier"},
                        "python_function": {"loader_module": "mlflow.xgboost"}}, "model.ubj")
    lgb = _mlflow_plan({"lightgbm": {"data": "model.lgb",
                                     "model_class": "lightgbm.basic.Booster"}}, "model.lgb")
    wrapped = _mlflow_plan({"lightgbm": {"data": "model.pkl", "serialization_format":
                                         "cloudpickle", "model_class":
                                         "lightgbm.sklearn.LGBMClassifier"}}, "model.pkl")
    pyfunc = _mlflow_plan({"python_function": {"loader_module": "mlflow.xgboost",
                                               "data": "model.json"}}, "model.json")
    got = [(p.flavor, p.member, p.serialization) for p in (xgb, lgb, wrapped, pyfunc)]
    assert got == [("xgboost", "model.ubj", "ubj"), ("lightgbm", "model.lgb", "text"),
                   ("lightgbm", "model.pkl", "cloudpickle"), ("xgboost", "model.json", "xgb")]


def _mlflow_bundle(model_dir: Path, dest: Path) -> str:
    from airlock_client._bundle import inspect, pack

    model = inspect(model_dir)
    pack(model, dest)
    return model.flavor_hint


def _convert_bundle(tmp_path: Path, model_dir: Path,
                    policy: LoadingPolicy = LoadingPolicy.SAFE_ONLY) -> Report:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir(parents=True)
    out_dir.mkdir()
    hint = _mlflow_bundle(model_dir, in_dir / ARTIFACT_NAME)
    report = Report()
    spec = JobSpec(job_id="t", artifact_format=ArtifactFormat.MLFLOW, policy=policy,
                   declared_format="mlflow", mlflow_flavor=hint)
    worker_job.run(spec, str(in_dir), str(out_dir), report)
    assert [p.name for p in out_dir.iterdir()]
    return report


@pytest.mark.parametrize("model_format", ["ubj", "json"])
def test_an_mlflow_xgboost_model_converts_under_safe_only(
        tmp_path: Path, model_format: str) -> None:
    import mlflow.xgboost

    x, _ = _data()
    where = tmp_path / "model"
    mlflow.xgboost.save_model(_xgb_classifier(), str(where), model_format=model_format,
                              input_example=x[:3], pip_requirements=REQUIREMENTS["xgboost"])
    report = _convert_bundle(tmp_path, where)
    assert report.executed_artifact_code is False
    assert report.detected_format == f"mlflow:xgboost/{model_format}"
    assert len(report.parity) == 2 and all(e.passed for e in report.parity)


def test_an_mlflow_lightgbm_booster_converts_under_safe_only(tmp_path: Path) -> None:
    import mlflow.lightgbm

    x, y = _data()
    booster = lightgbm.train({"objective": "binary", "num_leaves": 4, "verbose": -1},
                             lightgbm.Dataset(x, y), num_boost_round=3)
    where = tmp_path / "model"
    mlflow.lightgbm.save_model(booster, str(where), pip_requirements=REQUIREMENTS["lightgbm"])
    report = _convert_bundle(tmp_path, where)
    assert report.executed_artifact_code is False
    assert report.detected_format == "mlflow:lightgbm/text"
    assert all(e.passed for e in report.parity)


def test_an_mlflow_lightgbm_wrapper_is_a_pickle_read_by_the_policy_loader(
        tmp_path: Path) -> None:
    """The sklearn-API wrapper is pickled (cloudpickle, by reference): under safe_only the
    policy loader reads it, so no artifact code runs."""
    import mlflow.lightgbm

    x, y = _data()
    model = lightgbm.LGBMClassifier(n_estimators=3, num_leaves=4, verbose=-1).fit(x, y)
    where = tmp_path / "model"
    mlflow.lightgbm.save_model(model, str(where), serialization_format="cloudpickle",
                               pip_requirements=REQUIREMENTS["lightgbm"])
    report = _convert_bundle(tmp_path / "safe", where)
    assert report.loader == "policy loader" and report.executed_artifact_code is False
    assert all(e.passed for e in report.parity)
    report = _convert_bundle(tmp_path / "code", where, LoadingPolicy.ALLOW_CODE)
    assert report.executed_artifact_code is True

"""XGBOOST_JSON / XGBOOST_UBJ / LIGHTGBM_TEXT: a native booster file, read by its library's
own parser (``xgboost.Booster(model_file=...)``, ``lightgbm.Booster(model_file=...)``), which
builds trees from data and runs nothing of the artifact's: no unpickling, no imports. So these
convert under ``safe_only`` and the report says no artifact code ran. onnxmltools converts
the booster (its ``WrappedBooster`` reads the objective: classifier, regressor or ranker);
the number of features comes from the booster unless the request gives the input.

A file the parser refuses is a failed conversion with the parser's first line, not its
stack trace. The detection (detect.py) has already refused a file cut short.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from airlock_sandbox.contract import OutputFormat, WorkerExit
from airlock_sandbox.formats import ArtifactFormat

from .errors import WorkerError, one_line
from .job import Job
from .parity import Expected, Reference
from .sklearn_convert import BOOSTER_OPSET
from .spec_types import skl2onnx_initial_types

#: XGBoost objectives whose ``predict`` returns class indices rather than probabilities.
_XGB_LABEL_OBJECTIVES = frozenset({"multi:softmax"})


def convert(job: Job) -> None:
    job.refuse_target(OutputFormat.SAFETENSORS,
                      "a gradient-boosted tree model has no tensor weights; ask for onnx")
    if job.fmt is ArtifactFormat.LIGHTGBM_TEXT:
        _lightgbm(job)
    else:
        _xgboost(job)


def _xgboost(job: Job) -> None:
    import xgboost
    from onnxmltools import convert_xgboost

    job.loaded_safely("xgboost.Booster(model_file)")
    with _parser("XGBoost"):
        booster = xgboost.Booster(model_file=_source(job, bytearray))
        objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
    n_features = booster.num_features()

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(booster.predict(xgboost.DMatrix(x)))

    _to_onnx(job, convert_xgboost, booster, n_features, predict,
             labels_only=objective in _XGB_LABEL_OBJECTIVES, converter="onnxmltools.xgboost")


def _lightgbm(job: Job) -> None:
    import lightgbm
    from onnxmltools import convert_lightgbm

    job.loaded_safely("lightgbm.Booster(model_file)")
    with _parser("LightGBM"):
        source = _source(job, lambda raw: raw.decode("utf-8"))
        booster = (lightgbm.Booster(model_file=source) if isinstance(job.artifact, str)
                   else lightgbm.Booster(model_str=source))
    n_features = booster.num_feature()

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(booster.predict(x))

    _to_onnx(job, convert_lightgbm, booster, n_features, predict, labels_only=False,
             converter="onnxmltools.lightgbm", zipmap=False)


def _source(job: Job, wrap: Any) -> Any:
    """A path for a top-level artifact; the bytes (wrapped) for an MLflow bundle's member."""
    if isinstance(job.artifact, str):
        return job.artifact
    with job.open_artifact() as fh:
        return wrap(fh.read())


@contextlib.contextmanager
def _parser(library: str) -> Iterator[None]:
    """A parser's refusal as one sentence: its first line, without the native stack trace."""
    try:
        yield
    except WorkerError:
        raise
    except Exception as exc:
        raise WorkerError(WorkerExit.CONVERSION_FAILED,
                          f"{library} could not read the model: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return one_line(text.splitlines()[0], 200) if text else type(exc).__name__


def _to_onnx(job: Job, convert_fn: Any, booster: Any, n_features: int, predict: Any, *,
             labels_only: bool, converter: str, **options: Any) -> None:
    from onnxmltools.convert.common import data_types

    initial_types = skl2onnx_initial_types(job.spec.inputs, n_features, data_types)
    if len(initial_types) != 1:
        raise WorkerError(WorkerExit.BAD_JOB_SPEC,
                          f"a booster takes one input of {n_features} features, not "
                          f"{len(initial_types)} inputs")
    try:
        onx = convert_fn(booster, initial_types=initial_types,
                         target_opset=BOOSTER_OPSET[""], **options)
    except (NotImplementedError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL,
                          f"onnxmltools cannot convert this booster: {_first_line(exc)}"
                          ) from None
    outputs = len(onx.graph.output)
    job.write_onnx(onx, converter, _reference(predict, outputs, labels_only))


def _reference(predict: Any, outputs: int, labels_only: bool) -> Reference:
    """The booster's own predictions in the ONNX outputs' order: ``label, probabilities``
    for a classifier (a binary one predicts P(class 1) alone), the value otherwise."""

    def reference(feeds: dict[str, np.ndarray]) -> list[Expected | None]:
        (x,) = feeds.values()
        raw = predict(x)
        if outputs == 1:
            return [Expected(raw)]
        if labels_only:
            return [Expected(raw.astype(np.int64), exact=True), None]
        proba = np.column_stack([1.0 - raw, raw]) if raw.ndim == 1 else raw
        return [Expected(proba.argmax(axis=1), exact=True), Expected(proba)]

    return reference

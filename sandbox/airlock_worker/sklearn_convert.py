"""PICKLE / JOBLIB: plain, joblib and compressed joblib pickles (and cloudpickle ones,
cloudpickle being importable). Under ``allow_code`` they are unpickled with ``joblib.load``,
which runs what the pickle names; under ``safe_only``, and in the integrity reading
(``verify``), by the policy loader, which runs nothing the pickle names (policy_loader.py).
SKOPS (``skops.io.dump``, alone or in an MLflow model): loaded with skops' trusted types;
types beyond them only under ``allow_code``.
A scikit-learn estimator or pipeline becomes ONNX via skl2onnx; XGBoost and LightGBM
sklearn-API models, alone or inside pipelines, via onnxmltools' converters registered into
skl2onnx; a pickled dict of arrays or tensors becomes safetensors."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from airlock_sandbox.contract import LoadingPolicy, OutputFormat, WorkerExit

from . import column_inputs, fitted_steps, onnx_out, policy_loader, skl2onnx_mends, string_missing
from .errors import WorkerError, describe
from .job import Job
from .parity import Expected, Reference, Sampler
from .spec_types import skl2onnx_initial_types

#: skl2onnx's newest tested opset is 22; pin one the broker's ONNX Runtime runs everywhere.
SKLEARN_OPSET = {"": 18, "ai.onnx.ml": 3}
#: onnxmltools' converters stop at opset 15 and ai.onnx.ml 3.
BOOSTER_OPSET = {"": 15, "ai.onnx.ml": 3}
_BOOSTER_PACKAGES = frozenset({"xgboost", "lightgbm"})


#: The report's ``loader`` for a reading that ran nothing the pickle names.
POLICY_LOADER = "policy loader"


def convert(job: Job) -> None:
    if job.spec.policy is LoadingPolicy.SAFE_ONLY:
        with job.loading(), job.open_artifact() as fh:
            reading = policy_loader.read(fh, tolerant=False)
        job.loaded_safely(POLICY_LOADER)
        convert_object(job, reading.obj)
        return
    job.allow_code("joblib.load", "a pickle or joblib stream can only be loaded by unpickling")
    import joblib

    with job.loading():
        if not isinstance(job.artifact, str):
            job.artifact.seek(0)
        obj = joblib.load(job.artifact)
    convert_object(job, obj)


def verify(job: Job) -> None:
    """The integrity reading (JobMode.EXTRACT_WEIGHTS) of a pickle: the policy loader, with
    poison for what it refuses, then the same conversion as :func:`convert`. The broker
    compares both outputs (DESIGN §5)."""
    with job.loading(), job.open_artifact() as fh:
        try:
            reading = policy_loader.read(fh, tolerant=True)
        except policy_loader.PolicyRefused as exc:
            job.report.refused_globals = exc.names[:10]
            raise
    job.loaded_safely(POLICY_LOADER)
    if not reading.refused:
        convert_object(job, reading.obj)
        return
    job.report.refused_globals = reading.refused[:10]
    job.report.warn(f"{len(reading.refused)} global(s) named by the pickle were not "
                    "called: " + ", ".join(reading.refused[:10]))
    try:
        convert_object(job, reading.obj)
    except Exception as exc:  # the model needs what was refused: say what, first
        # (str() of a library's error may hold a poison's repr, which refuses to print)
        said = exc.message if isinstance(exc, WorkerError) else type(exc).__name__
        code = exc.exit if isinstance(exc, WorkerError) else WorkerExit.CONVERSION_FAILED
        raise WorkerError(code, f"the policy loader does not allow {reading.refused[0]}, "
                                f"which this model needs ({said})") from None


#: Types outside skops' default trusted set whose skops loader builds data without calling
#: anything the file names: ``numpy.dtype`` (skops' ``DTypeNode`` takes the dtype of an empty
#: array it reads with ``allow_pickle=False``, its child audited like any other node). A
#: fitted ``SimpleImputer`` keeps one (``_fit_dtype``), so most pipelines name it.
SKOPS_DATA_TYPES = frozenset({"numpy.dtype"})


def convert_skops(job: Job) -> None:
    from .skops_import import import_skops_io

    skops_io = import_skops_io()
    with job.loading(), job.open_artifact() as fh:
        named = [str(t) for t in skops_io.get_untrusted_types(file=fh)]
    untrusted = [t for t in named if t not in SKOPS_DATA_TYPES]
    if untrusted:
        job.allow_code(f"skops.io.load(trusting {len(untrusted)} more type(s))",
                       "the skops file names types outside skops' default trusted set: "
                       + ", ".join(t[:60] for t in untrusted[:5]))
    else:
        job.loaded_safely("skops.io.load")
    trusted = named or None
    with job.loading(), job.open_artifact() as fh:
        model = skops_io.load(fh, trusted=trusted)
    convert_object(job, model)


def convert_object(job: Job, obj: Any) -> None:
    """An already loaded object (unpickled, or read by skops): a model to ONNX, or tensors."""
    base = sys.modules.get("sklearn.base")
    if base is not None and isinstance(obj, base.BaseEstimator):
        _estimator_to_onnx(job, obj)
    else:
        _tensors_to_safetensors(job, obj)


# -- scikit-learn / XGBoost / LightGBM -> ONNX ---------------------------------------------


def _estimator_to_onnx(job: Job, model: Any) -> None:
    job.refuse_target(OutputFormat.SAFETENSORS,
                      "a scikit-learn model has no tensor weights; ask for onnx")
    from skl2onnx import convert_sklearn
    from skl2onnx.common.exceptions import MissingConverter, MissingShapeCalculator

    _refuse_categorical_splits(model)
    skl2onnx_mends.apply()
    boosters = _register_boosters(model)
    opset = BOOSTER_OPSET if boosters else SKLEARN_OPSET
    initial_types = skl2onnx_initial_types(job.spec.inputs, getattr(model, "n_features_in_", None))
    columns: list[column_inputs.Column] = []
    finished = None
    try:
        try:
            onx = _convert(convert_sklearn, model, initial_types, opset)
            if job.inputs_from_signature:  # a graph the checker refuses is no better
                finished = onnx_out.finish(onx)
        except (MissingConverter, MissingShapeCalculator):
            raise
        except Exception as exc:
            onx, columns = _by_columns(job, convert_sklearn, model, opset, exc)
    except (MissingConverter, MissingShapeCalculator):
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL, _no_converter(model)) from None
    reference, sampler = _parity(job, model, onx, columns, len(initial_types))
    job.write_onnx(onx, "skl2onnx+onnxmltools" if boosters else "skl2onnx", reference,
                   sampler, finished)


def _refuse_categorical_splits(model: Any) -> None:
    """A histogram gradient boosting model fitted with categorical features splits them by
    sets of categories; skl2onnx writes every split as a numeric threshold, so its graph
    predicts otherwise (parity refused it, "differs by up to 1"): say why, before converting."""
    for step in fitted_steps.walk(model):
        flags = getattr(step, "is_categorical_", None)
        if isinstance(flags, np.ndarray) and flags.dtype.kind == "b" and flags.any():
            raise WorkerError(
                WorkerExit.UNSUPPORTED_MODEL,
                f"{_qualname(step)} was fitted with {int(flags.sum())} categorical feature(s) "
                "(categorical_features): skl2onnx converts their category splits as numeric "
                "thresholds, which predict otherwise; retrain it with those columns encoded "
                "in the pipeline (OrdinalEncoder) and no categorical_features")


def _by_columns(job: Job, convert_sklearn: Any, model: Any, opset: dict[str, int],
                failed: Exception) -> tuple[Any, list[column_inputs.Column]]:
    """The conversion again, one input per column of the DataFrame the model was fitted on,
    when the inputs that ``failed`` were not the caller's choice (the default ``X``, an MLflow
    signature's); ``failed`` is raised again otherwise."""
    if job.spec.inputs and not job.inputs_from_signature:
        raise failed
    columns = column_inputs.columns(model)
    if not columns:
        if job.spec.inputs or not hasattr(model, "feature_names_in_"):
            raise failed
        raise WorkerError(
            WorkerExit.INPUT_SPEC_REQUIRED,
            f"fitted on named columns and the default single input failed ({describe(failed)});"
            " give one input per column",
        ) from None
    onx = _convert(convert_sklearn, model,
                   skl2onnx_initial_types(column_inputs.specs(columns), None), opset)
    if job.spec.inputs:
        job.report.warn(f"the MLflow signature's inputs did not convert ({describe(failed)}); "
                        "the model's own columns are the inputs")
    columns = _bound(columns, onx)
    job.report.warn(f"fitted on a DataFrame: the graph takes one [rows, 1] input per column, "
                    f"{column_inputs.describe(columns)}")
    # A string column an imputer takes NaN in converts only with "" for it (string_missing).
    imputed = [c.input_name for c in columns if c.missing is not None]
    if imputed:
        job.report.warn(f"a missing value is the empty string in string input(s) "
                        f"{', '.join(imputed[:6])}{' and more' if len(imputed) > 6 else ''} "
                        "(a string tensor has no NaN): the graph imputes it as the model "
                        "imputes NaN")
    return onx, columns


def _parity(job: Job, model: Any, onx: Any, columns: list[column_inputs.Column],
            inputs: int) -> tuple[Reference | None, Sampler | None]:
    """What parity runs the original on, and draws its rows from (with missing values too
    for a model of trees, which route them: parity.drawing_missing)."""
    reference, sampler = _parity_rows(job, model, onx, columns, inputs)
    if reference is not None and _routes_missing(model):
        from .parity import drawing_missing, random_feeds

        sampler = drawing_missing(sampler or random_feeds)
    return reference, sampler


def _routes_missing(model: Any) -> bool:
    """Whether a fitted step is a tree, or an ensemble of them, that learned where missing
    values go (scikit-learn's ``missing_go_to_left``; histogram boosting's predictors; an
    XGBoost or LightGBM model's default directions)."""
    for step in fitted_steps.walk(model):
        if hasattr(step, "_predictors") or type(step).__module__.split(".")[0] in \
                _BOOSTER_PACKAGES:
            return True
        members = getattr(step, "estimators_", None)
        if isinstance(members, list | np.ndarray) and len(members):
            step = np.asarray(members, dtype=object).reshape(-1)[0]
        if hasattr(getattr(step, "tree_", None), "missing_go_to_left"):
            return True
    return False


def _parity_rows(job: Job, model: Any, onx: Any, columns: list[column_inputs.Column],
                 inputs: int) -> tuple[Reference | None, Sampler | None]:
    """What parity runs the original on, and draws its rows from: the model's columns (read
    from it, or the inputs given when they are those columns), or its one input."""
    if not columns and inputs > 1:
        found = column_inputs.columns(model)
        if column_inputs.matches(found, job.spec.inputs):
            columns = _bound(found, onx)
    if columns:
        example = job.parity_example  # an MLflow example names the columns, not the inputs
        if example and all(c.name in example for c in columns):
            job.parity_example = {c.input_name: example[c.name] for c in columns}
        return _reference(model, columns), column_inputs.sampler(columns)
    if inputs == 1:
        return _reference(model), _sampler(model)
    job.report.warn("parity not checked: several inputs that are not the columns the model "
                    "was fitted on")
    return None, None


def _bound(columns: list[column_inputs.Column], onx: Any) -> list[column_inputs.Column]:
    return column_inputs.bind(columns, [i["name"] for i in onnx_out.graph_inputs(onx)])


def _convert(convert_sklearn: Any, model: Any, initial_types: list[Any],
             opset: dict[str, int]) -> Any:
    """skl2onnx's conversion; the string imputers' marker is ``""`` in the graph
    (string_missing.py)."""
    options = _zipmap_off(model)
    custom = string_missing.conversion_functions(model)
    # skl2onnx names the graph with a random uuid; the integrity reading converts the same
    # model in another sandbox and the broker compares the bytes.
    name = type(model).__name__
    try:
        return convert_sklearn(model, initial_types=initial_types, options=options,
                               target_opset=opset, name=name,
                               custom_conversion_functions=custom)
    except NameError as exc:  # classifiers without probabilities (LinearSVC) have no zipmap
        if options is None or "zipmap" not in str(exc):
            raise
    return convert_sklearn(model, initial_types=initial_types, target_opset=opset, name=name,
                           custom_conversion_functions=custom)


def _no_converter(model: Any) -> str:
    """Which step skl2onnx has no converter for, as a sentence: the step's name (its path in
    ``get_params``, e.g. ``columns__scale``) and class, and why that is final."""
    from skl2onnx._supported_operators import sklearn_operator_name_map

    missing = [(name, step) for name, step in _named_estimators(model)
               if type(step) not in sklearn_operator_name_map]
    if not missing:
        return (f"skl2onnx has no ONNX converter for a part of this "
                f"{_qualname(model)}; no step could be named")
    name, step = missing[0]
    where = f"step {name!r} ({_qualname(step)})" if name else _qualname(step)
    more = f" ({len(missing) - 1} more step(s) have none either)" if len(missing) > 1 else ""
    if type(step).__module__.split(".")[0] == "sklearn":
        why = "skl2onnx does not support this scikit-learn class"
    else:
        why = ("a custom class is Python code, which ONNX cannot express; rebuild the step "
               "from scikit-learn classes to convert it")
    return f"skl2onnx has no ONNX converter for {where}{more}: {why}"


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"[:120]


def _named_estimators(model: Any) -> list[tuple[str, Any]]:
    """The model ('' for itself) and every estimator nested in it, by parameter path."""
    found: list[tuple[str, Any]] = [("", model)]
    try:
        params = model.get_params(deep=True)
    except Exception:
        return found
    found.extend((k, v) for k, v in params.items()
                 if hasattr(v, "get_params") and not isinstance(v, type))
    return found


def _register_boosters(model: Any) -> bool:
    """Teach skl2onnx the XGBoost/LightGBM classes present (skl2onnx tutorials
    plot_gexternal_xgboost / plot_gexternal_lightgbm). Returns whether there were any."""
    classes = {type(e): e for _, e in _named_estimators(model)
               if type(e).__module__.split(".")[0] in _BOOSTER_PACKAGES}
    if not classes:
        return False
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )
    from sklearn.base import is_classifier

    for cls, instance in classes.items():
        if cls.__module__.startswith("xgboost"):
            from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost

            converter, alias = convert_xgboost, f"XGBoost{cls.__name__}"
        else:
            from onnxmltools.convert.lightgbm.operator_converters.LightGbm import (
                convert_lightgbm,
            )

            converter, alias = convert_lightgbm, f"LightGbm{cls.__name__}"
        if is_classifier(instance):
            update_registered_converter(
                cls, alias, calculate_linear_classifier_output_shapes, converter,
                options={"nocl": [True, False], "zipmap": [True, False, "columns"]},
            )
        else:
            update_registered_converter(
                cls, alias, calculate_linear_regressor_output_shapes, converter)
    return True


def _final_step(model: Any) -> Any:
    while hasattr(model, "steps"):
        model = model.steps[-1][1]
    return model


def _zipmap_off(model: Any) -> dict[int, dict[str, Any]] | None:
    """Probabilities as a plain float tensor instead of ZipMap's list of dicts."""
    from sklearn.base import is_classifier

    final = _final_step(model)
    return {id(final): {"zipmap": False}} if is_classifier(final) else None


def _sampler(model: Any) -> Sampler | None:
    """Parity inputs where the fitted model has seen data; a model whose attributes cannot
    be read (it is the artifact's object) gets the generic ones."""
    from . import parity_inputs

    try:
        return parity_inputs.for_model(model)
    except Exception:
        return None


def _reference(model: Any, columns: list[column_inputs.Column] | None = None) -> Reference:
    """Outputs in skl2onnx's order: labels (or values), then probabilities / scores. With
    ``columns``, the feeds are a DataFrame's columns and the model is run on that frame."""
    from sklearn.base import is_classifier

    classifier = is_classifier(model)
    second = (("predict_proba", "decision_function") if classifier
              else ("decision_function", "transform"))

    def outputs(x: Any) -> list[Expected | None]:
        if not hasattr(model, "predict"):
            return [Expected(model.transform(x))]
        outs: list[Expected | None] = [Expected(model.predict(x))]
        for method in second:
            if hasattr(model, method):
                try:
                    outs.append(Expected(getattr(model, method)(x)))
                    break
                except Exception:
                    continue
        return outs

    def reference(feeds: dict[str, Any]) -> list[Expected | None]:
        if columns:
            return outputs(column_inputs.frame(columns, feeds))
        (x,) = feeds.values()
        if getattr(x, "dtype", None) != "float32":
            return outputs(x)
        # The same values in float64 first, as most models are fitted: some compiled paths
        # (KMeans) refuse rows of another precision than their fitted centres, either way.
        try:
            return outputs(x.astype("float64"))
        except Exception:
            return outputs(x)

    return reference


# -- pickled dicts of arrays / tensors -> safetensors ------------------------------------


def _tensors_to_safetensors(job: Job, obj: Any) -> None:
    import numpy as np

    torch = sys.modules.get("torch")  # present only if the pickle itself imported it

    def is_tensor(v: Any) -> bool:
        return ((isinstance(v, np.ndarray) and v.dtype != object)
                or (torch is not None and isinstance(v, torch.Tensor)))

    flat = job.flatten(obj, is_tensor)
    if not flat.tensors:
        raise WorkerError(
            WorkerExit.UNSUPPORTED_MODEL,
            f"unpickled a {type(obj).__module__}.{type(obj).__qualname__}, which is neither "
            "a scikit-learn / XGBoost / LightGBM model nor a dict of arrays or tensors",
        )
    job.refuse_target(OutputFormat.ONNX, "the pickle holds only arrays, no model to export")
    job.note_flattened(flat)
    if torch is not None and any(isinstance(v, torch.Tensor) for v in flat.tensors.values()):
        tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v)
                   for k, v in flat.tensors.items()}
        job.write_torch_tensors(tensors, "safetensors.torch")
    else:
        job.write_numpy_arrays(flat.tensors, "safetensors.numpy")

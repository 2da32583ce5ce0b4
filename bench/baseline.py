"""The UNSAFE in-process baseline: what a user gives up by switching to Airlock.

WARNING: this module deserializes model files (``pickle.load``, ``joblib.load``,
``torch.load``, ``mlflow.sklearn.load_model``) in the benchmark's own process. That is exactly
what Airlock exists to prevent, and it is done here only because this is a *benchmark*, not the
product: the comparison Airlock is measured against is "load and convert in your own process,
libraries already imported". It is only ever called on models the benchmark generated itself a
moment earlier (``bench.run`` writes them with ``tests.fixtures.models`` into its own temporary
directory, and ``bench.registry`` builds S8's registry there). Nothing in ``service/``,
``clients/`` or ``sandbox/`` may import it, and it must never be pointed at a file from
anywhere else.

Each conversion mirrors what the sandbox worker produces (skl2onnx with the same initial
type, options and opsets; safetensors of a weights-only load) minus what only Airlock does
(parity check, checker pass, validation), which is part of the overhead being measured.
"""

from __future__ import annotations

import pickle
import time
import warnings
from pathlib import Path
from typing import Any

#: The worker's opsets for scikit-learn models (sandbox/airlock_worker/sklearn_convert.py).
SKLEARN_OPSET = {"": 18, "ai.onnx.ml": 3}


def import_libraries() -> None:
    """Import everything up front: the baseline's premise is "libraries already imported"."""
    import joblib  # noqa: F401
    import safetensors.torch  # noqa: F401
    import skl2onnx  # noqa: F401
    import sklearn.pipeline  # noqa: F401
    import torch  # noqa: F401


def to_onnx_bytes(model: Any) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    final = model
    while hasattr(final, "steps"):
        final = final.steps[-1][1]
    options = {id(final): {"zipmap": False}} if is_classifier(final) else None
    initial = [("X", FloatTensorType([None, int(model.n_features_in_)]))]
    onx = convert_sklearn(model, initial_types=initial, options=options,
                          target_opset=SKLEARN_OPSET)
    return bytes(onx.SerializeToString())


def pickle_to_onnx(path: Path) -> bytes:
    """UNSAFE: ``pickle.load`` of a benchmark-generated sklearn pickle, then skl2onnx."""
    with path.open("rb") as fh:
        model = pickle.load(fh)
    return to_onnx_bytes(model)


def joblib_to_onnx(path: Path) -> bytes:
    """UNSAFE: ``joblib.load`` of a benchmark-generated joblib file, then skl2onnx."""
    import joblib

    model = joblib.load(path)  # benchmark-generated file, see the docstring
    return to_onnx_bytes(model)


def mlflow_sklearn_to_onnx(uri: str) -> bytes:
    """UNSAFE: ``mlflow.sklearn.load_model`` of a benchmark-registered version (a
    ``models:/NAME/VERSION`` URI of the registry ``bench.registry`` built), then skl2onnx."""
    import mlflow.sklearn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mlflow.sklearn.load_model(uri)  # benchmark-generated version, see the docstring
    return to_onnx_bytes(model)


def state_dict_to_safetensors(path: Path, out: Path) -> int:
    """``torch.load(weights_only=True)`` of a benchmark-generated state dict, then
    ``safetensors.torch.save_file``. Returns the output size."""
    import safetensors.torch
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    safetensors.torch.save_file(state, str(out), metadata={"format": "pt"})
    del state
    return out.stat().st_size


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    began = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - began, result

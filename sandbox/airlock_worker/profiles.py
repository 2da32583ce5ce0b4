"""What a container imports before its job arrives. A warm container pays this while it
waits; a cold one pays it anyway, so each profile imports only what most of its jobs need
(torch alone costs ~4.7 CPU-s per container, DESIGN §4). Anything else is imported lazily,
by the job that needs it: ONNX and ONNX Runtime, for instance, are imported before the job
only by the sklearn profile, where every job converts to ONNX and checks parity; in the
torch profile only module exports need them (a state dict becomes safetensors), in the light
profile only an ONNX passthrough (measured in the sandbox image: 0.18-0.24 of a torch
container's 1.6-2.0 CPU-s, 0.06-0.08 of a light one's 0.17-0.23)."""

from __future__ import annotations

import contextlib
import gc
import importlib

from airlock_sandbox.formats import PROFILE_LIGHT, PROFILE_SKLEARN, PROFILE_TORCH

from .deferred_imports import defer_all, hidden
from .doc_parsing import skip_scipy_docstring_parsing

PROFILES: dict[str, tuple[str, ...]] = {
    # pickles / joblib: the estimator base classes, the converters and their runtime.
    # xgboost and lightgbm are left to the unpickler, which imports them if the model is one.
    PROFILE_SKLEARN: (
        "numpy", "sklearn.base", "sklearn.pipeline", "skl2onnx", "skl2onnx.common.data_types",
        "onnxmltools", "onnx", "onnxruntime", "joblib", "cloudpickle", "yaml",
        "airlock_worker.sklearn_convert", "airlock_worker.mlflow_convert",
    ),
    # PyTorch checkpoints, TorchScript, .pt2: loading and safetensors (export and parity
    # import onnx and onnxruntime when a module is exported).
    PROFILE_TORCH: (
        "torch", "safetensors.torch", "numpy",
        "airlock_worker.torch_convert", "airlock_worker.st_torch",
    ),
    # numpy, ONNX and safetensors inputs: no model code, no heavy frameworks (onnx is
    # imported by an ONNX passthrough).
    PROFILE_LIGHT: (
        "numpy", "safetensors.numpy",
        "airlock_worker.numpy_convert", "airlock_worker.passthrough",
        "airlock_worker.extract",
    ),
}
DEFAULT_PROFILE = PROFILE_LIGHT


def warm_up(profile: str) -> None:
    """Import the profile's modules, then pay its first-call costs (:mod:`.priming`).

    The cyclic garbage collector is off meanwhile: what imports allocate lives as long as the
    process, so its collections found nothing to free and cost 8-15 % of the warm-up's CPU
    (sklearn 0.93 -> 0.85 CPU-s, torch 0.95 -> 0.84, ``--cpus 1``, median of 3). Frozen
    afterwards, those objects are never walked again by the job's own collections."""
    gc.disable()
    try:
        if profile == PROFILE_SKLEARN:  # scikit-learn imports scipy.stats and more
            skip_scipy_docstring_parsing()  # doc_parsing.py: for a job that uses it
            defer_all()  # deferred_imports.py: imported only by such a job
        with hidden() if profile == PROFILE_SKLEARN else contextlib.nullcontext():
            for module in PROFILES[profile]:  # ... and pandas only by a DataFrame's job
                importlib.import_module(module)
            from .priming import prime

            prime(profile)
    finally:
        gc.freeze()
        gc.enable()

"""What a container imports before its job arrives. A warm container pays this while it
waits; a cold one pays it anyway, so each profile imports only what its jobs need (torch
alone costs ~4.7 CPU-s per container, DESIGN §4). Anything else is imported lazily."""

from __future__ import annotations

import importlib

from airlock_sandbox.formats import PROFILE_LIGHT, PROFILE_SKLEARN, PROFILE_TORCH

PROFILES: dict[str, tuple[str, ...]] = {
    # pickles / joblib: the estimator base classes, the converters and their runtime.
    # xgboost and lightgbm are left to the unpickler, which imports them if the model is one.
    PROFILE_SKLEARN: (
        "numpy", "sklearn.base", "sklearn.pipeline", "skl2onnx", "skl2onnx.common.data_types",
        "onnxmltools", "onnx", "onnxruntime", "joblib", "cloudpickle", "yaml",
        "airlock_worker.sklearn_convert", "airlock_worker.mlflow_convert",
    ),
    # PyTorch checkpoints, TorchScript, .pt2: loading, safetensors, export and parity.
    PROFILE_TORCH: (
        "torch", "safetensors.torch", "onnx", "numpy", "onnxruntime",
        "airlock_worker.torch_convert", "airlock_worker.st_torch",
    ),
    # numpy, ONNX and safetensors inputs: no model code, no heavy frameworks.
    PROFILE_LIGHT: (
        "numpy", "onnx", "safetensors.numpy",
        "airlock_worker.numpy_convert", "airlock_worker.passthrough",
        "airlock_worker.extract",
    ),
}
DEFAULT_PROFILE = PROFILE_LIGHT


def warm_up(profile: str) -> None:
    """Import the profile's modules, then pay its first-call costs (:mod:`.priming`)."""
    for module in PROFILES[profile]:
        importlib.import_module(module)
    from .priming import prime

    prime(profile)

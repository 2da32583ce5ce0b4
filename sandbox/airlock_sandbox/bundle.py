"""The MLflow bundle: a model directory packed by the client as a STORED zip, ``MLmodel`` at
its root. Shared rules (pure stdlib, no archive reader) for the client, which packs it, and
the worker, which re-checks every member inside the sandbox before reading one.

The broker opens no archive (DESIGN §1.1): a zip is a bundle because the client declared
``mlflow``, and the client's flavor hint (:func:`convertible_flavor` of the ``MLmodel`` it
packed) only picks the worker profile. The worker lists the bundle and refuses one that is not
what the broker decided from that declaration.
"""

from __future__ import annotations

import posixpath
import unicodedata
from collections.abc import Mapping
from typing import Any

MLMODEL = "MLmodel"
MAX_MLMODEL_BYTES = 1024 * 1024
MAX_MEMBERS = 10_000
MAX_NAME_BYTES = 1024
MAX_COMPONENT_BYTES = 255
MAX_DEPTH = 32
#: The flavors Airlock converts, in the order a model's ``MLmodel`` is searched for one.
CONVERTIBLE_FLAVORS = ("sklearn", "pytorch", "onnx", "xgboost", "lightgbm")
#: What a pyfunc ``loader_module`` may be for the model to be converted: MLflow's own flavors.
SUPPORTED_LOADERS = {"mlflow.sklearn": "sklearn", "mlflow.pytorch": "pytorch",
                     "mlflow.onnx": "onnx", "mlflow.xgboost": "xgboost",
                     "mlflow.lightgbm": "lightgbm"}

#: How MLflow saves an estimator flavor's model file (``serialization_format``).
SKLEARN_FORMATS = frozenset({"pickle", "cloudpickle", "skops"})
#: The model files of these formats are pickles: the reading that executes nothing reads them.
PICKLED_FORMATS = frozenset({"pickle", "cloudpickle"})
#: MLflow's lightgbm flavor saves a Booster as its text model (model.lgb) and the
#: scikit-learn wrappers (LGBMClassifier...) with the sklearn serialization formats.
LIGHTGBM_BOOSTER_CLASS = "lightgbm.basic.Booster"
#: What :func:`serialization_hint` can say: one of these, or "".
SERIALIZATION_HINTS = SKLEARN_FORMATS | {"text"}


class BundleError(ValueError):
    """A bundle (or one of its member names) breaks a rule; the message says which."""


def check_member_name(name: str) -> None:
    """A relative POSIX path of plain components: nothing an extractor could misplace."""
    if not name or name.startswith("/") or len(name.encode("utf-8", "surrogatepass")) \
            > MAX_NAME_BYTES:
        raise BundleError(f"member {name[:80]!r} is empty, absolute or too long")
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        raise BundleError(f"member {name[:80]!r} is nested deeper than {MAX_DEPTH}")
    for part in parts:
        if part in {"", ".", ".."} or "\\" in part or (len(part) >= 2 and part[1] == ":"):
            raise BundleError(f"member {name[:80]!r} could escape the model root")
        if any(unicodedata.category(c) in {"Cc", "Cs"} for c in part):
            raise BundleError(f"member {name[:80]!r} has a control or undecodable character")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise BundleError(f"member {name[:80]!r} has an over-long component")


def contained(path: str) -> str:
    """A path named in ``MLmodel``, normalised; raise if it leaves the model root."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise BundleError(f"{MLMODEL} names a path {str(path)[:80]!r} outside the model")
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        raise BundleError(f"{MLMODEL} names a path {path[:80]!r} outside the model")
    return normal


def convertible_flavor(flavors: Mapping[str, Any]) -> str | None:
    """The flavor a bundle is converted as, from ``MLmodel``'s ``flavors`` mapping: the first
    of :data:`CONVERTIBLE_FLAVORS` present, else the one a pyfunc ``loader_module`` names;
    None when there is none (an arbitrary PythonModel cannot be converted). The client sends
    it as a hint; the worker plans with it and refuses a hint it does not match."""
    for flavor in CONVERTIBLE_FLAVORS:
        if isinstance(flavors.get(flavor), dict):
            return flavor
    pyfunc = flavors.get("python_function")
    loader = pyfunc.get("loader_module") if isinstance(pyfunc, dict) else None
    return SUPPORTED_LOADERS.get(loader) if isinstance(loader, str) else None


def serialization_hint(flavors: Mapping[str, Any], flavor: str) -> str:
    """How an estimator flavor's model file is stored, from ``MLmodel`` as the worker's plan
    reads it: "pickle", "cloudpickle" or "skops" (``serialization_format``, MLflow's default
    "pickle" when absent), "text" for a LightGBM Booster; "" for other flavors or a value the
    worker would refuse. The client sends it beside the flavor: the broker then reads a
    pickled estimator first (its reading alone may answer) and gives a skops or booster file
    no second sandbox, which would refuse to read it."""
    conf = flavors.get(flavor)
    if flavor not in ("sklearn", "lightgbm") or not isinstance(conf, dict):
        return ""
    if flavor == "lightgbm" and conf.get("model_class",
                                          LIGHTGBM_BOOSTER_CLASS) == LIGHTGBM_BOOSTER_CLASS:
        return "text"
    value = conf.get("serialization_format") or "pickle"
    return value if isinstance(value, str) and value in SKLEARN_FORMATS else ""

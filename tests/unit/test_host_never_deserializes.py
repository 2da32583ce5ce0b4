"""DESIGN §1.1: the host never deserializes an artifact. This scans every host-side module.

The broker, the client library and the CLI may copy bytes, hash them, read magic bytes and
parse *outputs* with strict parsers. They must not import or call anything that unpickles,
loads a model, or executes model-supplied code, nor open an archive: a zip's or tar's
directory is attacker data (a Zip64 record can claim millions of entries behind a classic
record that claims one, issue 11 §2), so what is inside one is the sandbox's business.
``make check`` runs this file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOST_PACKAGES = [ROOT / "service", ROOT / "clients", ROOT / "sandbox" / "airlock_sandbox"]

#: Archive readers: the host opens no archive (issue 11 §2).
ARCHIVE_READERS = {"zipfile", "tarfile", "zipimport", "py7zr", "rarfile", "libarchive"}
#: Modules whose mere import on the host is a red flag. ``onnxruntime`` and the tensor loaders
#: of safetensors are safe-format loaders, but a host that runs models is one step from one
#: that loads the wrong bytes: they are allowed only where ALLOWED says so.
FORBIDDEN_IMPORTS = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "torch",
                     "mlflow", "sklearn", "skops", "marshal", "shelve", "keras", "tensorflow",
                     "airlock_worker", "onnxruntime", *ARCHIVE_READERS}
FORBIDDEN_SUBMODULES = {"safetensors.numpy", "safetensors.torch", "safetensors.flax",
                        "safetensors.tensorflow", "safetensors.paddle", "safetensors.mlx",
                        "shutil.unpack_archive"}
#: The only parts of MLflow the host may import: its download API copies bytes and
#: deserializes nothing (research/conversion.md §4), the tracking client looks versions up;
#: its loaders are never allowed.
ALLOWED_MLFLOW_IMPORTS = {"mlflow.artifacts", "mlflow.exceptions", "mlflow.tracking"}
#: Dotted call names that deserialize or execute artifact content.
FORBIDDEN_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "joblib.load", "cloudpickle.load",
    "cloudpickle.loads", "dill.load", "dill.loads", "torch.load", "torch.jit.load",
    "torch.export.load", "numpy.load", "np.load", "yaml.load", "yaml.unsafe_load",
    "yaml.full_load", "marshal.loads", "shelve.open", "eval", "exec", "__import__",
    "importlib.import_module", "onnx.load", "onnx.load_model",
    "onnxruntime.InferenceSession", "ort.InferenceSession", "shutil.unpack_archive",
}

#: The only exceptions, per host file, each with why it is safe. Every entry must still be
#: needed (a test fails on a stale one), so the list cannot quietly grow.
ALLOWED: dict[str, set[str]] = {
    # The safe load (issue #4) hands bytes whose signed provenance and sha256 it has just
    # verified to the loaders of the two code-free formats Airlock emits: onnxruntime parses
    # ONNX protobuf, safetensors reads a JSON header and raw buffers. No pickle, no MLflow
    # loader; mlflow.artifacts only copies the two files.
    "clients/airlock_client/safe_load.py": {
        "import onnxruntime", "call onnxruntime.InferenceSession()",
        "from safetensors.torch import ...", "from safetensors.numpy import ...",
    },
    # Writes the client's own bundle from a directory it has just checked (_bundle.pack);
    # nothing on the host reads a zip.
    "clients/airlock_client/_bundle.py": {"import zipfile"},
}


def _host_files() -> list[Path]:
    files = [p for pkg in HOST_PACKAGES for p in pkg.rglob("*.py")]
    assert len(files) > 10, "the host-side packages were not found; the guard would pass vacuously"
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _forbidden_module(name: str) -> bool:
    return name.split(".")[0] in FORBIDDEN_IMPORTS or any(
        name == sub or name.startswith(sub + ".") for sub in FORBIDDEN_SUBMODULES)


def _violations(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if _forbidden_module(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module not in ALLOWED_MLFLOW_IMPORTS and (
                    _forbidden_module(node.module) or any(
                    _forbidden_module(f"{node.module}.{a.name}") for a in node.names)):
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in FORBIDDEN_CALLS:
                found.append(f"call {name}()")
            if name.endswith("load_model") and "mlflow" in name:
                found.append(f"call {name}()")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (
                        isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append("allow_pickle not False")
    return found


@pytest.mark.parametrize("path", _host_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_host_module_never_deserializes(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    allowed = ALLOWED.get(str(path.relative_to(ROOT)), set())
    found = [v for v in _violations(tree) if v not in allowed]
    assert found == [], f"{path} deserializes or imports a deserializer"


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_every_allowance_is_still_needed(name: str) -> None:
    path = ROOT / name
    assert path.is_file(), f"ALLOWED names {name}, which no longer exists"
    unused = ALLOWED[name] - set(_violations(ast.parse(path.read_text(), filename=name)))
    assert unused == set(), f"stale allowances for {name}: {sorted(unused)}"


@pytest.mark.parametrize("snippet", [
    "import pickle", "from joblib import load", "torch.load(f)", "pickle.loads(b)",
    "np.load(f, allow_pickle=True)", "yaml.load(s)", "mlflow.sklearn.load_model(u)",
    "import airlock_worker", "eval(x)", "import mlflow.artifacts", "from mlflow import pyfunc",
    "from mlflow.sklearn import load_model", "from mlflow.pyfunc import load_model",
    "import onnxruntime", "from safetensors.numpy import load_file",
    "from safetensors import torch",
    "onnxruntime.InferenceSession(b)",
    "import zipfile", "from zipfile import ZipFile", "import tarfile", "import zipimport",
    "shutil.unpack_archive(p, d)", "from shutil import unpack_archive",
])
def test_guard_catches_known_deserializers(snippet: str) -> None:
    # The guard itself must be able to fail, or it proves nothing.
    assert _violations(ast.parse(snippet))

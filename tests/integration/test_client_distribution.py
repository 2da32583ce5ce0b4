"""airlock-client installed alone, as a user would: its wheel, built from this tree, in a fresh
venv (no system site packages, no PYTHONPATH), converts against a running broker, and the
install holds none of the broker's weight (Docker, onnx, MLflow, the broker itself).

Its dependencies come from the package index this machine reaches (pip's cache makes that
fast); the test fails, never skips, when the wheel cannot be built or installed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, BrokerProcess
from tests.fixtures import models

pytestmark = pytest.mark.integration

#: What the wheel is built from: the client, the protocol, the shared contract (its
#: package-dir points at the last two, outside clients/).
SOURCES = ("clients", "protos", "sandbox/airlock_sandbox")
ABSENT = ("docker", "onnx", "onnxruntime", "mlflow", "numpy", "airlock_broker")


def _run(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout, check=False)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user of the wheel: nothing of this checkout on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    return {**env, "PYTHONNOUSERSITE": "1", **extra}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the client's wheel and its dependencies installed."""
    work = tmp_path_factory.mktemp("client-dist")
    tree = work / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for source in SOURCES:  # a copy: the in-tree build's build/ and egg-info stay out of ROOT
        shutil.copytree(ROOT / source, tree / source, ignore=ignore)
    began = time.monotonic()
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--quiet", "-w", work / "wheels", "./clients", env=_clean_env(), cwd=tree)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (work / "wheels").glob("airlock_client-*.whl")
    venv = work / "venv"
    # Without a pip of its own (ensurepip costs seconds): this pip installs into it, for its
    # interpreter, exactly what the venv's own pip would.
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv, env=_clean_env())
    assert made.returncode == 0, made.stderr
    installed = _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python",
                     "install", "--quiet", "--disable-pip-version-check", wheel,
                     env=_clean_env())
    assert installed.returncode == 0, installed.stdout + installed.stderr
    print(f"client wheel built and installed in a fresh venv in "
          f"{time.monotonic() - began:.1f} s")
    return venv


def test_the_client_alone_has_none_of_the_brokers_dependencies(client_venv: Path) -> None:
    probe = ("import importlib.util as u, json\n"
             f"print(json.dumps({{m: u.find_spec(m) is not None for m in {ABSENT!r}}}))")
    done = _run(client_venv / "bin" / "python", "-c", probe, env=_clean_env())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == dict.fromkeys(ABSENT, False)
    # It is the installed client that answers, not this checkout's.
    where = _run(client_venv / "bin" / "python", "-c",
                 "import airlock_client; print(airlock_client.__file__)", env=_clean_env())
    assert where.stdout.startswith(str(client_venv)), where.stdout + where.stderr
    moved = _run(client_venv / "bin" / "airlock", "serve", env=_clean_env())
    assert moved.returncode == 2 and "airlock-broker serve" in moved.stderr, moved.stderr


def test_the_installed_client_converts_and_verifies(client_venv: Path, broker: BrokerProcess,
                                                    tmp_path: Path) -> None:
    artifact, _ = models.make_sklearn_pickle(tmp_path)
    out = tmp_path / "model.onnx"
    env = _clean_env(AIRLOCK_SERVER=broker.address)
    began = time.monotonic()
    done = _run(client_venv / "bin" / "airlock", "convert", artifact, "-o", out, "--json",
                env=env, timeout=300)
    print(f"airlock convert from the fresh venv: {time.monotonic() - began:.2f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] == "ok" and doc["format"] == "onnx" and Path(doc["output"]) == out
    assert hashlib.sha256(out.read_bytes()).hexdigest() == doc["sha256"]
    assert Path(doc["provenance"]).is_file()
    checked = _run(client_venv / "bin" / "airlock", "verify", out, "--json", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["status"] == "ok"

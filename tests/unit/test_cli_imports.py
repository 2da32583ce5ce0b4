"""The client CLI starts at once: ``airlock --help``, a usage error and the broker's moved
commands import argparse and the client's exception tree, nothing heavy (issue #12: onnx's
``ml_dtypes`` alone cost every ``airlock`` call 1.2 s). Not a timing test: it names what gets
imported; bench/run.py measures the time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Nothing a command that talks to no broker needs; each costs tens of ms to seconds.
HEAVY = ("onnx", "onnxruntime", "ml_dtypes", "numpy", "mlflow", "cryptography", "docker",
         "airlock_broker", "grpc", "google.protobuf", "yaml", "tenacity", "safetensors")
#: What ``import airlock_client`` and the CLI's surface may load of the client.
LIGHT = {"airlock_client", "airlock_client._cli_connection", "airlock_client._cli_exits",
         "airlock_client._errors", "airlock_client._lineage", "airlock_client._batch_jobs",
         "airlock_client._registry", "airlock_client._regular_files", "airlock_client._terminal",
         "airlock_client.cli"}

# Runs the console script's code (``from airlock_client.cli import main``), then prints what
# was imported as the last line of stdout.
_RUN_CLI = """
import json, sys
from airlock_client.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _imported(code: str, *args: str) -> tuple[object, set[str]]:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout.splitlines()[-1])
    return doc["code"], set(doc["modules"])


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules
                  if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("args", [
    ["--help"], ["convert", "--help"], ["migrate", "--help"], ["frobnicate"], ["convert"],
    ["serve", "--listen", "127.0.0.1:50051"], ["token", "create", "--principal", "x"],
    ["keys", "export", "--config", "b.toml"],
])
def test_the_cli_imports_nothing_heavy_before_a_command_runs(args: list[str]) -> None:
    code, modules = _imported(_RUN_CLI, *args)
    assert code in (0, 2)
    assert _heavy(modules) == []
    assert {m for m in modules if m.startswith("airlock")} <= LIGHT


def test_importing_the_package_loads_the_errors_alone() -> None:
    _, modules = _imported("import json, sys, airlock_client\n"
                           "airlock_client.TensorSpec, airlock_client.Assurance\n"
                           "print(json.dumps({'code': 0, 'modules': sorted(sys.modules)}))")
    assert _heavy(modules) == []
    assert {m for m in modules if m.startswith("airlock")} == {
        "airlock_client", "airlock_client._errors", "airlock_client._types"}


def test_the_client_library_needs_no_onnx_mlflow_or_broker() -> None:
    # Client is gRPC and cryptography (it verifies provenance); load_verified's own loaders
    # (onnx, onnxruntime, safetensors) are imported only when it loads a model.
    _, modules = _imported("import json, sys\n"
                           "from airlock_client import Client, load_verified, ProvenanceRecord\n"
                           "print(json.dumps({'code': 0, 'modules': sorted(sys.modules)}))")
    tops = {m.split(".")[0] for m in modules}
    assert {"grpc", "cryptography"} <= tops
    assert not {"onnx", "onnxruntime", "ml_dtypes", "numpy", "mlflow", "docker", "safetensors",
                "airlock_broker"} & tops


def test_a_command_loads_its_module_when_it_runs() -> None:
    # The other side of the coin: a subcommand does get what it needs (here: the convert
    # module, the client, gRPC), imported by main when it dispatches.
    code, modules = _imported(_RUN_CLI, "convert", "/nonexistent/model.pkl")
    assert code == 2
    assert {"airlock_client._convert_cli", "airlock_client._client", "grpc"} <= modules
    assert not {"onnx", "mlflow", "airlock_broker", "docker", "numpy"} & {
        m.split(".")[0] for m in modules}


def test_the_broker_starts_without_importing_onnx() -> None:
    """Only the ONNX validator processes parse models; onnx's import (``ml_dtypes`` above all,
    about a second) in the broker process cost every broker start that much."""
    code, modules = _imported(
        "import json, sys\nimport airlock_broker.__main__, airlock_broker.api.server\n"
        "print(json.dumps({'code': 0, 'modules': sorted(sys.modules)}))")
    assert code == 0
    assert {"onnx", "ml_dtypes"} & modules == set()

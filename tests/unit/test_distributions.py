"""The two distributions (issue #12): airlock-client (clients/pyproject.toml) and
airlock-broker (service/pyproject.toml), beside the repository root's developer install.

Checked statically, from the sources: every module a distribution ships imports only what its
dependencies provide (at module level: the required ones; inside a function: an extra's too),
the client never imports the broker, the console scripts point at the right ``main``, and
the developer install pins what the two pin. tests/integration/test_client_distribution.py
builds the client's wheel and converts with it from a fresh venv."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "pyproject.toml"
BROKER = ROOT / "service" / "pyproject.toml"
DEVELOPER = ROOT / "pyproject.toml"

#: Top-level import name -> the distribution that provides it.
PROVIDED_BY = {
    "grpc": "grpcio", "grpc_status": "grpcio-status", "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection", "google.protobuf": "protobuf",
    "google.rpc": "grpcio-status",  # googleapis-common-protos, which grpcio-status requires
    "cryptography": "cryptography", "tenacity": "tenacity", "yaml": "pyyaml",
    "mlflow": "mlflow-skinny", "onnx": "onnx", "onnxruntime": "onnxruntime",
    "safetensors": "safetensors", "numpy": "numpy", "docker": "docker", "requests": "requests",
    "prometheus_client": "prometheus-client",
    "airlock_client": "airlock-client", "airlock": "airlock-client",
    "airlock_sandbox": "airlock-client", "airlock_broker": "airlock-broker",
}


def _project(path: Path) -> dict:  # type: ignore[type-arg]
    return tomllib.loads(path.read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def _names(requirements: list[str]) -> set[str]:
    return {_name(r) for r in requirements}


def _package_dirs(pyproject: Path) -> list[Path]:
    setuptools = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    base = pyproject.parent
    if isinstance(setuptools["packages"], list):  # explicit: top-level ones via package-dir
        dirs = setuptools["package-dir"]
        return [(base / dirs[p]).resolve() for p in setuptools["packages"] if "." not in p]
    find = setuptools["packages"]["find"]
    return [base / w / p.rstrip("*") for w in find["where"] for p in find["include"]]


def _imports(package: Path) -> tuple[set[str], set[str]]:
    """Third-party import names of a package's modules: (module level, inside functions)."""
    top, nested = set(), set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        inside = {id(n) for f in ast.walk(tree)
                  if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                  for n in ast.walk(f)}
        type_checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                         and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                key = ".".join(name.split(".")[:2]) if name.startswith("google.") \
                    else name.split(".")[0]
                if key.split(".")[0] in sys.stdlib_module_names or id(node) in type_checking:
                    continue
                (nested if id(node) in inside else top).add(key)
    return top, nested


def _distributions(imports: set[str]) -> set[str]:
    unknown = imports - PROVIDED_BY.keys()
    assert not unknown, f"add these imports to PROVIDED_BY (and a dependency): {unknown}"
    return {PROVIDED_BY[i] for i in imports}


def test_the_client_ships_the_protocol_and_the_shared_contract() -> None:
    dirs = _package_dirs(CLIENT)
    assert dirs == [ROOT / "clients" / "airlock_client", ROOT / "protos" / "airlock",
                    ROOT / "sandbox" / "airlock_sandbox"]
    assert _package_dirs(BROKER) == [ROOT / "service" / "airlock_broker"]


def test_the_clients_imports_are_its_dependencies() -> None:
    client = _project(CLIENT)
    required = _names(client["dependencies"]) | {"airlock-client"}
    extras = set().union(*(_names(r) for r in client["optional-dependencies"].values()))
    top, nested = set(), set()
    for package in _package_dirs(CLIENT):
        t, n = _imports(package)
        top, nested = top | t, nested | n
    assert _distributions(top) <= required, "a module-level import needs a core dependency"
    assert _distributions(nested) <= required | extras
    assert "airlock-broker" not in _distributions(top | nested), "the client imports the broker"
    # What the issue promises a plain `pip install airlock-client` does not bring.
    assert not {"docker", "onnx", "mlflow-skinny", "numpy", "onnxruntime"} & required


def test_the_brokers_imports_are_its_dependencies() -> None:
    broker = _project(BROKER)
    required = _names(broker["dependencies"]) | {"airlock-broker"}
    top, nested = _imports(ROOT / "service" / "airlock_broker")
    assert _distributions(top | nested) <= required
    # Not needed by the broker (the client fetches MLflow models); declared, they would only
    # make the broker's install heavier.
    assert not {"mlflow-skinny", "pyyaml", "onnxruntime"} & required


def test_the_console_scripts() -> None:
    assert _project(CLIENT)["scripts"] == {"airlock": "airlock_client.cli:main"}
    assert _project(BROKER)["scripts"] == {"airlock-broker": "airlock_broker.__main__:main"}
    assert _project(DEVELOPER)["scripts"] == {**_project(CLIENT)["scripts"],
                                              **_project(BROKER)["scripts"]}


def test_the_developer_install_pins_what_the_distributions_pin() -> None:
    developer = _project(DEVELOPER)
    pinned = set(developer["dependencies"]) | set(developer["optional-dependencies"]["dev"])
    client, broker = _project(CLIENT), _project(BROKER)
    wanted = set(client["dependencies"]) | set(broker["dependencies"]) | {
        r for extra in client["optional-dependencies"].values() for r in extra}
    wanted -= {r for r in wanted if _name(r) == "airlock-client"}
    assert wanted - pinned == set()
    assert client["version"] == broker["version"] == developer["version"]
    assert f"airlock-client=={client['version']}" in broker["dependencies"]

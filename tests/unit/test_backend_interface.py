"""The sandbox backend interface is the broker's only view of the engine: every backend
implements all of it, and nothing above it names Docker."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from airlock_broker.sandboxes.docker_sandbox import DockerSandbox
from airlock_broker.sandboxes.sandbox import SandboxBackend
from tests.unit.fakes import FakeSandbox

BROKER = Path(__file__).resolve().parents[2] / "service" / "airlock_broker"
VERBS = sorted(name for name, value in vars(SandboxBackend).items()
               if inspect.isfunction(value) and not name.startswith("_"))


def test_the_interface_is_a_handful_of_verbs() -> None:
    job = {"prepare", "start", "hand_over", "append_only_output", "run", "output", "destroy"}
    upkeep = {"is_running", "check", "reap_orphans", "close"}
    selftest_and_gates = {"describe", "versions"}
    hints = {"warmed_up"}  # synchronous: pool status reads it (a hint, never a decision)
    priority = {"hasten", "let_import"}  # synchronous: a CPU weight (a speed, never a
    # confinement)
    found = set(VERBS)
    assert found == job | upkeep | selftest_and_gates | hints | priority
    assert {v for v in VERBS if not inspect.iscoroutinefunction(
        getattr(SandboxBackend, v))} == hints | priority


@pytest.mark.parametrize("backend", [DockerSandbox, FakeSandbox])
@pytest.mark.parametrize("verb", VERBS)
def test_every_backend_implements_every_verb_with_its_parameters(backend: type,
                                                                 verb: str) -> None:
    method = getattr(backend, verb, None)
    is_async = inspect.iscoroutinefunction(getattr(SandboxBackend, verb))
    assert method is not None and inspect.iscoroutinefunction(method) == is_async, \
        f"{backend} lacks {verb}"
    want = list(inspect.signature(getattr(SandboxBackend, verb)).parameters)
    assert list(inspect.signature(method).parameters)[:len(want)] == want


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_only_the_docker_adapter_imports_docker_and_only_backends_picks_it() -> None:
    for path in sorted(BROKER.rglob("*.py")):
        name = path.relative_to(BROKER).as_posix()
        imports = _imports(path)
        if any(i == "docker" or i.startswith("docker.") for i in imports):
            assert name.startswith("sandboxes/docker_"), f"{name} imports docker"
        if "airlock_broker.sandboxes.docker_sandbox" in imports:
            assert name == "sandboxes/backends.py", f"{name} names the Docker backend"

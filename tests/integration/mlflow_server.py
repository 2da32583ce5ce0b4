"""A real MLflow tracking server on loopback for tests: sqlite backend store and a local
artifact root in a temporary directory, started as ``mlflow server`` in its own process
group and killed in a ``finally``. Shared by the MLflow input and migration tests.

    with mlflow_tracking_server(tmp_path) as server:
        mlflow.set_tracking_uri(server.uri)
        ...

The server takes several CPU-seconds to come up: a fixture with other set-up to do (a broker,
model directories) does it meanwhile with ``starting_mlflow_server`` and waits afterwards.

    with starting_mlflow_server(tmp) as starting:
        ...  # build what the registry will hold
        server = starting.wait()
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

MLFLOW = str(Path(sys.executable).parent / "mlflow")
START_TIMEOUT = 120.0


@dataclass(frozen=True)
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    root: Path  # holds mlflow.db, the artifacts and server.log
    pid: int


@dataclass(frozen=True)
class StartingServer:
    """A server process launched but not yet known to answer."""

    uri: str
    root: Path
    process: subprocess.Popen[bytes]

    def wait(self) -> MlflowServer:
        """Block until ``/health`` answers (``START_TIMEOUT``); fail the test if it never does."""
        _wait_healthy(self.uri, self.process, self.root / "server.log")
        return MlflowServer(uri=self.uri, root=self.root, pid=self.process.pid)


@contextlib.contextmanager
def mlflow_tracking_server(tmp: Path) -> Iterator[MlflowServer]:
    """Start ``mlflow server`` on a free loopback port; stop it (and its workers) on exit."""
    with starting_mlflow_server(tmp) as starting:
        yield starting.wait()


@contextlib.contextmanager
def starting_mlflow_server(tmp: Path) -> Iterator[StartingServer]:
    """Launch ``mlflow server`` on a free loopback port without waiting for it; stop it (and
    its workers) on exit."""
    root = tmp / "mlflow-server"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    # No huey job consumers: the tests run no server-side jobs, and the consumers were among
    # the busiest processes on the machine while the migrate tests ran.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    command = [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", (root / "artifacts").as_uri()]
    with log.open("wb") as fh:
        process = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                   cwd=root, start_new_session=True)
    try:
        yield StartingServer(uri=f"http://127.0.0.1:{port}", root=root, process=process)
    finally:
        _stop(process)


def _wait_healthy(uri: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n"
                        f"{log.read_text()[-3000:]}", pytrace=False)
        with contextlib.suppress(urllib.error.URLError, OSError), \
                urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
            if reply.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy within {START_TIMEOUT:g} s:\n"
                f"{log.read_text()[-3000:]}", pytrace=False)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's own process group (its uvicorn/gunicorn workers), then KILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)

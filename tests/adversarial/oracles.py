"""The oracles every adversarial test asserts (research/security.md §5, "contained"):

1. a defined outcome: ``ok`` with a validated output, or ``rejected`` / ``failed`` with a reason;
2. no host side effect: canary files unchanged, host-side TCP and UDP listeners (bound on all
   interfaces, so reachable on loopback and on the Docker bridge gateway) received nothing;
3. no container left behind (also asserted after every test by the autouse fixture);
4. the broker still serves a benign job right after;
5. nothing unvalidated reaches the caller: no output file unless ``ok``, and an output is
   strictly valid safetensors / ONNX whose bytes hash to what the broker reported.

``Observers`` holds the listeners and canaries; ``run_case`` runs ``airlock convert``;
``assert_contained`` checks 1-5.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from tests.conftest import BrokerProcess, assert_no_sandbox_left, run_cli

#: Reasons that mean "refused or failed for a stated cause", per outcome.
DEFINED = {"rejected", "failed"}


class Listener:
    """A TCP listener on all host interfaces (loopback and the Docker bridge) counting connects."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class UdpListener:
    """A UDP socket on all host interfaces counting datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.datagrams = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.recvfrom(4096)
            except OSError:
                continue
            self.datagrams += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def bridge_gateway(docker_client) -> str:  # type: ignore[no-untyped-def]
    config = docker_client.networks.get("bridge").attrs["IPAM"]["Config"]
    return str(config[0].get("Gateway", "172.17.0.1"))


@dataclass
class Observers:
    """Host-side witnesses of an escape: listeners, canary files, and where the payload aims."""

    tcp: Listener
    udp: UdpListener
    canary_dir: Path
    hosts: list[str]
    canaries: dict[Path, str] = field(default_factory=dict)

    @property
    def escape_target(self) -> Path:
        """A host path a payload tries to create: it must never exist."""
        return self.canary_dir / "escaped.txt"

    def plant(self) -> None:
        self.canary_dir.mkdir(parents=True, exist_ok=True)
        for name in ("secret.txt", "config.toml"):
            path = self.canary_dir / name
            path.write_text(f"canary {name}\n")
            self.canaries[path] = _sha(path)

    def assert_untouched(self) -> None:
        time.sleep(0.3)  # a datagram in flight
        assert self.tcp.connections == 0, "a payload reached a TCP listener on the host"
        assert self.udp.datagrams == 0, "a payload reached a UDP listener on the host"
        assert not self.escape_target.exists(), "a payload wrote a file on the host"
        for path, digest in self.canaries.items():
            assert path.exists() and _sha(path) == digest, f"canary {path} changed"
        assert sorted(p.name for p in self.canary_dir.iterdir()) == sorted(
            p.name for p in self.canaries), "files appeared beside the canaries"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def observers(docker_client, tmp_path: Path) -> Iterator[Observers]:  # type: ignore[no-untyped-def]
    tcp, udp = Listener(), UdpListener()
    obs = Observers(tcp=tcp, udp=udp, canary_dir=tmp_path / "canary",
                    hosts=["127.0.0.1", bridge_gateway(docker_client), "host.docker.internal"])
    obs.plant()
    yield obs
    tcp.close()
    udp.close()


@dataclass
class Case:
    """One ``airlock convert`` of a hostile artifact, as the caller saw it."""

    done: subprocess.CompletedProcess[str]
    doc: dict[str, Any]
    out: Path
    elapsed: float

    @property
    def outcome(self) -> tuple[str, str | None]:
        return self.doc["status"], self.doc["reason"]


def run_case(broker: BrokerProcess, artifact: Path, *args: str, timeout: float = 300) -> Case:
    out = artifact.parent / f"{artifact.name}.out"
    began = time.monotonic()
    done = run_cli("convert", str(artifact), "-o", str(out), "--json", *args,
                   server=broker.address, timeout=timeout)
    elapsed = time.monotonic() - began
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"the CLI printed no JSON object (exit {done.returncode}):\n"
                    f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    assert isinstance(doc, dict)
    print(f"outcome: {doc.get('status')} {doc.get('reason')} ({elapsed:.1f} s)")  # for -s runs
    return Case(done=done, doc=doc, out=out, elapsed=elapsed)


def assert_defined(case: Case, status: str | set[str], reasons: set[str] | None = None) -> None:
    """Oracles 1 and 5: the outcome is the expected one and no unvalidated bytes got out."""
    statuses = {status} if isinstance(status, str) else status
    doc = case.doc
    assert doc["status"] in statuses, doc
    if doc["status"] == "ok":
        assert case.done.returncode == 0, doc
        assert_valid_output(case)
    else:
        assert doc["status"] in DEFINED and doc["reason"], doc
        assert case.done.returncode == 1, (case.done.returncode, doc)
        assert doc["output"] is None and not case.out.exists(), "an output reached the caller"
        if reasons is not None:
            assert doc["reason"] in reasons, doc
        assert_printable(doc["message"])


def assert_valid_output(case: Case) -> None:
    """The caller's file is what the broker validated: same sha256, and strictly valid."""
    data = case.out.read_bytes()
    assert hashlib.sha256(data).hexdigest() == case.doc["sha256"]
    from airlock_broker.validation.limits import OutputLimits

    if case.doc["format"] == "safetensors":
        from airlock_broker.validation.safetensors_check import validate_safetensors

        info = validate_safetensors(case.out, OutputLimits())
        assert info.canonical_size == len(data)
    else:
        from airlock_broker.validation.onnx_check import validate_onnx_bytes

        canonical, _ = validate_onnx_bytes(data, OutputLimits())
        assert canonical == data


def assert_printable(text: str, limit: int = 2000) -> None:
    """Text from the sandbox reaches the caller capped and without control characters."""
    assert len(text) <= limit, f"{len(text)} characters reached the caller"
    bad = [c for c in text if not (c.isprintable() or c == " ")]
    assert not bad, f"control characters reached the caller: {bad[:5]!r}"


def assert_still_serves(broker: BrokerProcess, tmp_path: Path) -> None:
    """Oracle 4: a benign conversion right after the hostile one succeeds."""
    benign = tmp_path / "benign.safetensors"
    benign.write_bytes(save({"w": np.ones((2, 2), dtype=np.float32)}))
    done = run_cli("convert", str(benign), "-o", str(tmp_path / "benign.out"), "--json",
                   server=broker.address)
    assert done.returncode == 0, done.stdout + done.stderr


def assert_contained(case: Case, broker: BrokerProcess, docker_client,  # type: ignore[no-untyped-def]
                     observers: Observers, tmp_path: Path, status: str | set[str],
                     reasons: set[str] | None = None) -> None:
    """All five oracles, in order."""
    assert_defined(case, status, reasons)
    observers.assert_untouched()
    assert_no_sandbox_left(docker_client)
    assert_still_serves(broker, tmp_path)


def findings(case: Case, marker: str) -> dict[str, str]:
    """What a probe payload reported from inside the sandbox (via the validated output)."""
    from safetensors import safe_open

    assert case.doc["status"] == "ok", f"the probe did not report: {case.doc}"
    with safe_open(str(case.out), framework="numpy") as reader:
        meta = reader.metadata() or {}
    assert meta.get("marker") == f"PWNED-{marker}", meta
    found = json.loads(meta["findings"])
    assert isinstance(found, dict)
    return found


def broker_rss_bytes(broker: BrokerProcess) -> int:
    with open(f"/proc/{broker.process.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def runtime_of(broker: BrokerProcess) -> str:
    return broker.runtime  # type: ignore[attr-defined,no-any-return]

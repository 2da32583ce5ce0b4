"""Threats from another user of the broker's own machine (issue 11, §6).

Without authentication, any local user could drain the pools, every caller was "anonymous",
and a user who bound the broker's port (or the other loopback family of it) got the clients'
tokens and artifacts and could answer with any output. Each test plays one such user
(``as_user``: uid 65534 after ``setuid``) against a real broker:

- the broker holds both loopback families of its port, and a client dialling ``localhost``
  dials 127.0.0.1, so a squatter on ``[::1]`` gets nothing;
- a client's default is the broker's Unix socket, and a socket (or directory) another user
  could have made is refused before a byte is sent;
- a Unix caller is named by its uid in the audit log, and a uid without the admin role cannot
  drain the pools, neither can an anonymous caller on the TCP port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from airlock_client import Client, ConversionError, ServiceUnavailable
from tests.conftest import IMAGE, ROOT, BrokerProcess, free_port, run_cli, start_broker
from tests.fixtures import models

pytestmark = pytest.mark.adversarial

NOBODY = 65534
#: No sandbox is needed here: these jobs are refused on the host, by their magic bytes.
NOT_A_MODEL = b"this is not a model file\n" * 4


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="airlock-local-trust-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def local_broker(docker_client, tmp_path_factory: pytest.TempPathFactory,  # type: ignore[no-untyped-def]
                 shared_dir: Path) -> Iterator[BrokerProcess]:
    """A broker without [auth], its Unix socket where the other user can reach it."""
    home = tmp_path_factory.mktemp("local-trust")
    config = home / "airlock.toml"
    config.write_text(f"[broker]\nselftest_on_start = false\n\n[sandbox]\nimage = {IMAGE!r}\n\n"
                      "[pools]\nmin_warm = 0\n")
    proc = start_broker(home, "--config", str(config),
                        env={"AIRLOCK_SOCKET": str(shared_dir / "run" / "broker.sock")})
    yield proc
    code = proc.stop()
    assert code == 0, f"broker exited {code}:\n{proc.log.read_text()[-3000:]}"


def as_user(uid: int, *args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``airlock ARGS`` run by another local user."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    return subprocess.run([sys.executable, "-m", "tests.adversarial.as_user", str(uid),
                           "airlock", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**clean, "AIRLOCK_SOCKET": "none", **(env or {})},
                          check=False)


class Squatter:
    """Another user's process holding addresses; records every connection it is given."""

    def __init__(self, uid: int, *addresses: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.adversarial.as_user", str(uid), "squat", *addresses],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.process.stdout is not None
        self.lines: list[str] = []
        while (line := self.process.stdout.readline().strip()) != "ready":
            assert line, f"the squatter died: {self.process.wait(10)}"
            self.lines.append(line)

    def finish(self) -> list[str]:
        """Everything it reported (bound, refused, connection ...) once it has stopped."""
        out, _ = self.process.communicate("", timeout=120)
        return self.lines + out.split()


def _audit(broker: BrokerProcess, filename: str, nth: int) -> dict[str, object]:
    """The ``nth`` audit line of a job on ``filename`` (waiting for it a while)."""
    path = broker.spool / "audit.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        mine = [doc for doc in lines if doc.get("filename") == filename]
        if len(mine) >= nth:
            return mine[nth - 1]
        time.sleep(0.1)
    raise AssertionError(f"no audit line {nth} for {filename}")


def test_a_squatter_cannot_take_the_other_loopback_family_of_a_running_broker(
        local_broker: BrokerProcess) -> None:
    port = local_broker.address.rsplit(":", 1)[1]
    squatter = Squatter(NOBODY, f"tcp:[::1]:{port}", f"tcp:127.0.0.1:{port}")
    said = squatter.finish()
    assert f"refused tcp:[::1]:{port} 98" in " ".join(said), said  # EADDRINUSE: the broker's
    assert f"refused tcp:127.0.0.1:{port} 98" in " ".join(said), said


def test_a_client_dialling_localhost_never_reaches_a_squatter_on_ipv6_loopback(
        tmp_path: Path) -> None:
    # The broker of this port is down; another user holds [::1] of it. The client must dial
    # 127.0.0.1 (nobody there: unavailable), never the squatter.
    port = free_port()
    squatter = Squatter(NOBODY, f"tcp:[::1]:{port}")
    done = run_cli("pool", "status", server=f"localhost:{port}", timeout=240)
    said = squatter.finish()
    assert f"bound tcp:[::1]:{port}" in " ".join(said), said
    assert "connection" not in said, said
    assert done.returncode == 3, done.stderr


@pytest.mark.parametrize("where", ["own-directory", "sticky-tmp"])
def test_a_socket_planted_by_another_user_is_refused_by_the_client(
        where: str, shared_dir: Path, tmp_path: Path) -> None:
    if where == "own-directory":  # a directory of the attacker's, e.g. made before the broker
        directory = shared_dir / f"planted-{os.getpid()}"
        directory.mkdir(mode=0o755)
        os.chown(directory, NOBODY, NOBODY)
    else:  # a world-writable (sticky) directory such as /tmp itself
        directory = Path(tempfile.gettempdir())
    path = directory / f"airlock-planted-{os.getpid()}.sock"
    squatter = Squatter(NOBODY, f"unix:{path}", f"unix:{path}.id")
    artifact = tmp_path / "model.pkl"
    artifact.write_bytes(NOT_A_MODEL)
    try:
        with pytest.raises(ServiceUnavailable) as refused, \
                Client(f"unix:{path}", retry_attempts=1) as client:
            client.convert(artifact, tmp_path / "out.onnx")
        status = run_cli("pool", "status", server=f"unix:{path}", timeout=240)
    finally:
        said = squatter.finish()
        path.unlink(missing_ok=True)
        Path(f"{path}.id").unlink(missing_ok=True)
    assert "connection" not in said, said  # not one connection: nothing was sent
    reason = "owned by uid 65534" if where == "own-directory" else "writable by others"
    assert refused.value.reason == "UNTRUSTED_SOCKET" and reason in refused.value.message
    assert status.returncode == 3, status.stderr
    assert "refusing the broker socket" in status.stderr and reason in status.stderr


def test_the_default_address_is_the_brokers_socket_not_a_tcp_port(
        local_broker: BrokerProcess, shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert local_broker.socket is not None
    monkeypatch.delenv("AIRLOCK_SERVER", raising=False)
    monkeypatch.setenv("AIRLOCK_SOCKET", str(local_broker.socket))
    with Client(retry_attempts=1) as client:
        assert client.address == local_broker.unix_address
        client.pool_status()  # root on the socket: the admin role
    # The broker is down (its directory stays, its socket is gone): no fallback to TCP.
    gone = shared_dir / "stopped-broker"
    gone.mkdir(exist_ok=True)
    monkeypatch.setenv("AIRLOCK_SOCKET", str(gone / "broker.sock"))
    with Client(retry_attempts=1) as client, pytest.raises(ServiceUnavailable) as down:
        client.pool_status()
    assert f"unix:{gone / 'broker.sock'}" in down.value.message, down.value.message


def test_a_unix_callers_principal_is_its_uid_in_the_audit_log(
        local_broker: BrokerProcess, shared_dir: Path) -> None:
    artifact = shared_dir / f"not-a-model-{os.getpid()}.bin"
    artifact.write_bytes(NOT_A_MODEL)
    artifact.chmod(0o644)
    out = shared_dir / "nobody-out"
    out.mkdir(exist_ok=True)
    os.chown(out, NOBODY, NOBODY)
    done = as_user(NOBODY, "convert", str(artifact), "-o", str(out / "m.onnx"), "--json",
                   env={"AIRLOCK_SERVER": local_broker.unix_address})
    assert json.loads(done.stdout)["status"] == "rejected", (done.stdout, done.stderr)
    line = _audit(local_broker, artifact.name, 1)
    assert (line["principal"], line["auth"]) == ("uid:65534", "peercred"), line
    assert line["peer"] == "unix:"
    # The same file over TCP, without [auth]: the shared "anonymous", as before.
    with Client(local_broker.address, retry_attempts=1) as client, \
            pytest.raises(ConversionError):
        client.convert(artifact, shared_dir / "t.onnx")
    line = _audit(local_broker, artifact.name, 2)
    assert (line["principal"], line["auth"]) == ("anonymous", "none"), line


def test_a_local_users_output_is_written_into_their_file_as_them(
        local_broker: BrokerProcess, shared_dir: Path) -> None:
    """The broker writes a same-host caller's output with the caller's claim on the disk
    (security/caller_disk.py), and copies it from its own 0700 directories all the same."""
    source, check = models.make_state_dict(shared_dir / f"state-{os.getpid()}")
    source.parent.chmod(0o755)
    source.chmod(0o644)
    out = shared_dir / "nobody-out"
    out.mkdir(exist_ok=True)
    os.chown(out, NOBODY, NOBODY)
    target = out / f"state-{os.getpid()}.safetensors"
    done = as_user(NOBODY, "convert", str(source), "-o", str(target), "--json",
                   env={"AIRLOCK_SERVER": local_broker.unix_address})
    assert done.returncode == 0, (done.stdout, done.stderr)
    result = json.loads(done.stdout)
    assert (result["status"], result["transfer"]) == ("ok", "local"), result
    assert _audit(local_broker, source.name, 1)["principal"] == "uid:65534"
    tensors = safetensors.numpy.load_file(target)
    assert check.expected is not None and tensors.keys() == check.expected.keys()
    for name, value in check.expected.items():
        np.testing.assert_array_equal(tensors[name], value)


def test_a_local_user_cannot_drain_the_pools_without_the_admin_role(
        local_broker: BrokerProcess) -> None:
    with Client(local_broker.unix_address, retry_attempts=1) as root:
        def draining() -> bool:
            return any(p.draining for p in root.pool_status())

        on_socket = as_user(NOBODY, "pool", "drain", "--server", local_broker.unix_address)
        assert on_socket.returncode == 4, (on_socket.stdout, on_socket.stderr)
        assert "PERMISSION_DENIED" in on_socket.stderr and "uid:65534" in on_socket.stderr
        on_port = as_user(NOBODY, "pool", "drain", "--server", local_broker.address)
        assert on_port.returncode == 4, (on_port.stdout, on_port.stderr)
        assert "anonymous" in on_port.stderr and "anonymous_admin" in on_port.stderr
        assert not draining()
        root.drain_pools()  # root on the socket holds the role: the operator's way in
        assert draining()
        root.resume_pools()
        assert not draining()

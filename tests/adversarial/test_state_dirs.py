"""Threat: a local user prepares the broker's state directories before a root broker starts
(issue 11 §1). /tmp is emptied at boot, so under the old default (``$TMPDIR/airlock-spool``)
anyone could create the spool first, with ``audit.jsonl -> /etc/ld.so.preload``, a ``slots``
that links to a directory of root's, or a stale slot whose ``out`` links to a mount point the
broker's start-up reap would unmount.

Proved contained: the broker refuses a state root or spool directory that is not its own
(another owner, group/other bits, a link) and says which path and why (reason code, exit 4);
inside its own root it follows no link (a planted ``out`` link is never unmounted, a planted
result link is removed, not followed). In every case a root-owned canary elsewhere is
byte-identical with the same mtime afterwards. "Another user" is uid 65534 (nobody).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airlock_broker.security.state_dirs import SPOOL_DIRS
from airlock_client import Client
from tests.adversarial import payloads
from tests.conftest import BROKER, IMAGE, NO_SHUTDOWN_DRAIN, free_port

NOBODY = 65534
EXIT_UNSAFE_STATE = 4
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
CONFIG = f"""
[broker]
selftest_on_start = false
{NO_SHUTDOWN_DRAIN}
[sandbox]
image = {IMAGE!r}
[pools]
min_warm = 0
"""


@dataclass
class Outcome:
    """What ``airlock-broker serve`` did on a prepared state root."""

    code: int | None
    served: bool
    log: str


def _serve(tmp: Path, root: Path, *, convert: bool = False) -> Outcome:
    """Start ``airlock-broker serve`` on ``root``; wait until it exits or serves. If it serves,
    run one conversion (when ``convert``: every planted path gets its chance), then SIGTERM
    it."""
    config = tmp / "broker.toml"
    config.write_text(CONFIG)
    port = free_port()
    log = tmp / "serve.log"
    env = {**os.environ, "AIRLOCK_STATE_DIR": str(root), "AIRLOCK_SOCKET": "none"}
    with log.open("wb") as fh:
        process = subprocess.Popen([*BROKER, "serve", "--listen", f"127.0.0.1:{port}",
                                    "--config", str(config)], stdout=fh,
                                   stderr=subprocess.STDOUT, env=env)
    served = False
    try:
        served = _wait_serving_or_exit(f"127.0.0.1:{port}", process, timeout=120)
        if served and convert:
            artifact = payloads.fake_success_pickle(tmp / " x.so .pkl")
            with Client(f"127.0.0.1:{port}", retry_attempts=1) as client, \
                    contextlib.suppress(Exception):
                client.convert(artifact, tmp / "out.safetensors")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    return Outcome(code=process.returncode, served=served, log=log.read_text(errors="replace"))


def _wait_serving_or_exit(address: str, process: subprocess.Popen[bytes],
                          timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            time.sleep(0.2)
    pytest.fail("airlock-broker serve neither refused nor served in time")


def _snapshot(path: Path) -> tuple[object, ...]:
    st = os.lstat(path)
    body: object = (path.read_bytes() if stat.S_ISREG(st.st_mode)
                    else sorted(p.name for p in path.iterdir()))
    return body, st.st_mtime_ns, stat.S_IMODE(st.st_mode), st.st_uid


def _canary(tmp: Path) -> Path:
    """A root-owned file outside the state root: what a planted link would point at."""
    canary = tmp / "etc" / "ld.so.preload"
    canary.parent.mkdir(mode=0o755)
    canary.write_bytes(b"# root's file: must never change\n")
    canary.chmod(0o644)
    return canary


def _own_root(tmp: Path) -> Path:
    root = tmp / "state"
    root.mkdir(mode=0o700)
    return root


def _assert_refused(outcome: Outcome, path: Path, code: str) -> None:
    assert outcome.code == EXIT_UNSAFE_STATE and not outcome.served, \
        f"the broker did not refuse (exit {outcome.code}, served={outcome.served}):\n" \
        f"{outcome.log[-2000:]}"
    assert code in outcome.log and str(path) in outcome.log, outcome.log[-2000:]


def test_a_state_root_another_user_created_first_is_refused(tmp_path: Path) -> None:
    canary = _canary(tmp_path)
    before = _snapshot(canary)
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    (root / "audit.jsonl").symlink_to(canary)
    os.chown(root / "audit.jsonl", NOBODY, NOBODY, follow_symlinks=False)
    os.chown(root, NOBODY, NOBODY)
    outcome = _serve(tmp_path, root, convert=True)
    assert _snapshot(canary) == before, "the broker wrote through the attacker's link"
    _assert_refused(outcome, root, "STATE_PATH_WRONG_OWNER")
    assert "refusing to start" in outcome.log and "chown" in outcome.log


@pytest.mark.parametrize("sub", SPOOL_DIRS)
@pytest.mark.parametrize("planted", ["attacker-owned", "group-and-other-bits"])
def test_a_spool_directory_not_the_brokers_alone_is_refused(tmp_path: Path, sub: str,
                                                             planted: str) -> None:
    canary = _canary(tmp_path)
    before = _snapshot(canary)
    root = _own_root(tmp_path)
    bad = root / sub
    if planted == "attacker-owned":
        bad.mkdir(mode=0o700)
        os.chown(bad, NOBODY, NOBODY)
        code = "STATE_PATH_WRONG_OWNER"
    else:
        bad.mkdir()
        bad.chmod(0o775)
        code = "STATE_PATH_OPEN_MODE"
    outcome = _serve(tmp_path, root)
    _assert_refused(outcome, bad, code)
    assert _snapshot(canary) == before


def test_a_symlinked_audit_log_is_refused_and_never_written(tmp_path: Path) -> None:
    canary = _canary(tmp_path)
    before = _snapshot(canary)
    root = _own_root(tmp_path)
    (root / "audit.jsonl").symlink_to(canary)
    outcome = _serve(tmp_path, root, convert=True)
    assert _snapshot(canary) == before, "the audit record went through the planted link"
    _assert_refused(outcome, root / "audit.jsonl", "STATE_PATH_IS_SYMLINK")


def test_a_symlinked_slots_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "srv"  # root's directory, 0755, with a file in it
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)
    (elsewhere / "data").write_bytes(b"root's data\n")
    before = _snapshot(elsewhere), _snapshot(elsewhere / "data")
    root = _own_root(tmp_path)
    (root / "slots").symlink_to(elsewhere)
    outcome = _serve(tmp_path, root, convert=True)
    assert (_snapshot(elsewhere), _snapshot(elsewhere / "data")) == before, \
        "the broker changed a directory outside its state root through the slots link"
    _assert_refused(outcome, root / "slots", "STATE_PATH_IS_SYMLINK")


@pytest.fixture
def mounted_canary(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A mount point outside the state root (standing in for /home), with a file in it."""
    point = tmp_path / "home"
    point.mkdir(mode=0o755)
    if _libc.mount(b"tmpfs", os.fsencode(point), b"tmpfs", 0, b"size=1m,mode=0755") != 0:
        pytest.fail(f"cannot mount the canary tmpfs: {os.strerror(ctypes.get_errno())}")
    (point / "user-file").write_bytes(b"a user's file\n")
    try:
        yield point
    finally:
        while _is_mounted(point):
            _libc.umount2(os.fsencode(point), 2)


def _is_mounted(point: Path) -> bool:
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == str(point) for line in fh)


def test_a_stale_slot_whose_out_links_to_a_mount_is_never_unmounted(
        tmp_path: Path, mounted_canary: Path) -> None:
    before = _snapshot(mounted_canary / "user-file")
    root = _own_root(tmp_path)
    (root / "slots").mkdir(mode=0o700)
    stale = root / "slots" / "0123abcd"
    stale.mkdir(mode=0o700)
    (stale / "out").symlink_to(mounted_canary)
    (root / "slots" / "linked-slot").symlink_to(mounted_canary)
    outcome = _serve(tmp_path, root)
    assert _is_mounted(mounted_canary), "the broker's start-up reap unmounted a mount point " \
                                        "outside its slots through a planted link"
    assert _snapshot(mounted_canary / "user-file") == before
    assert outcome.served and outcome.code == 0, outcome.log[-2000:]
    assert list((root / "slots").iterdir()) == [], "the stale entries should be gone"


@pytest.mark.parametrize("sub", ["results", "images"])
def test_a_planted_result_or_image_link_is_removed_not_followed(tmp_path: Path,
                                                                sub: str) -> None:
    canary = _canary(tmp_path)
    before = _snapshot(canary)
    root = _own_root(tmp_path)
    (root / sub).mkdir(mode=0o700)
    (root / sub / "job-1").symlink_to(canary)
    os.link(canary, root / sub / "job-2")
    outcome = _serve(tmp_path, root, convert=True)
    assert outcome.served and outcome.code == 0, outcome.log[-2000:]
    assert _snapshot(canary) == before
    assert list((root / sub).iterdir()) == []

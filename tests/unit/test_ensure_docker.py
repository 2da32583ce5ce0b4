"""scripts/ensure-docker.sh takes only a root dockerd for the engine.

Found by review: it took any live process named ``dockerd`` (or whatever a stale pid file
named) for a running engine, so any local user could keep root from ever starting the real
one after it stopped: every broker on the host down. The tests run the script's own
functions (sourced, it defines them and runs nothing) against such a process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ensure-docker.sh"


def _sourced(snippet: str) -> subprocess.CompletedProcess[str]:
    """``snippet`` run by bash with the script's functions defined (and ``set -e`` off)."""
    return subprocess.run(["bash", "-c", f'source "$1"; set +e; {snippet}', "bash", str(SCRIPT)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def impostor() -> Iterator[Path]:
    """A copy of ``sleep`` named ``dockerd``, where any user may run it."""
    where = Path(tempfile.mkdtemp(prefix="airlock-impostor."))
    try:
        os.chmod(where, 0o755)
        shutil.copy("/bin/sleep", where / "dockerd")
        os.chmod(where / "dockerd", 0o755)
        yield where / "dockerd"
    finally:
        shutil.rmtree(where)


def _running(argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "dockerd":
        assert time.monotonic() < deadline, "the impostor never ran"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("whose", ["nobody", "root"])
def test_a_process_named_dockerd_is_not_the_engine(impostor: Path, whose: str) -> None:
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if whose == "nobody" \
        else []
    proc = _running([*user, str(impostor), "120"])
    try:
        said = _sourced(f'live_pid {proc.pid}; echo "alive=$?"; '
                        f'is_engine {proc.pid} "$(find_dockerd)"; echo "engine=$?"; '
                        f'pgrep -x dockerd | grep -qx {proc.pid}; echo "named=$?"')
        # What the script trusted before (a live process of that name), and what it trusts now.
        assert said.stdout.split() == ["alive=0", "engine=1", "named=0"], said
    finally:
        proc.kill()
        proc.wait(30)


def test_the_running_engine_is_the_engine() -> None:
    pid = Path("/var/run/docker.pid").read_text().strip()  # the suite needs the engine
    said = _sourced(f'is_engine {pid} "$(find_dockerd)"; echo "engine=$?"; '
                    'echo "pid=$(engine_pid "$(find_dockerd)")"')
    assert said.stdout.split() == ["engine=0", f"pid={pid}"], said


def test_the_debian_archive_keyring_is_ensured_like_debootstrap() -> None:
    """The base image's debootstrap checks the archive against this keyring and refuses to go
    on without it (sandbox/image/base-rootfs.sh): the script installs it as root, and says
    what to install otherwise (before: only debootstrap was ensured)."""
    missing = "DEBIAN_KEYRING=/nonexistent/debian-archive-keyring.gpg; "
    as_user = _sourced(missing + 'is_root() { return 1; }; ensure_debootstrap; echo "rc=$?"')
    assert as_user.returncode == 1 and "rc=" not in as_user.stdout, as_user
    assert "apt-get install debian-archive-keyring" in as_user.stderr, as_user
    as_root = _sourced(missing + 'is_root() { return 0; }; apt_install() { echo "install $*"; }; '
                       'ensure_debootstrap')
    assert as_root.stdout.splitlines() == ["install debian-archive-keyring"], as_root
    assert as_root.returncode == 1 and "keyring" in as_root.stderr, as_root  # still missing
    present = _sourced('is_root() { return 1; }; ensure_debootstrap; echo "rc=$?"')
    assert present.stdout.split() == ["rc=0"], present  # this host has both

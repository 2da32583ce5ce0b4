"""A long command's work directory (``_run_dir``): a run killed by SIGKILL leaves it behind,
and the next run removes it; a live run's directory, another user's, a link, or a directory
of the right name that this module did not make are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from airlock_client import _run_dir
from airlock_client._run_dir import LOCK_NAME, RUN, run_directory, sweep

PREFIX = "airlock-test-"

#: A run that writes a file into its work directory, says where, and waits to be killed.
_RUN = textwrap.dedent("""
    import sys, tempfile, time
    from airlock_client._run_dir import run_directory
    with run_directory(sys.argv[1]) as (path, _):
        with tempfile.NamedTemporaryFile(delete=False) as fh:  # where tempfile puts it
            fh.write(b"x" * 4096)
        print(path, flush=True)
        time.sleep(600)
""")


def _start_run(tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    run = subprocess.Popen([sys.executable, "-c", _RUN, PREFIX], stdout=subprocess.PIPE,
                           text=True, env={**os.environ, "TMPDIR": str(tmp)})
    assert run.stdout is not None
    line = run.stdout.readline().strip()  # blocks until the run is inside its directory
    assert line, f"the run ended first (exit {run.wait()})"
    return run, Path(line)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    path = tmp_path / "tmp"
    path.mkdir(mode=0o700)
    return path


def test_a_killed_runs_directory_is_removed_by_the_next_run_and_a_live_ones_is_not(
        tmp: Path) -> None:
    killed, dead_dir = _start_run(tmp)
    live, live_dir = _start_run(tmp)
    try:
        assert dead_dir.parent == tmp and dead_dir.name.startswith(PREFIX + RUN)
        assert len(list(dead_dir.iterdir())) == 2  # the lock and the run's temporary file
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert dead_dir.is_dir()  # nothing removed it: that is the leak

        swept = sweep(tmp, PREFIX)

        assert not dead_dir.exists()
        assert swept.directories == 1 and swept.bytes == 4096
        assert live_dir.is_dir() and live.poll() is None
    finally:
        live.kill()
        live.wait()


def test_a_run_uses_its_directory_for_temporary_files_and_removes_it_at_the_end(
        tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with run_directory(PREFIX) as (path, swept):
        assert tempfile.gettempdir() == str(path)
        assert (path.stat().st_mode & 0o777) == 0o700
        assert swept.directories == 0
        with tempfile.TemporaryDirectory() as inner:
            assert Path(inner).parent == path
        assert sweep(tmp, PREFIX).directories == 0  # its own: locked
        assert path.is_dir()
    assert tempfile.gettempdir() == str(tmp)
    assert list(tmp.iterdir()) == []


def test_the_directory_is_removed_when_the_run_fails(
        tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with pytest.raises(RuntimeError), run_directory(PREFIX):
        raise RuntimeError("the run failed")
    assert list(tmp.iterdir()) == [] and tempfile.gettempdir() == str(tmp)


def _dead_run_dir(tmp: Path, name: str) -> Path:
    """What a killed run leaves: the directory, its free lock, a file."""
    path = tmp / (PREFIX + RUN + name)
    path.mkdir(mode=0o700)
    (path / LOCK_NAME).touch(mode=0o600)
    (path / "model.pkl").write_bytes(b"m" * 100)
    return path


def test_a_link_with_a_run_directorys_name_is_not_followed(tmp: Path,
                                                            tmp_path: Path) -> None:
    elsewhere = _dead_run_dir(tmp_path, "target")  # free lock, right mode, under another name
    link = tmp / (PREFIX + RUN + "link")
    link.symlink_to(elsewhere)

    assert sweep(tmp, PREFIX).directories == 0
    assert (elsewhere / "model.pkl").exists() and link.is_symlink()


def test_links_inside_a_dead_runs_directory_are_removed_not_followed(tmp: Path,
                                                                     tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("x")
    dead = _dead_run_dir(tmp, "dead")
    (dead / "to-keep").symlink_to(keep)

    assert sweep(tmp, PREFIX).directories == 1
    assert not dead.exists() and (keep / "precious").exists()


@pytest.mark.parametrize("change", ["mode", "no-lock", "lock-link", "lock-mode"])
def test_a_directory_this_module_did_not_make_is_left(tmp: Path, tmp_path: Path,
                                                      change: str) -> None:
    path = _dead_run_dir(tmp, change)
    lock = path / LOCK_NAME
    if change == "mode":
        path.chmod(0o755)
    elif change == "no-lock":
        lock.unlink()
    elif change == "lock-link":
        target = tmp_path / "other-lock"
        target.touch(mode=0o600)
        lock.unlink()
        lock.symlink_to(target)
    else:
        lock.chmod(0o644)

    assert sweep(tmp, PREFIX).directories == 0
    assert (path / "model.pkl").exists()


def test_another_users_directory_is_left(tmp: Path) -> None:
    path = _dead_run_dir(tmp, "theirs")
    os.chown(path, os.geteuid() + 1000, -1)  # the suite runs as root (make test)
    assert sweep(tmp, PREFIX).directories == 0
    assert (path / "model.pkl").exists()


def test_a_staging_directory_is_not_swept(tmp: Path) -> None:
    """Locked only after it is made, a run's directory is swept only under its final name."""
    staging = tmp / (PREFIX + _run_dir.STAGING + "abc")
    staging.mkdir(mode=0o700)
    (staging / LOCK_NAME).touch(mode=0o600)
    assert sweep(tmp, PREFIX).directories == 0 and staging.exists()


def test_a_missing_temporary_directory_sweeps_nothing(tmp_path: Path) -> None:
    assert sweep(tmp_path / "absent", PREFIX) == _run_dir.Swept()

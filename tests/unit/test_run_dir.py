"""A command's work directory (``_run_dir``): everything ``tempfile`` makes during the command
goes in it, it is removed when the command ends, and one that a command killed by SIGKILL
left is removed by the next command, while a live command's stays. What counts as left over
(links, other names, recent ones) is ``_part_files``' rule, tested in test_part_files.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from airlock_client._part_files import STALE_SECONDS
from airlock_client._run_dir import run_directory
from tests.unit.shared_tmp import plant, remove

#: A command that writes a file into its work directory, says where, and waits to be killed.
_COMMAND = textwrap.dedent("""
    import tempfile, time
    from airlock_client._run_dir import run_directory
    with run_directory() as (path, _):
        with tempfile.NamedTemporaryFile(delete=False) as fh:  # where tempfile puts it
            fh.write(b"x" * 4096)
        print(path, flush=True)
        time.sleep(600)
""")


def _start(tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    command = subprocess.Popen([sys.executable, "-c", _COMMAND], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "TMPDIR": str(tmp)})
    assert command.stdout is not None
    line = command.stdout.readline().strip()  # blocks until it is inside its directory
    assert line, f"the command ended first (exit {command.wait()})"
    return command, Path(line)


def _age(path: Path) -> None:
    """As if the command had last touched its directory more than a minute ago."""
    past = time.time() - STALE_SECONDS - 60
    os.utime(path, (past, past))


@pytest.fixture
def tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "tmp"
    path.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def test_a_killed_commands_directory_is_removed_by_the_next_and_a_live_ones_is_not(
        tmp: Path) -> None:
    killed, dead = _start(tmp)
    live, alive = _start(tmp)
    try:
        assert dead.parent == tmp and len(list(dead.iterdir())) == 1  # the command's file
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert dead.is_dir()  # nothing of its own removed it
        _age(dead)
        _age(alive)

        with run_directory() as (path, removed):
            assert removed == [dead.name]
            assert not dead.exists()
            assert alive.is_dir() and live.poll() is None
        assert not path.exists()
    finally:
        live.kill()
        live.wait()


def test_a_command_puts_its_temporary_files_in_its_directory_and_removes_it(
        tmp: Path) -> None:
    with run_directory() as (path, removed):
        assert removed == [] and path.parent == tmp
        assert tempfile.gettempdir() == str(path)
        assert (path.stat().st_mode & 0o777) == 0o700
        with tempfile.TemporaryDirectory() as inner:
            assert Path(inner).parent == path
        _age(path)
        with run_directory() as (_, removed_meanwhile):  # its own: locked, never taken
            assert removed_meanwhile == []
        assert path.is_dir() and tempfile.gettempdir() == str(path)
    assert tempfile.gettempdir() == str(tmp)
    assert list(tmp.iterdir()) == []


def test_the_directory_is_removed_when_the_command_fails(tmp: Path) -> None:
    with pytest.raises(RuntimeError), run_directory():
        raise RuntimeError("the command failed")
    assert list(tmp.iterdir()) == [] and tempfile.gettempdir() == str(tmp)


def _left_by_a_killed_command(tmp: Path) -> Path:
    killed, dead = _start(tmp)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    _age(dead)
    return dead


def test_the_cli_sweeps_and_uses_a_work_directory_for_commands_that_download(
        tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from airlock_client import cli

    dead = _left_by_a_killed_command(tmp)
    seen: list[str] = []
    real = cli._dispatch

    def dispatch(args: object) -> int:
        seen.append(tempfile.gettempdir())
        return real(args)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "_dispatch", dispatch)
        code = cli.main(["convert", str(tmp / "absent.pkl"), "--public-key", str(tmp / "k")])

    assert code == 2  # not readable: a usage error, after the sweep
    assert not dead.exists() and list(tmp.iterdir()) == []
    assert len(seen) == 1 and Path(seen[0]).parent == tmp
    err = capsys.readouterr().err
    assert f"airlock: removed 1 work directory that killed commands left in {tmp}" in err


def test_what_another_user_left_in_tmp_under_our_name_neither_goes_nor_breaks_the_command(
        tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory named like a work directory, made by another user in a shared ``$TMPDIR``
    (open to all, too deep for ``rmtree``): ``airlock convert`` went into it and ended in a
    RecursionError traceback, for every user of the machine."""
    from airlock_client import cli

    planted = tmp / ".airlock-run.abcd1234.airlock-part"
    plant(planted)
    try:
        code = cli.main(["convert", str(tmp / "absent.pkl"), "--public-key", str(tmp / "k")])
        assert code == 2  # not readable: the usage error the command gives without the plant
        assert (planted / "d").is_dir() and list(tmp.iterdir()) == [planted]
        assert "removed" not in capsys.readouterr().err
    finally:
        remove(planted)

def test_a_ctrl_c_while_the_work_directory_is_removed_is_one_line(
        tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from airlock_client import _part_files, cli

    def pressed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", lambda args: 0)
    monkeypatch.setattr(_part_files, "_empty", pressed)
    assert cli.main(["convert", "x.pkl", "--json"]) == 130
    out, err = capsys.readouterr()
    assert out == ""  # the command's own JSON object is all that stdout may hold
    assert err.strip() == ("airlock convert: interrupted while its work directory was removed "
                           "(the next command removes what is left)")


def test_a_library_scratch_directory_a_killed_process_left_goes_with_the_next(
        tmp: Path) -> None:
    """A serving job killed by the OOM killer while it downloaded a source (``safe_load``)
    or bundled a directory (``Client.convert``)."""
    from airlock_client._run_dir import scratch_dir

    code = ("import sys, time\nfrom airlock_client._run_dir import scratch_dir\n"
            "with scratch_dir('airlock-source') as p:\n"
            "    (p / 'model.pkl').write_bytes(b'm' * 1024)\n"
            "    print(p, flush=True)\n    time.sleep(600)\n")
    killed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(tmp)})
    assert killed.stdout is not None
    dead = Path(killed.stdout.readline().strip())
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (dead / "model.pkl").exists()
    _age(dead)

    with scratch_dir("airlock-source") as path:
        assert not dead.exists() and path.parent == tmp
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("mode", [0o2775, 0o777])
def test_a_tmpdir_where_others_can_name_entries_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        mode: int) -> None:
    """Found by the review of the sweep fix: with ``TMPDIR`` a team's ``2775``, a member
    renamed the work directory away and put a link to a directory of theirs at its name, and
    the command's downloads and bundles were made in theirs (``tempfile`` goes by the
    name). Refused before anything is made there."""
    from airlock_client import cli
    from airlock_client._run_dir import UnsafeTempDir, scratch_dir
    from tests.unit.shared_tmp import STRANGER

    team = tmp_path / "team"
    team.mkdir()
    os.chown(team, -1, STRANGER)
    os.chmod(team, mode)
    monkeypatch.setattr(tempfile, "tempdir", str(team))
    with pytest.raises(UnsafeTempDir, match="can be written by other users"), \
            scratch_dir("airlock-bundle"):
        pass
    monkeypatch.setattr(cli, "_dispatch", lambda args: 0)
    assert cli.main(["convert", "x.pkl", "--json"]) == 2
    out, err = capsys.readouterr()
    assert "UNSAFE_TMPDIR" in err and "set TMPDIR" in err
    assert json.loads(out)["reason"] == "UNSAFE_TMPDIR"  # the one --json object
    assert list(team.iterdir()) == []

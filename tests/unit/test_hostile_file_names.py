"""A file name is someone else's text once a glob picks it (``airlock convert models/*`` over a
directory that came from elsewhere): a command line that cannot run names the file, and the
terminal must see its control characters escaped. ``--json`` keeps the name as it is (JSON
escapes it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from airlock_client import cli
from airlock_client._cli_exits import interrupted, usage_error

#: Sets the terminal's title, clears the screen, and reverses the rest of the line.
EVIL = "x\x1b]2;pwned\x07\x1b[2J\u202elpk.pkl"


@pytest.mark.parametrize("argv", [
    ["convert", EVIL],             # one input that does not exist
    ["convert", EVIL, "ok.pkl"],   # several: each must be a file
], ids=["one-input", "several-inputs"])
def test_a_usage_error_shows_a_file_name_escaped(
        argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.pkl").write_bytes(b"not read")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("airlock convert: error: "), err
    assert err.rstrip("\n").isprintable(), repr(err)
    assert "x\\x1b]2;pwned\\x07\\x1b[2J\\u202elpk.pkl" in err, err


def test_an_argument_the_parser_refuses_is_shown_escaped(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A glob's file name that starts with a dash reads as an option; argparse quotes it."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["convert", "a.pkl", f"-{EVIL}"])
    assert exited.value.code == 2
    said = capsys.readouterr().err.rstrip("\n").splitlines()[-1]  # after the usage lines
    assert "unrecognized arguments" in said and said.isprintable(), repr(said)


@pytest.mark.parametrize("say", [usage_error, interrupted])
def test_every_commands_one_line_is_escaped(
        say: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever command and message: the line on stderr is printable."""
    say("migrate", f"version 3 of {EVIL}")
    assert capsys.readouterr().err.rstrip("\n").isprintable()


def test_json_keeps_the_name_and_stays_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["convert", EVIL, "--json"]) == 2
    out, err = capsys.readouterr()
    assert err.rstrip("\n").isprintable(), repr(err)
    assert out.count("\n") == 1 and out.rstrip("\n").isprintable(), repr(out)
    document = json.loads(out)
    assert document["reason"] == "USAGE" and EVIL in document["message"], document

"""Where ``airlock convert`` puts an output, checked before anything is sent.

Found by review (each test failed on the code before):
- outputs were compared by the path as typed, so ``m.pkl`` and ``$PWD/m.onnx`` converted
  ``m.pkl`` over the input ``m.onnx``, exit 0;
- an output named after its input replaced a file of the user's (a hand-exported
  ``m.onnx``) without a word, and ``--overwrite`` was refused for files;
- ``-o`` naming a directory was a traceback, and the conversion was thrown away;
- the temporary name was fixed (``.NAME.airlock-out``): two runs on one input took each
  other's output and reported their own.
The broker is never reached here (``--server 127.0.0.1:9``): each refusal is a usage error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from airlock_client import _converted_file
from airlock_client.cli import main

NOWHERE = ["--server", "127.0.0.1:9", "--json"]


def _usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["convert", *argv, *NOWHERE]) == 2
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert (doc["status"], doc["reason"]) == ("usage", "USAGE") and "Traceback" not in out.err
    return str(doc["message"])


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.pkl").write_bytes(b"never sent")
    return tmp_path


def test_an_output_that_would_replace_another_input_is_refused(
        here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (here / "m.onnx").write_bytes(b"MINE")
    (here / "m.joblib").write_bytes(b"never sent")
    message = _usage(["m.pkl", str(here / "m.onnx")], capsys)
    assert "which is the input" in message
    message = _usage(["m.pkl", str(here / "m.joblib")], capsys)  # one name, spelt two ways
    assert "would both be written as" in message
    assert (here / "m.onnx").read_bytes() == b"MINE"


def test_an_input_given_twice_is_refused_by_real_path(
        here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (here / "x").mkdir()
    (here / "x" / "m.pkl").write_bytes(b"never sent")
    os.symlink("x/m.pkl", here / "link.pkl")
    for twice in (["x/m.pkl", "x/../x/m.pkl"], ["x/m.pkl", str(here / "link.pkl")]):
        assert "are the same file: give it once" in _usage(twice, capsys)
    assert _converted_file.placement_problem(
        [("x/m.pkl", Path("x/m.pkl")), ("link.pkl", Path("out/link.pkl"))],
        overwrite=False) == "x/m.pkl and link.pkl are the same file: give it once"


@pytest.mark.parametrize("several", [False, True])
def test_a_file_of_the_users_at_the_output_name_is_kept_unless_overwrite(
        here: Path, capsys: pytest.CaptureFixture[str], several: bool) -> None:
    (here / "m.onnx").write_bytes(b"HAND-EXPORTED")
    inputs = ["m.pkl", *(["n.pkl"] if several else [])]
    (here / "n.pkl").write_bytes(b"never sent")
    message = _usage(inputs, capsys)
    assert "m.onnx exists and is not an earlier conversion's output" in message
    assert "--overwrite" in message and (here / "m.onnx").read_bytes() == b"HAND-EXPORTED"
    # An earlier conversion's output (its record beside it) is replaced as before, and
    # --overwrite replaces the user's: both get as far as the broker (not there: exit 3).
    for extra, setup in (([], lambda: (here / "m.onnx.provenance.json").write_text("{}")),
                         (["--overwrite"], lambda: (here / "m.onnx.provenance.json").unlink())):
        setup()
        assert main(["convert", *inputs, *extra, *NOWHERE]) == 3
        capsys.readouterr()
    assert (here / "m.onnx").read_bytes() == b"HAND-EXPORTED"  # the broker never answered


def test_o_naming_a_directory_is_a_usage_error_for_one_file(
        here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (here / "converted").mkdir()
    assert "is a directory: name the output file" in _usage(["m.pkl", "-o", "converted"],
                                                             capsys)


def test_each_run_has_a_temporary_name_of_its_own(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = _converted_file.default_output(tmp_path / "m.pt")
    monkeypatch.setattr(_converted_file, "_RUN", "another")  # another process
    second = _converted_file.default_output(tmp_path / "m.pt")
    assert first != second and first.parent == second.parent == tmp_path
    assert first.name.startswith(".m.pt.") and first.name.endswith(".airlock-out")
    assert not first.exists()  # nothing is at the name until a conversion finished
    here = _converted_file.default_output(Path("."))  # an MLflow model converted from inside
    assert here.parent == Path(os.path.abspath(".")).parent

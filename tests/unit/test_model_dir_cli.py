"""``airlock convert DIR`` as a user sees it, with a fake client behind the real
``convert_directory``: the loading policy a directory gets, whether artifact code ran and
each shard's warnings, what ``--json`` prints. No broker is contacted."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import pytest

from airlock_client import (
    AccessDenied,
    Client,
    ConversionReport,
    ServiceUnavailable,
    _convert_dir_cli,
)
from airlock_client.cli import main
from airlock_client.model_dir import (
    DEFAULT_JOBS,
    DIRECTORY_POLICY,
    DirectoryResult,
    ModelDirError,
    convert_directory,
)
from tests.unit.test_hf_model_dir import GOOD, SHARDS, FakeClient, hf_dir

RAN_CODE = "pytorch_model-00002-of-00003.bin"
REPORTS = {
    "pytorch_model-00001-of-00003.bin": ConversionReport(
        warnings=("left out 'optimizer': 4 tensor(s)",)),
    RAN_CODE: ConversionReport(executed_artifact_code=True,
                               warnings=("weights_only load refused; loaded in full",)),
}


class AsClient:
    """What the CLI opens as ``Client(...)``: the real ``convert_directory`` over ``fake``."""

    def __init__(self, fake: FakeClient) -> None:
        self.fake = fake

    def __enter__(self) -> AsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def convert_directory(self, source: Path, output: Path, *, jobs: int | None = None,
                          **kwargs: Any) -> DirectoryResult:
        return convert_directory(self.fake, source, output,  # type: ignore[arg-type]
                                 jobs=jobs or DEFAULT_JOBS, **kwargs)


def _run(monkeypatch: pytest.MonkeyPatch, fake: FakeClient, *argv: str) -> int:
    monkeypatch.setattr(_convert_dir_cli, "Client", lambda *a, **k: AsClient(fake))
    return main(["convert", *argv, "--server", "127.0.0.1:9"])


# -- 1. a directory loads safe_only unless told; code that ran is said, with every warning -----


def test_a_model_directory_is_converted_safe_only_unless_told(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    fake = FakeClient(GOOD)
    assert _run(monkeypatch, fake, str(src), "-o", str(tmp_path / "out")) == 0
    assert fake.policies == ["safe_only"] * 3
    fake = FakeClient(GOOD)
    assert _run(monkeypatch, fake, str(src), "-o", str(tmp_path / "out2"),
                "--policy", "allow_code") == 0
    assert fake.policies == ["allow_code"] * 3
    # From Python too: the same default, in both signatures.
    fake = FakeClient(GOOD)
    convert_directory(fake, src, tmp_path / "out3")  # type: ignore[arg-type]
    assert fake.policies == ["safe_only"] * 3
    policy = inspect.signature(Client.convert_directory).parameters["loading_policy"]
    assert policy.default == DIRECTORY_POLICY == "safe_only"


def test_the_directory_says_which_shards_ran_artifact_code_and_every_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    fake = FakeClient(GOOD, reports=REPORTS)
    assert _run(monkeypatch, fake, str(src), "-o", str(tmp_path / "out"),
                "--policy", "allow_code") == 0
    out = capsys.readouterr().out
    assert f"artifact code executed in sandbox: yes (shards: {RAN_CODE})" in out
    assert ("warning    pytorch_model-00001-of-00003.bin: left out 'optimizer': 4 tensor(s)"
            in out)
    assert f"warning    {RAN_CODE}: weights_only load refused; loaded in full" in out

    fake = FakeClient(GOOD, reports=REPORTS)
    assert _run(monkeypatch, fake, str(src), "-o", str(tmp_path / "out2"),
                "--policy", "allow_code", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["executed_artifact_code"] is True
    assert doc["shards_that_ran_code"] == [RAN_CODE]

    result = convert_directory(FakeClient(GOOD, reports=REPORTS), src,  # type: ignore[arg-type]
                               tmp_path / "out3")
    assert result.executed_artifact_code and result.shards_that_ran_code == (RAN_CODE,)


def test_a_clean_directory_says_no_code_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    assert _run(monkeypatch, FakeClient(GOOD), str(src), "-o", str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "artifact code executed in sandbox: no" in out and "warning" not in out
    assert _run(monkeypatch, FakeClient(GOOD), str(src), "-o", str(tmp_path / "out2"),
                "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["executed_artifact_code"] is False and doc["shards_that_ran_code"] == []


def test_a_config_json_that_was_not_carried_over_is_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    (src / "config.json").write_text('{"a": 1, "a": 2}')  # not strict JSON: skipped
    assert _run(monkeypatch, FakeClient(GOOD), str(src), "-o", str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "skipped    config.json: declared json, but not strict JSON" in out
    assert "config.json was not carried over" in out and "from_pretrained" in out


# -- 2. Ctrl-C is one line and exit 130, not a traceback --------------------------------------


def test_ctrl_c_during_a_directory_is_one_line_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    # Raised in a shard's thread, it reaches the main thread as Ctrl-C does: through the batch.
    fake = FakeClient(GOOD, errors={RAN_CODE: KeyboardInterrupt()})  # type: ignore[dict-item]
    assert _run(monkeypatch, fake, str(src), "-o", str(tmp_path / "out"), "--jobs", "1") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("airlock convert: interrupted: ") and "Traceback" not in err
    assert "no partial output" in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_ctrl_c_during_a_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from airlock_client import _convert_cli

    class Interrupted:
        def __init__(self, *a: object, **k: object) -> None:
            pass

        def __enter__(self) -> Interrupted:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def convert(self, *a: object, **k: object) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(_convert_cli, "Client", Interrupted)
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04")
    assert main(["convert", str(tmp_path / "model.pt"), "--server", "127.0.0.1:9"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("airlock convert: interrupted: "), err


# -- 5. an unreachable broker is the broker's failure, not a shard's ----------------------------


def _unreachable() -> ServiceUnavailable:
    return ServiceUnavailable("failed to connect to all addresses", reason="UNAVAILABLE")


def test_an_unreachable_broker_is_reported_as_the_brokers_not_a_shards(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    fake = FakeClient(GOOD, errors=dict.fromkeys(SHARDS, _unreachable()))
    assert _run(monkeypatch, fake, str(src), "-o", str(tmp_path / "out")) == 3
    err = capsys.readouterr().err
    assert "failed: UNAVAILABLE: failed to connect to all addresses" in err, err
    assert "shard" not in err and "FAILED" not in err, err
    fake = FakeClient(GOOD, errors=dict.fromkeys(SHARDS, _unreachable()))
    assert _run(monkeypatch, fake, str(src), "-o", str(tmp_path / "out"), "--json") == 3
    doc = json.loads(capsys.readouterr().out)
    assert (doc["status"], doc["reason"], doc["shard"]) == ("failed", "UNAVAILABLE", None)
    with pytest.raises(ServiceUnavailable):
        unreachable = FakeClient(GOOD, errors=dict.fromkeys(SHARDS, _unreachable()))
        convert_directory(unreachable, src, tmp_path / "out")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_caller_the_broker_denies_is_not_a_shards_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    denied = AccessDenied("UNAUTHENTICATED", "the token is not known to this broker",
                          kind="denied", code="UNAUTHENTICATED")
    fake = FakeClient(GOOD, errors=dict.fromkeys(SHARDS, denied))
    assert _run(monkeypatch, fake, str(src), "-o", str(tmp_path / "out"), "--json") == 4
    doc = json.loads(capsys.readouterr().out)
    assert (doc["reason"], doc["shard"]) == ("UNAUTHENTICATED", None), doc


def test_a_broker_lost_after_a_shard_was_answered_still_names_the_shard(tmp_path: Path) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    fake = FakeClient(GOOD, errors={RAN_CODE: _unreachable()})
    with pytest.raises(ModelDirError) as caught:
        convert_directory(fake, src, tmp_path / "out", jobs=1)  # type: ignore[arg-type]
    assert (caught.value.reason, caught.value.shard) == ("UNAVAILABLE", RAN_CODE)


# -- 6. --json prints its one object for a usage error too -------------------------------------


@pytest.mark.parametrize("case", ["output exists", "input missing", "file flag on a directory",
                                  "directory flag on a file"])
def test_json_prints_one_object_for_a_usage_error(tmp_path: Path, case: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    argv = {"output exists": [str(src), "-o", str(tmp_path / "taken")],
            "input missing": [str(tmp_path / "nowhere.pt")],
            "file flag on a directory": [str(src), "--to", "onnx"],
            "directory flag on a file": [str(src / "config.json"), "--jobs", "2"]}[case]
    assert main(["convert", *argv, "--json", "--server", "127.0.0.1:9"]) == 2
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # exactly one object: json.loads refuses anything more
    assert doc["ok"] is False and doc["status"] == "usage" and doc["reason"] == "USAGE"
    assert doc["message"] and doc["message"] in captured.err


def test_every_json_object_says_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    assert _run(monkeypatch, FakeClient(GOOD), str(src), "-o", str(tmp_path / "a"),
                "--json") == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    fake = FakeClient(GOOD, errors=dict.fromkeys(SHARDS, _unreachable()))
    assert _run(monkeypatch, fake, str(src), "-o", str(tmp_path / "b"), "--json") == 3
    assert json.loads(capsys.readouterr().out)["ok"] is False


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_an_output_that_cannot_be_written_is_a_reason_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        where: str) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    (tmp_path / "file").write_text("x")
    output = {"under a file": tmp_path / "file" / "x" / "out",
              "in /proc": Path("/proc/airlock-nowhere/out")}[where]
    assert _run(monkeypatch, FakeClient(GOOD), str(src), "-o", str(output), "--json") == 1
    doc = json.loads(capsys.readouterr().out)
    assert (doc["ok"], doc["status"], doc["reason"]) == (False, "failed", "CLIENT_ERROR")
    assert str(output.parent) in doc["message"] or str(output) in doc["message"], doc


def test_the_api_signs_a_directory_as_its_path_unless_told(tmp_path: Path) -> None:
    """As ``airlock convert DIR`` does: ``verify DIR`` holds carried files to that subject."""
    src = hf_dir(tmp_path / "m", SHARDS)
    fake = FakeClient(GOOD)
    convert_directory(fake, src, tmp_path / "out", jobs=1)  # type: ignore[arg-type]
    assert sorted(fake.subjects) == sorted(f"{src}/{name}" for name in [*SHARDS, "config.json"])


def test_ctrl_c_after_the_output_was_put_in_place_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Found by review: a Ctrl-C while ``--overwrite`` removed the old output (which a large
    directory makes long) was reported as "no partial output was left (OUT is as it was)",
    when OUT was the new, complete output."""
    from airlock_client import _part_files

    src = hf_dir(tmp_path / "m", SHARDS)
    out = tmp_path / "out"
    assert _run(monkeypatch, FakeClient(GOOD), str(src), "-o", str(out)) == 0
    removing = _part_files.remove_tree
    pressed: list[object] = []

    def interrupted(path: Path, ident: tuple[int, int]) -> bool:
        removing(path, ident)
        if not pressed:  # once: as if pressed while the old output was being removed
            pressed.append(path)
            raise KeyboardInterrupt
        return True

    monkeypatch.setattr(_part_files, "remove_tree", interrupted)
    capsys.readouterr()
    assert _run(monkeypatch, FakeClient(GOOD), str(src), "-o", str(out), "--overwrite") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "after the conversion was put in place" in err[-1], err
    assert "no partial output" not in err[-1]


@pytest.mark.parametrize("one_step", [True, False])
def test_overwrite_removes_the_old_output_and_not_what_its_name_holds_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_step: bool) -> None:
    """Found by review: ``--overwrite`` removed the replaced output by its name once the new
    one was in place. In a directory others may write, a member who renamed a tree of the
    user's to that name in between had it removed. Both ways of replacing (one exchange, or
    two renames where the kernel cannot exchange) are checked."""
    from airlock_client import _part_files, model_dir

    if not one_step:
        monkeypatch.setattr(_part_files, "exchange", lambda a, b: False)
    src = hf_dir(tmp_path / "m", SHARDS)
    out = tmp_path / "out"
    assert _run(monkeypatch, FakeClient(GOOD), str(src), "-o", str(out)) == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("secret-notes")
    placing = _part_files.Part.placed_as
    swapped: list[Path] = []

    def placed_then_swapped(part: _part_files.Part, output: Path) -> None:
        placing(part, output)
        if output == out and not swapped:  # the old output's name, taken in between
            old = next(p for p in tmp_path.iterdir() if p.name.startswith(".out."))
            os.rename(old, tmp_path / "old-moved-away")
            os.rename(precious, old)
            swapped.append(old)

    monkeypatch.setattr(_part_files.Part, "placed_as", placed_then_swapped)
    assert _run(monkeypatch, FakeClient(GOOD), str(src), "-o", str(out), "--overwrite") == 0
    assert swapped and (swapped[0] / "notes.txt").read_text() == "secret-notes"
    assert model_dir._foreign_entries(out) == []  # the new output is in place

"""A zip's end records are checked against the worker's budget before any reader lists the
archive: a Zip64 record claiming millions of entries behind a classic record claiming one is
refused with a reason, an honest Zip64 archive is not (issue 11 §2)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from airlock_sandbox.contract import WorkerExit
from airlock_sandbox.formats import ArtifactFormat
from airlock_worker import zip_budget
from airlock_worker.detect import confirm, detect
from airlock_worker.errors import WorkerError
from tests import zip_bomb


def test_the_largest_claim_of_any_end_record_counts(tmp_path: Path) -> None:
    bomb = zip_bomb.write(tmp_path / "bomb.zip", present=1000, claimed=3_000_000)
    with zipfile.ZipFile(bomb) as zf:  # what a reader that believes the Zip64 record does
        assert len(zf.infolist()) == 1000
    assert zip_budget.claims(bomb) == zip_budget.Claim(3_000_000, 46 * 1000 + 7)
    with pytest.raises(zip_budget.ZipOverBudget, match="3000000 entries"):
        zip_budget.check(bomb)


def test_a_directory_larger_than_the_byte_budget_is_refused(tmp_path: Path) -> None:
    archive = zip_bomb.write(tmp_path / "a.zip", present=100, claimed=100)
    with pytest.raises(zip_budget.ZipOverBudget, match="4607-byte central directory"):
        zip_budget.check(archive, zip_budget.ZipBudget(max_directory_bytes=4096))


def test_an_honest_zip64_archive_is_within_budget(tmp_path: Path) -> None:
    archive = zip_bomb.write(tmp_path / "z64.zip", present=3, claimed=3, saturate_classic=True)
    assert zip_budget.claims(archive) == zip_budget.Claim(3, 46 * 3 + 7)
    zip_budget.check(archive)
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("archive/data.pkl", b"x")
    zip_budget.check(plain)
    with open(plain, "rb") as fh:
        fh.seek(5)
        zip_budget.check(fh)
        assert fh.tell() == 5  # a caller's open file is left where it was


def test_the_budget_checks_itself() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        zip_budget.ZipBudget(max_entries=0)
    with pytest.raises(ValueError, match="max_directory_bytes"):
        zip_budget.ZipBudget(max_directory_bytes=10)


def test_the_sandbox_refuses_a_central_directory_bomb_with_a_reason(tmp_path: Path) -> None:
    bomb = zip_bomb.write(tmp_path / "artifact", present=1000, claimed=3_000_000)
    with pytest.raises(WorkerError) as plain:
        detect(str(bomb))
    assert plain.value.exit is WorkerExit.UNSUPPORTED_FORMAT
    with pytest.raises(WorkerError) as declared:
        confirm(str(bomb), ArtifactFormat.MLFLOW, "mlflow")
    assert declared.value.exit is WorkerExit.UNSAFE_MODEL_DIR
    assert "claim 3000000 entries" in declared.value.message


def test_a_bundle_is_a_bundle_only_when_declared(tmp_path: Path) -> None:
    bundle = zip_bomb.write(tmp_path / "artifact", present=1, claimed=1)
    assert confirm(str(bundle), ArtifactFormat.MLFLOW, "mlflow") is ArtifactFormat.MLFLOW
    with pytest.raises(WorkerError) as caught:
        confirm(str(bundle), ArtifactFormat.ZIP, None)
    assert caught.value.exit is WorkerExit.FORMAT_MISMATCH
    assert "declared as mlflow" in caught.value.message

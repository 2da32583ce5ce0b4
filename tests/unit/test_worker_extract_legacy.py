"""Integrity extraction of legacy PyTorch checkpoints (torch < 1.6's layout, or
``_use_new_zipfile_serialization=False``): the same reading as for a zip checkpoint, byte for
byte what the converter writes, and nothing the pickle names ever runs.

Benign checkpoints run through both worker modes on the host (they are ours); hostile ones
(``tests/adversarial/sabotage.py``) through the extraction only."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from airlock_sandbox.contract import WorkerExit
from tests.adversarial import sabotage
from tests.fixtures import models
from tests.unit.test_worker_extract import (
    FIXTURES,
    _edge_checkpoint,
    assert_holds,
    assert_same_as_convert,
    extract_only,
)


def _legacy(path: Path, obj: object) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_extraction_equals_conversion_for_legacy_checkpoints(tmp_path: Path, name: str) -> None:
    """Each fixture re-saved in the legacy layout (loaded here: they are ours)."""
    zipped, check = FIXTURES[name](tmp_path / "src")
    legacy = _legacy(tmp_path / "legacy.pt", torch.load(zipped, weights_only=True))
    assert legacy.read_bytes()[:2] == b"\x80\x02"  # not a zip
    _, ext = assert_same_as_convert(tmp_path, legacy)
    assert ext.report.loader == "restricted-legacy-reader"
    if name != "large_state_dict":
        assert_holds(ext, check.expected)


def test_legacy_edge_cases_equal_the_conversion(tmp_path: Path) -> None:
    """bf16, 0-dim, empty, transposed, slices and strided views of one storage, a tied alias,
    complex128 (skipped by both), tensors and parameters with attributes. (fp8 and uint16
    are saved through UntypedStorage, which torch's own legacy loader cannot read back.)"""
    edge = torch.load(_edge_checkpoint(tmp_path / "edge.pt"), weights_only=False)
    del edge["fp8"], edge["uint16"]
    _, ext = assert_same_as_convert(tmp_path, _legacy(tmp_path / "edge-legacy.pt", edge),
                                    attributes=True)
    header, _ = ext.split()
    assert header["__metadata__"] == {"format": "pt", "lm_head": "embed"}


def test_the_legacy_fixture_is_extracted(tmp_path: Path) -> None:
    artifact, check = models.make_state_dict(tmp_path / "src", legacy=True)
    assert_holds(extract_only(tmp_path, artifact), check.expected)


@pytest.mark.parametrize("via", ["exec", "system"])
def test_code_named_by_a_legacy_pickle_is_never_called(tmp_path: Path, via: str) -> None:
    marker = tmp_path / f"ran-{via}"
    artifact, truth = sabotage.make_marker_checkpoint(tmp_path / f"{via}.pt", marker, via,
                                                      legacy=True)
    out = extract_only(tmp_path, artifact)
    assert not marker.exists(), "the extractor executed a global named by the artifact"
    assert_holds(out, truth)
    assert out.report.executed_artifact_code is False


def test_the_sabotaged_legacy_checkpoint_extracts_its_true_weights(tmp_path: Path) -> None:
    artifact, truth = sabotage.make_sabotaged_checkpoint(tmp_path / "s.pt", legacy=True)
    out = extract_only(tmp_path, artifact)
    assert_holds(out, truth)
    assert any("builtins.exec" in w for w in out.report.warnings)


def test_a_pickled_legacy_module_is_not_extractable(tmp_path: Path) -> None:
    artifact = _legacy(tmp_path / "m.pt", models.torch_mlp())
    out = extract_only(tmp_path, artifact)
    assert out.error is not None and out.error.exit is WorkerExit.UNSUPPORTED_MODEL
    assert not out.path.exists()


# -- hand-built hostile layouts ----------------------------------------------------------------


def _one(values: np.ndarray | None = None) -> tuple[sabotage.TensorRef, dict[str, bytes]]:
    ref, data = sabotage.float_storage("0", np.arange(4, dtype=np.float32)
                                       if values is None else values)
    return sabotage.TensorRef(ref, 0, (ref.numel,), (1,)), data


def test_a_hand_built_legacy_checkpoint_reads_true(tmp_path: Path) -> None:
    tensor, data = _one()
    path = sabotage.write_legacy_checkpoint(tmp_path / "ok.pt", {"w": tensor}, data)
    assert_holds(extract_only(tmp_path, path), {"w": np.arange(4, dtype=np.float32)})


def _refused(tmp_path: Path, path: Path, exit: WorkerExit, words: str) -> None:
    out = extract_only(tmp_path, path)
    assert out.error is not None, "a hostile layout was read"
    assert out.error.exit is exit, out.error.message
    assert words in out.error.message
    assert not out.path.exists()


def test_a_count_that_disagrees_with_the_pickle_is_refused(tmp_path: Path) -> None:
    tensor, data = _one()
    path = sabotage.write_legacy_checkpoint(tmp_path / "c.pt", {"w": tensor}, data,
                                            counts={"0": 2})
    _refused(tmp_path, path, WorkerExit.CONVERSION_FAILED, "holds 2 elements")


def test_a_truncated_storage_is_refused(tmp_path: Path) -> None:
    tensor, data = _one()
    path = sabotage.write_legacy_checkpoint(tmp_path / "t.pt", {"w": tensor}, data)
    path.write_bytes(path.read_bytes()[:-3])
    _refused(tmp_path, path, WorkerExit.CONVERSION_FAILED, "past the end of the file")


def test_a_storage_the_key_list_leaves_out_is_refused(tmp_path: Path) -> None:
    """torch would hand out uninitialised memory for it."""
    tensor, data = _one()
    path = sabotage.write_legacy_checkpoint(tmp_path / "k.pt", {"w": tensor}, data, keys=[])
    _refused(tmp_path, path, WorkerExit.CONVERSION_FAILED, "has no data")


@pytest.mark.parametrize("keys", [["0", "0"], ["0", "x"], "0", [7]])
def test_a_key_list_naming_unknown_or_repeated_storages_is_refused(tmp_path: Path,
                                                                   keys: object) -> None:
    tensor, data = _one()
    path = sabotage.write_legacy_checkpoint(tmp_path / "k.pt", {"w": tensor}, data,
                                            keys=keys)  # type: ignore[arg-type]
    _refused(tmp_path, path, WorkerExit.CONVERSION_FAILED, "key list")


def test_a_big_endian_legacy_checkpoint_is_unsupported(tmp_path: Path) -> None:
    tensor, data = _one()
    info = dict(sabotage.LEGACY_SYS_INFO, little_endian=False)
    path = sabotage.write_legacy_checkpoint(tmp_path / "be.pt", {"w": tensor}, data,
                                            sys_info=info)
    _refused(tmp_path, path, WorkerExit.UNSUPPORTED_MODEL, "little-endian")


def test_a_storage_view_is_not_guessed(tmp_path: Path) -> None:
    tensor, data = _one()
    path = sabotage.write_legacy_checkpoint(tmp_path / "v.pt", {"w": tensor}, data,
                                            view=("1", 1, 2))
    _refused(tmp_path, path, WorkerExit.UNSUPPORTED_MODEL, "storage view")


def test_an_oversized_pickle_is_refused_without_reading_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airlock_worker import extract_legacy

    artifact, _ = models.make_state_dict(tmp_path / "src", legacy=True)
    monkeypatch.setattr(extract_legacy, "MAX_PICKLE_BYTES", 64)
    _refused(tmp_path, artifact, WorkerExit.CONVERSION_FAILED, "exceed 64 bytes")


def test_a_legacy_checkpoint_that_is_also_a_tar_is_refused(tmp_path: Path) -> None:
    """torch's legacy loader reads a file whose first block is a tar header as its older
    tar layout: the reading would answer for another layout than torch's."""
    artifact = sabotage.make_tar_headed_legacy_checkpoint(tmp_path / "tarred.pt")
    with tarfile.open(artifact, "r:") as tar:  # what torch's loader tries first
        assert tar.getmembers()
    out = extract_only(tmp_path, artifact)
    assert out.error is not None and "tar header" in out.error.message

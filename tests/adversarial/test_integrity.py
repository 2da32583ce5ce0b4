"""Threat: "Silent Sabotage" — an artifact whose code, run while loading, tampers with the
converter so that it writes altered weights (HiddenLayer 2024, against Hugging Face's
conversion service). Format checks cannot see it; the integrity extraction must."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.adversarial.sabotage import (
    make_attribute_swap_checkpoint,
    make_sabotaged_checkpoint,
    make_sabotaged_estimator,
    make_two_archive_checkpoint,
)
from tests.conftest import BrokerProcess, run_cli
from tests.fixtures import models
from tests.integration import test_local_transfer as local

pytestmark = pytest.mark.adversarial


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_silent_sabotage_of_the_converter_is_rejected(broker: BrokerProcess, tmp_path: Path,
                                                       layout: str) -> None:
    artifact, _truth = make_sabotaged_checkpoint(tmp_path / "sabotaged.pt",
                                                 legacy=layout == "legacy")
    done = run_cli("convert", str(artifact), "-o", str(tmp_path / "out.safetensors"), "--json",
                   server=broker.address)
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert (doc["status"], doc["reason"]) == ("rejected", "INTEGRITY_MISMATCH"), doc
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(("how", "layout"), [("parameter", "zip"), ("tensor", "legacy")])
def test_weights_swapped_by_a_tensor_attribute_are_rejected(broker: BrokerProcess,
                                                            tmp_path: Path, how: str,
                                                            layout: str) -> None:
    """No code runs anywhere: torch.load sets the pickled attribute ``data`` and loads B,
    while the first storage holds A. The reading does not answer alone for a tensor with
    attributes, so the conversion (B) is compared with it (A) and the file is refused."""
    artifact, _a, _b = make_attribute_swap_checkpoint(tmp_path / "swap.pt", how,
                                                      legacy=layout == "legacy")
    out = tmp_path / "out.safetensors"
    done = run_cli("convert", str(artifact), "-o", str(out), "--json", server=broker.address)
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert (doc["status"], doc["reason"]) == ("rejected", "INTEGRITY_MISMATCH"), doc
    assert not out.exists()


def test_a_zip_torch_and_the_reading_would_list_differently_is_not_verified(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """Two archives in one file: the reading refuses it (its zip library and torch's would
    list different ones), so the conversion's answer, the weights torch loads, is never
    called integrity-verified."""
    artifact, a, _b = make_two_archive_checkpoint(tmp_path / "two.pt")
    out = tmp_path / "out.safetensors"
    done = run_cli("convert", str(artifact), "-o", str(out), "--json", server=broker.address)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["assurance"] == "format_safe_only", doc
    assert np.array_equal(load_file(str(out))["w"], a)


def test_a_sabotaged_output_delivered_during_the_comparison_is_taken_back(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """On the fast path the output goes into the caller's file while the broker compares it
    with the reading that executed nothing (integrity.assurance_delivering). When they
    differ, the caller's file is emptied before the refusal is sent: a client that ignored
    the error would still hold nothing of the sabotaged weights."""
    artifact, _truth = make_sabotaged_checkpoint(tmp_path / "sabotaged.pt")
    out = tmp_path / "out.part"
    ticket = local._hand_over(broker, artifact, out)
    with pytest.raises(grpc.RpcError) as caught:
        local._convert_with(broker, ticket)
    assert local._reason(caught.value) == "INTEGRITY_MISMATCH"
    assert out.stat().st_size == 0


@pytest.mark.parametrize("how", ["coef", "skl2onnx"])
def test_silent_sabotage_of_an_estimator_is_rejected(broker: BrokerProcess, tmp_path: Path,
                                                      how: str) -> None:
    """The payload runs in the converting sandbox (allow_code) and changes what it writes; the
    policy loader's reading, which never ran it, converts the stored model: they differ."""
    artifact = make_sabotaged_estimator(tmp_path / "sabotaged.joblib", how)
    out = tmp_path / "out.onnx"
    done = run_cli("convert", str(artifact), "-o", str(out), "--json", server=broker.address)
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert (doc["status"], doc["reason"]) == ("rejected", "INTEGRITY_MISMATCH"), doc
    assert "builtins.exec" in doc["message"], doc  # what the reading did not call
    assert not out.exists()


def test_benign_state_dict_is_integrity_verified(broker: BrokerProcess, tmp_path: Path) -> None:
    artifact, check = models.make_tied_state_dict(tmp_path)
    out = tmp_path / "out.safetensors"
    done = run_cli("convert", str(artifact), "-o", str(out), "--json", server=broker.address)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["assurance"] == "integrity_verified", doc
    got = load_file(str(out))
    for name, want in check.expected.items():
        assert np.array_equal(got[name].view(np.uint8), want.view(np.uint8))


def test_full_module_cannot_be_verified_and_says_so(broker: BrokerProcess,
                                                    tmp_path: Path) -> None:
    artifact, _ = models.make_full_module(tmp_path)
    done = run_cli("convert", str(artifact), "--to", "safetensors", "--json",
                   server=broker.address)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["assurance"] == "format_safe_only" and doc["integrity_note"], doc


def test_deflate_compressed_checkpoint_converts_and_verifies(broker: BrokerProcess,
                                                             tmp_path: Path) -> None:
    # torch.load(mmap=True) misreads deflated records; a benign re-zipped checkpoint must not
    # come back as a (false) integrity mismatch.
    import zipfile

    stored, check = models.make_state_dict(tmp_path / "src")
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(deflated, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    out = tmp_path / "out.safetensors"
    done = run_cli("convert", str(deflated), "-o", str(out), "--json", server=broker.address)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["assurance"] == "integrity_verified"
    got = load_file(str(out))
    for name, want in check.expected.items():
        assert got[name].tobytes() == want.tobytes()

"""Training checkpoints end to end through the real broker, engine and image: a PyTorch
Lightning ``.ckpt`` (saved by plain ``torch.save``, zip layout) and a plain training loop's
``{"model": ..., "optimizer": ..., "epoch": ...}`` (legacy layout) become safetensors that
``load_state_dict(strict=True)`` takes, equal to the model's tensors byte for byte, still
integrity-verified (the integrity reader selects the same state dict), and the optimizer
state and the other entries left out are reported to the user."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airlock_client import Client
from tests.conftest import BrokerProcess, run_cli
from tests.fixtures import models
from tests.fixtures.models import Check

pytestmark = pytest.mark.integration


def _assert_loads_strictly(output: Path, check: Check) -> None:
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(output))
    model = models.torch_mlp()
    model.load_state_dict(weights, strict=True)  # no missing, no unexpected, no prefix
    for name, want in check.expected.items():
        got = model.state_dict()[name]
        assert got.numpy().tobytes() == want.tobytes(), f"{name}: bytes differ"
    assert set(weights) == set(check.expected)
    assert all(t.dtype == torch.float32 for t in weights.values())


def _assert_left_out_reported(warnings: list[str], check: Check) -> None:
    for entry, count in check.left_out.items():
        assert any(w.startswith(f"left out {entry!r}: {count} tensor(s)") for w in warnings), (
            entry, warnings)


def test_a_lightning_checkpoint_gives_the_state_dict_and_reports_the_rest(
        broker: BrokerProcess, tmp_path: Path) -> None:
    artifact, check = models.make_lightning_checkpoint(tmp_path / "in")
    output = tmp_path / "model.safetensors"
    done = run_cli("convert", str(artifact), "-o", str(output), "--json", server=broker.address)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["assurance"] == "integrity_verified", doc
    assert doc["executed_artifact_code"] is False
    _assert_loads_strictly(output, check)
    warnings = doc["warnings"]
    assert "converted its 'state_dict' entry" in warnings[0]
    _assert_left_out_reported(warnings, check)
    assert any(w.startswith("left out 7 entries without tensors: epoch, global_step")
               for w in warnings), warnings


def test_a_legacy_model_and_optimizer_checkpoint_gives_the_model(broker: BrokerProcess,
                                                                  tmp_path: Path) -> None:
    artifact, check = models.make_training_checkpoint(tmp_path / "in", legacy=True)
    output = tmp_path / "model.safetensors"
    with Client(broker.address) as client:
        result = client.convert(artifact, output)
    assert result.detected_format == "pytorch_legacy"
    assert result.assurance == "integrity_verified", result.integrity_note
    _assert_loads_strictly(output, check)
    _assert_left_out_reported(list(result.report.warnings), check)


def test_asked_for_the_training_state_the_optimizer_comes_too(broker: BrokerProcess,
                                                               tmp_path: Path) -> None:
    """--keep-training-state: the model's weights under their own names, the optimizer's
    under its entry; both readers agree, so it stays integrity-verified."""
    from safetensors.torch import load_file

    artifact, check = models.make_lightning_checkpoint(tmp_path / "in")
    output = tmp_path / "train.safetensors"
    done = run_cli("convert", str(artifact), "-o", str(output), "--json",
                   "--keep-training-state", server=broker.address)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["assurance"] == "integrity_verified", doc
    weights = load_file(str(output))
    optimizer = sorted(k for k in weights if k.startswith("optimizer_states.0.state."))
    assert len(optimizer) == check.left_out["optimizer_states"], sorted(weights)
    for name, want in check.expected.items():
        assert weights[name].numpy().tobytes() == want.tobytes(), name
    assert "as asked, the tensors of 'callbacks', 'optimizer_states'" in doc["warnings"][0]
    assert not any(w.startswith("left out 'optimizer_states'") for w in doc["warnings"])

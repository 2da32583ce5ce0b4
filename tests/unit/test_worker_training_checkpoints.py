"""Training checkpoints (PyTorch Lightning ``.ckpt``, ``{"model": ..., "optimizer": ...}``):
the model's state dict is picked out by one rule (``tensor_tree.select``), the rest is left
out and reported, and the converting reader (``torch.load``) and the integrity reader (the
restricted unpickler) apply that rule identically, in the zip and the legacy layout, or the
broker's byte comparison would call a benign checkpoint tampered with.

The checkpoints are ours, so both worker modes run on the host (as in test_worker_extract)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from airlock_sandbox.contract import JobMode, LoadingPolicy, WorkerExit
from airlock_worker import tensor_tree
from tests.fixtures import models
from tests.unit.test_worker_extract import (
    assert_holds,
    assert_same_as_convert,
    assert_same_file,
    run,
)

LAYOUTS = ["zip", "legacy"]


def _save(path: Path, obj: object, layout: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=layout == "zip")
    return path


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"enc.weight": torch.randn(4, 3, generator=gen), "enc.bias": torch.zeros(4),
            "head.weight": torch.randn(2, 4, generator=gen)}


def _opt(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """An optimizer's state_dict shape: int-keyed state with tensors, plain param groups."""
    return {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(t)}
                      for i, t in enumerate(sd.values())},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1, 2]}]}


#: name -> (checkpoint, the key whose value must become the output (None: the whole tree,
#: flattened as ever), the left-out entries that hold tensors -> how many).
STRUCTURES: dict[str, Callable[[], tuple[Any, str | None, dict[str, int]]]] = {
    "plain_state_dict": lambda: (_sd(), None, {}),
    "lightning_minimal": lambda: ({"state_dict": _sd(), "epoch": 1}, "state_dict", {}),
    "model_and_optimizer": lambda: ({"model": _sd(), "optimizer": _opt(_sd()), "epoch": 3},
                                    "model", {"optimizer": 6}),
    "tutorial_loop": lambda: ({"epoch": 3, "model_state_dict": _sd(), "loss": 0.25,
                               "optimizer_state_dict": _opt(_sd())},
                              "model_state_dict", {"optimizer_state_dict": 6}),
    "deepspeed_module": lambda: ({"module": _sd(), "global_steps": 10}, "module", {}),
    "net": lambda: ({"net": _sd(), "opt": _opt(_sd())}, "net", {"opt": 6}),
    # state_dict comes first; a second set of weights (an EMA) is left out, and reported
    "state_dict_before_model": lambda: ({"model": _sd(1), "state_dict": _sd(2),
                                         "state_dict_ema": _sd(3)},
                                        "state_dict", {"model": 3, "state_dict_ema": 3}),
    # a shared tensor and a container that holds itself are counted once
    "shared_and_cyclic": lambda: _shared_and_cyclic(),
    # a module's extra state (not a tensor) does not make "model" less of a state dict
    "model_with_extra_state": lambda: ({"model": {**_sd(), "enc._extra_state": 3},
                                        "optimizer": _opt(_sd())}, "model", {"optimizer": 6}),
    # "model" that is not a flat dict holding tensors is not taken: flattened as ever
    "model_is_nested": lambda: ({"model": {"enc": _sd()}, "ema": {"w": torch.ones(2)}},
                                None, {}),
    "model_is_a_config": lambda: ({"model": {"name": "mlp", "depth": 2}, "w": _sd()}, None, {}),
    "model_is_empty": lambda: ({"model": {}, "w": torch.ones(3)}, None, {}),
}


def _is_torch(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _shared_and_cyclic() -> tuple[Any, str | None, dict[str, int]]:
    sd = _sd()
    history: list[Any] = [sd["enc.weight"], sd["enc.weight"], torch.ones(2)]
    history.append(history)
    return {"model": sd, "history": history}, "model", {"history": 2}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_both_readers_select_and_name_the_same_weights(tmp_path: Path, name: str,
                                                        layout: str) -> None:
    obj, key, heavy = STRUCTURES[name]()
    artifact = _save(tmp_path / f"{name}.pt", obj, layout)
    conv, ext = assert_same_as_convert(tmp_path, artifact)  # same bytes, same warnings
    assert conv.report.executed_artifact_code is False
    if key is None:
        want = tensor_tree.flatten(obj, _is_torch).tensors
        assert not any("training checkpoint" in w for w in ext.report.warnings)
    else:
        want = {k: v for k, v in obj[key].items() if isinstance(v, torch.Tensor)}
        assert f"converted its {key!r} entry" in ext.report.warnings[0]
        for entry, count in heavy.items():
            assert any(w.startswith(f"left out {entry!r}: {count} tensor(s)")
                       for w in ext.report.warnings), (entry, ext.report.warnings)
    assert_holds(ext, {k: v.numpy() for k, v in want.items()})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_lightning_checkpoint_keeps_its_state_dict_and_reports_the_rest(
        tmp_path: Path, layout: str) -> None:
    artifact, check = models.make_lightning_checkpoint(tmp_path / "src",
                                                       legacy=layout == "legacy")
    _, ext = assert_same_as_convert(tmp_path, artifact)
    assert_holds(ext, check.expected)
    warnings = ext.report.warnings
    assert warnings[1] == "left out 'callbacks': 1 tensor(s), 4 bytes"  # best_model_score
    assert warnings[2] == "left out 'optimizer_states': 12 tensor(s), 3.0 KiB"  # 3112 bytes
    assert warnings[3] == ("left out 7 entries without tensors: epoch, global_step, "
                           "pytorch-lightning_version, loops, lr_schedulers, hparams_name, "
                           "hyper_parameters")
    assert len(warnings) == 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_asked_for_the_training_state_both_readers_keep_it_under_its_entry(
        tmp_path: Path, layout: str) -> None:
    sd = _sd()
    obj = {"state_dict": sd, "optimizer_states": [_opt(sd)], "epoch": 4,
           "lr_schedulers": [{"last_epoch": 4}]}
    artifact = _save(tmp_path / "train.ckpt", obj, layout)
    _, ext = assert_same_as_convert(tmp_path, artifact, keep_training_state=True)
    optimizer = {f"optimizer_states.0.state.{i}.{k}": v
                 for i, state in obj["optimizer_states"][0]["state"].items()  # type: ignore[index]
                 for k, v in state.items()}
    want = {**sd, **optimizer}
    assert_holds(ext, {k: v.numpy() for k, v in want.items()})
    warnings = ext.report.warnings
    assert "as asked, the tensors of 'optimizer_states' under" in warnings[0]
    # hyper-parameters beside the optimizer state are not news; entries without tensors are
    assert warnings[1:] == ["left out 2 entries without tensors: epoch, lr_schedulers"]
    # and by default, as before: the state dict alone
    _, plain = assert_same_as_convert(tmp_path / "default", artifact)
    assert_holds(plain, {k: v.numpy() for k, v in sd.items()})


def test_a_lightning_checkpoint_whose_hyper_parameters_need_code(tmp_path: Path) -> None:
    """weights_only refuses a Namespace: under allow_code the converter loads it all (and the
    selection still applies, so the integrity reading agrees); under safe_only it refuses."""
    sd = _sd()
    artifact = _save(tmp_path / "hp.ckpt", {"state_dict": sd, "epoch": 2, "hyper_parameters":
                                            argparse.Namespace(lr=0.1)}, "zip")
    conv = run(tmp_path, artifact, JobMode.CONVERT)
    ext = run(tmp_path, artifact, JobMode.EXTRACT_WEIGHTS)
    assert_same_file(ext, conv)
    # the integrity reader also says it did not call argparse.Namespace
    assert ext.report.warnings[1:] == conv.report.warnings
    assert conv.report.loader == "torch.load(weights_only=False)"
    assert conv.report.executed_artifact_code is True
    assert_holds(ext, {k: v.numpy() for k, v in sd.items()})
    assert ext.report.warnings[-1] == ("left out 2 entries without tensors: epoch, "
                                       "hyper_parameters")
    refused = run(tmp_path / "safe", artifact, JobMode.CONVERT, policy=LoadingPolicy.SAFE_ONLY)
    assert refused.error is not None and refused.error.exit is WorkerExit.POLICY_VIOLATION


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_tensor_only_one_reader_can_rebuild_does_not_change_the_selection(
        tmp_path: Path, layout: str) -> None:
    """torch rebuilds a meta tensor, the integrity reader leaves it unbuilt: both must still
    take "model" (an all-tensors rule would not, and a benign file would read as tampered)."""
    sd = _sd()
    artifact = _save(tmp_path / "meta.pt", {"model": {**sd, "m": torch.empty(2, device="meta")},
                                            "optimizer": _opt(sd)}, layout)
    conv = run(tmp_path, artifact, JobMode.CONVERT)
    ext = run(tmp_path, artifact, JobMode.EXTRACT_WEIGHTS)
    assert_same_file(ext, conv)
    assert_holds(ext, {k: v.numpy() for k, v in sd.items()})
    assert "converted its 'model' entry" in ext.report.warnings[1]  # [0]: the meta rebuild


# -- the rule itself, on plain values --------------------------------------------------------


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray)


def test_the_rule_takes_the_first_known_key_holding_a_state_dict() -> None:
    w = np.ones(2)
    assert tensor_tree.select({"w": w}, _is_array) is None
    assert tensor_tree.select(w, _is_array) is None
    assert tensor_tree.select([{"model": {"w": w}}], _is_array) is None
    assert tensor_tree.select({"net": {"w": w}, "module": {"w": w}}, _is_array) == "module"
    assert tensor_tree.select({"model": {"w": w, "step": 1}}, _is_array) == "model"
    assert tensor_tree.select({"model": {"w": w, "cfg": {"a": 1}}}, _is_array) is None
    assert tensor_tree.select({"model": {"w": w, "seen": [1]}}, _is_array) is None
    assert tensor_tree.select({"model": {"name": "mlp"}, "w": w}, _is_array) is None
    assert tensor_tree.select({"state_dict": {"enc": {"w": w}}}, _is_array) == "state_dict"
    assert tensor_tree.select({"state_dict": w, "model": {"w": w}}, _is_array) == "model"
    assert [k for k in tensor_tree.WEIGHT_KEYS] == ["state_dict", "model_state_dict", "model",
                                                    "module", "net"]


def test_left_out_entries_are_counted_and_summarised() -> None:
    flat = tensor_tree.flatten({"model": {"w": np.ones(2)},
                                **{f"ema{i}": {"w": np.zeros(256)} for i in range(8)},
                                "epoch": 3}, _is_array)
    assert list(flat.tensors) == ["w"] and flat.selected == "model"
    assert flat.left_out[0] == tensor_tree.LeftOut("ema0", 1, 2048)
    lines = tensor_tree.left_out_sentences(flat)
    assert lines[1] == "left out 'ema0': 1 tensor(s), 2.0 KiB"
    assert lines[-2] == "left out 2 more entries with tensors: 2 tensor(s), 4.0 KiB"
    assert lines[-1] == "left out 1 entry without tensors: epoch"


def test_an_object_key_beside_the_state_dict_is_named_by_its_type(tmp_path: Path) -> None:
    """A tensor as a dict key: the integrity reader refuses to print it (it could pose as a
    tensor's name); beside a state dict it is only a left-out entry, named by its type."""
    sd = _sd()
    artifact = _save(tmp_path / "k.pt", {"model": sd, torch.ones(1): "odd", 7: "n"}, "zip")
    conv = run(tmp_path, artifact, JobMode.CONVERT)
    ext = run(tmp_path, artifact, JobMode.EXTRACT_WEIGHTS)
    assert_same_file(ext, conv)
    assert ext.report.warnings[-1] == "left out 2 entries without tensors: <Tensor>, 7"
    assert conv.report.warnings == ext.report.warnings

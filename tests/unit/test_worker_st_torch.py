"""The worker's torch -> safetensors step on tensors built in the test (no artifact loaded):
tied names are deduplicated only when they are the same view, other views of one storage
are cloned, and the byte comparison after reload is exact where torch.equal is not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sandbox"))

from airlock_worker import st_torch


def _prepare(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    warnings: list[str] = []
    return st_torch.prepare(tensors, warnings.append)


def test_same_view_aliases_are_deduplicated_and_recorded() -> None:
    w = torch.randn(4, 3)
    ready, metadata = _prepare({"embed.weight": w, "lm_head.weight": w, "bias": torch.ones(3)})
    assert sorted(ready) == ["bias", "embed.weight"]
    assert metadata == {"format": "pt", "lm_head.weight": "embed.weight"}


def test_a_slice_beside_its_whole_is_cloned_not_mapped_onto_the_whole() -> None:
    whole = torch.arange(12.0).reshape(4, 3)
    ready, metadata = _prepare({"a": whole, "b": whole[1:3]})
    assert sorted(ready) == ["a", "b"] and len(metadata) == 1
    assert torch.equal(ready["b"], whole[1:3])
    assert ready["b"].untyped_storage().data_ptr() != ready["a"].untyped_storage().data_ptr()


def test_non_contiguous_tensors_are_made_contiguous() -> None:
    ready, _ = _prepare({"t": torch.randn(3, 5).t()})
    assert ready["t"].is_contiguous()


def test_round_trip_is_byte_exact_for_nan_negative_zero_and_bf16(tmp_path: Path) -> None:
    tensors = {"nan": torch.tensor([float("nan"), -0.0, 0.0]),
               "bf16": torch.randn(5).to(torch.bfloat16), "scalar": torch.tensor(3)}
    ready, metadata = _prepare(tensors)
    path = tmp_path / "out.safetensors"
    assert st_torch.write_verified(ready, metadata, str(path), 10**6) == 3
    with safe_open(str(path), framework="pt") as f:
        negzero = f.get_tensor("nan")[1]
    assert torch.signbit(negzero)


def test_refused_dtypes_are_skipped_with_a_warning() -> None:
    warnings: list[str] = []
    ready, _ = st_torch.prepare({"c": torch.zeros(2, dtype=torch.complex128),
                                 "ok": torch.zeros(2)}, warnings.append)
    assert list(ready) == ["ok"] and "complex128" in warnings[0]


def test_output_cap_is_checked_before_writing(tmp_path: Path) -> None:
    from airlock_worker.errors import WorkerError

    ready, metadata = _prepare({"w": torch.zeros(1000)})
    with pytest.raises(WorkerError):
        st_torch.write_verified(ready, metadata, str(tmp_path / "x"), 100)
    assert not (tmp_path / "x").exists()

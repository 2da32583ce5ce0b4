"""The worker's torch -> safetensors step on tensors built in the test (no artifact loaded):
tied names are deduplicated only when they are the same view, other views of one storage
are cloned, and the byte comparison after reload is exact where torch.equal is not."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

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


# -- the check after writing: in place, byte for byte (st_verify) ---------------------------


def _writer_that(damage: Any) -> Any:
    """The real ``save_file``, followed by ``damage(path)``: a writer with a bug."""
    from safetensors.torch import save_file

    def save(tensors: dict[str, torch.Tensor], path: str, metadata: Any = None) -> None:
        save_file(tensors, path, metadata=metadata)
        damage(path)

    return save


def _data_start(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _flip_byte(path: str, offset_in_data: int) -> None:
    at = _data_start(path) + offset_in_data
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_corrupted_byte_in_the_written_file_is_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    from airlock_worker import st_verify
    from airlock_worker.errors import WorkerError

    monkeypatch.setattr(st_verify, "CHUNK", 64)  # several chunks per tensor
    ready, metadata = _prepare({"a": torch.randn(100), "b": torch.arange(50, dtype=torch.int64)})
    total = sum(t.nbytes for t in ready.values())
    offset = {"first": 0, "middle": total // 2 + 3, "last": total - 1}[where]
    monkeypatch.setattr(st_torch, "save_file", _writer_that(lambda p: _flip_byte(p, offset)))
    with pytest.raises(WorkerError, match="bytes differ") as caught:
        st_torch.write_verified(ready, metadata, str(tmp_path / "out.safetensors"), 10**6)
    assert caught.value.exit.name == "CONVERSION_FAILED"


def test_a_nan_payload_or_zero_sign_change_is_a_difference(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flipping 0.0 into -0.0 (the sign bit, last byte of a little-endian float32) keeps
    the values equal under ==; the byte comparison must still refuse it."""
    from airlock_worker.errors import WorkerError

    ready, metadata = _prepare({"z": torch.zeros(4)})

    def sign_flip(path: str) -> None:
        at = _data_start(path) + 3
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(b"\x80")

    monkeypatch.setattr(st_torch, "save_file", _writer_that(sign_flip))
    with pytest.raises(WorkerError, match="bytes differ"):
        st_torch.write_verified(ready, metadata, str(tmp_path / "out.safetensors"), 10**6)


@pytest.mark.parametrize("change", ["shape", "dtype", "name", "missing", "metadata"])
def test_a_writer_that_changes_the_header_is_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    from safetensors.torch import save_file

    from airlock_worker.errors import WorkerError

    ready, metadata = _prepare({"w": torch.randn(2, 6), "v": torch.ones(3)})
    wrong = {
        "shape": lambda: ({"w": ready["w"].reshape(3, 4), "v": ready["v"]}, metadata),
        "dtype": lambda: ({"w": ready["w"].view(torch.int32), "v": ready["v"]}, metadata),
        "name": lambda: ({"W": ready["w"], "v": ready["v"]}, metadata),
        "missing": lambda: ({"w": ready["w"]}, metadata),
        "metadata": lambda: (ready, {**metadata, "extra": "x"}),
    }[change]

    def bad_save(tensors: Any, path: str, metadata: Any = None) -> None:
        written, meta = wrong()
        save_file(written, path, metadata=meta)

    monkeypatch.setattr(st_torch, "save_file", bad_save)
    with pytest.raises(WorkerError) as caught:
        st_torch.write_verified(ready, metadata, str(tmp_path / "out.safetensors"), 10**6)
    assert caught.value.exit.name == "CONVERSION_FAILED"


def test_a_truncated_file_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airlock_worker.errors import WorkerError

    def truncate(path: str) -> None:
        os.truncate(path, os.path.getsize(path) - 1)

    ready, metadata = _prepare({"w": torch.randn(8)})
    monkeypatch.setattr(st_torch, "save_file", _writer_that(truncate))
    with pytest.raises(WorkerError, match="tile"):
        st_torch.write_verified(ready, metadata, str(tmp_path / "out.safetensors"), 10**6)


def test_every_dtype_code_agrees_with_safetensors_and_round_trips(tmp_path: Path) -> None:
    """Our table is written out independently of the writer's; it must say the same, and a
    tensor of each dtype (plus empty and 0-d ones) passes the check after writing."""
    import safetensors.torch

    written_by_the_library = {v: k for k, v in safetensors.torch._TYPES.items()}
    assert written_by_the_library == st_torch.DTYPE_CODES
    tensors = {f"t_{code}": torch.arange(6, dtype=torch.float32).reshape(2, 3).to(dtype)
               for dtype, code in st_torch.DTYPE_CODES.items()}
    tensors |= {"empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    ready, metadata = _prepare(tensors)
    assert st_torch.write_verified(ready, metadata, str(tmp_path / "o"), 10**6) == len(tensors)


def test_only_empty_tensors(tmp_path: Path) -> None:
    ready, metadata = _prepare({"e": torch.zeros(0), "f": torch.zeros(2, 0)})
    assert st_torch.write_verified(ready, metadata, str(tmp_path / "o"), 10**6) == 2


def test_the_read_back_is_left_to_the_broker_when_it_compares(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # JobSpec.read_back = False: an integrity reading runs beside the conversion and the broker
    # compares the outputs, so the worker does not map and compare its file a second time.
    from airlock_sandbox.contract import JobSpec

    ready, metadata = _prepare({"a": torch.randn(100)})
    monkeypatch.setattr(st_torch, "save_file", _writer_that(lambda p: _flip_byte(p, 0)))
    assert st_torch.write_verified(ready, metadata, str(tmp_path / "out.safetensors"), 10**6,
                                   read_back=False) == 1
    assert JobSpec.from_json(JobSpec(job_id="t", read_back=False).to_json()).read_back is False
    assert JobSpec.from_json(b'{"job_id": "t"}').read_back is True  # by default, it checks

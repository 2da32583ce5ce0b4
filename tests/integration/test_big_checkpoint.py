"""A checkpoint larger than 4 GiB whose safetensors output is larger than 2 GiB, end to end
with the default limits (issue #13: the old caps were 4 GiB in, 2 GiB out): a training
checkpoint of 2.3 GiB of weights and 2 GiB of optimizer state, through the same-host path,
integrity-verified, the weights equal to the source's byte for byte.

The slowest test of the suite (about 13 GB written in all: the checkpoint, the spool's copy,
two outputs in the sandboxes' memory, the answer and the caller's file); it is one test."""

from __future__ import annotations

from pathlib import Path

import pytest

from airlock_client import Client
from tests.conftest import BrokerProcess

pytestmark = pytest.mark.integration

GiB = 1024**3
#: Four weight tensors of 0.575 GiB (float32) and two optimizer tensors of 1 GiB.
WEIGHT_ELEMENTS = 154_000_000
OPTIMIZER_ELEMENTS = GiB // 4
MARK = 4096


def _tensor(elements: int, seed: int):  # type: ignore[no-untyped-def]
    """Zeros (cheap to make) but for a marked head and tail, so a misplaced byte shows."""
    import torch

    t = torch.zeros(elements, dtype=torch.float32)
    t[:MARK] = torch.arange(MARK, dtype=torch.float32) + seed
    t[-MARK:] = -(torch.arange(MARK, dtype=torch.float32) + seed)
    return t


def test_a_checkpoint_over_4_gib_becomes_safetensors_over_2_gib(broker: BrokerProcess,
                                                                tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    weights = {f"layers.{i}.weight": _tensor(WEIGHT_ELEMENTS, i) for i in range(4)}
    optimizer = {"state": {i: {"exp_avg": _tensor(OPTIMIZER_ELEMENTS, 10 + i)}
                           for i in range(2)}, "param_groups": [{"lr": 1e-3}]}
    artifact = tmp_path / "big.ckpt"
    torch.save({"state_dict": weights, "optimizer_states": [optimizer], "epoch": 3}, artifact)
    del optimizer
    assert artifact.stat().st_size > 4 * GiB

    output = tmp_path / "big.safetensors"
    with Client(broker.address) as client:
        result = client.convert(artifact, output, target="safetensors", job_timeout=1800)
    artifact.unlink()  # the disk is needed for the next tests
    assert result.assurance == "integrity_verified", result.integrity_note
    assert result.size > 2 * GiB and output.stat().st_size == result.size
    assert any(w.startswith("left out 'optimizer_states': 2 tensor(s)")
               for w in result.report.warnings), result.report.warnings
    with safe_open(str(output), framework="pt") as fh:
        assert sorted(fh.keys()) == sorted(weights)
        for name, want in weights.items():  # every byte, one tensor at a time (0.575 GiB)
            got = fh.get_tensor(name)
            assert got.shape == want.shape and got.dtype == want.dtype, name
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), name

"""The output caps end to end, real broker, engine and image: ONNX has its own cap, far below
what a safetensors output may be, and a model over it is refused with the advice to take
safetensors, which then converts; a safetensors output over the sandbox's output room is
refused by the worker before it writes, naming the limit to raise (a safetensors output
larger than the tmpfs is given a disk-backed room sized from its input: one far larger than
its input is refused at that room). Small caps configured, so
that megabytes prove what gigabytes would (issue 13)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock_broker.conversion.output_room import HEADROOM_BYTES
from airlock_client import Client, ConversionError, TensorSpec
from tests.conftest import COLD_CONFIG, BrokerProcess, running_broker

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
ONNX_CAP = 1 * MiB
ROOM = 6 * MiB


@pytest.fixture(scope="module")
def small_caps(docker_client, tmp_path_factory) -> Iterator[BrokerProcess]:  # type: ignore[no-untyped-def]
    config = COLD_CONFIG.replace("[sandbox]\n", f"[sandbox]\noutput_bytes = {ROOM}\n")
    config += f"\n[output]\nmax_onnx_bytes = {ONNX_CAP}\n"
    with running_broker(tmp_path_factory.mktemp("small-caps"), config) as proc:
        yield proc


def _linear(path: Path) -> tuple[Path, dict[str, bytes]]:
    """A pickled ``nn.Linear(1024, 1024)``: 4 MiB of weights, over the ONNX cap."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return path, {k: v.detach().numpy().tobytes() for k, v in model.state_dict().items()}


def test_onnx_over_its_cap_is_refused_and_the_same_model_converts_to_safetensors(
        small_caps: BrokerProcess, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    artifact, weights = _linear(tmp_path / "in" / "linear.pt")
    with Client(small_caps.address, retry_attempts=1) as client:
        with pytest.raises(ConversionError) as refused:
            client.convert(artifact, tmp_path / "linear.onnx", target="onnx",
                           inputs=(TensorSpec("x", "float32", (-1, 1024)),))
        assert refused.value.reason == "OUTPUT_TOO_LARGE"
        message = str(refused.value)
        assert f"{ONNX_CAP}-byte cap" in message and "max_onnx_bytes" in message
        assert "safetensors instead" in message
        out = tmp_path / "linear.safetensors"
        result = client.convert(artifact, out, target="safetensors")
    assert result.format == "safetensors" and out.stat().st_size > ONNX_CAP
    got = load_file(str(out))
    assert {k: v.tobytes() for k, v in got.items()} == weights


def test_an_output_over_the_jobs_output_room_is_refused_naming_the_limit(
        small_caps: BrokerProcess, tmp_path: Path) -> None:
    import torch

    # One float stored, 400 MB once made contiguous (safetensors has no strides): far more
    # than the room a checkpoint of a few KiB is given (its data, a quarter, 64 MiB).
    artifact = tmp_path / "expanded.pt"
    torch.save({"w": torch.ones(1).expand(100_000_000)}, artifact)
    with Client(small_caps.address, retry_attempts=1) as client, \
            pytest.raises(ConversionError) as refused:
        client.convert(artifact, tmp_path / "big.safetensors", target="safetensors")
    assert refused.value.reason == "OUTPUT_TOO_LARGE"
    message = str(refused.value)
    assert "output_bytes" in message and "disk_output_bytes" in message
    size = artifact.stat().st_size
    room = size + size // 4 + HEADROOM_BYTES
    assert f"limit {room}" in message  # the worker's own numbers: the room it was given
    assert not (tmp_path / "big.safetensors").exists()

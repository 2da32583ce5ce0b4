"""The RAM spool (issue 13) on the real engine and image: a job whose input fits ``[spool]
ram_bytes`` is spooled in the broker's tmpfs and converted in slots beside it; one over the
budget is spooled on disk and converted in slots prepared there. Both are integrity-verified
and equal their source tensors byte for byte; the audit record says which room each used;
the RAM spool holds nothing once the jobs are done, and is unmounted when the broker stops.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airlock_client import Client
from tests.conftest import IMAGE, BrokerProcess, start_broker

MiB = 1024**2
BUDGET = 16 * MiB


def _mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path)
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


@pytest.fixture(scope="module", params=["runc", "runsc"])
def broker(request, docker_client, tmp_path_factory) -> Iterator[BrokerProcess]:  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp(f"ram-spool-{request.param}")
    config = home / "airlock.toml"
    config.write_text(f"[sandbox]\nimage = {IMAGE!r}\n\n[spool]\nram_bytes = {BUDGET}\n")
    proc = start_broker(home, "--runtime", request.param, "--config", str(config))
    proc.runtime = request.param  # type: ignore[attr-defined]
    yield proc
    code = proc.stop()
    assert code == 0, f"broker exited {code}:\n{proc.log.read_text()[-3000:]}"
    assert not _mounted(proc.state / "ram")  # unmounted at shutdown


def _audit(broker: BrokerProcess, job_id: str) -> dict[str, Any]:
    for line in broker.audit.read_text().splitlines():
        doc = json.loads(line)
        if doc["job_id"] == job_id:
            assert isinstance(doc, dict)
            return doc
    raise AssertionError(f"no audit record for job {job_id}")


def _ram_spool_empty(broker: BrokerProcess, deadline: float = 60.0) -> list[str]:
    """What is left in the RAM spool once the jobs' slots are destroyed (in the background,
    after the answer), polled until nothing or the deadline; warm slots' inputs are empty."""
    ends = time.monotonic() + deadline
    while True:
        left = [str(p) for p in (broker.state / "ram").rglob("artifact")]
        left += [str(p) for p in (broker.state / "ram" / "uploads").iterdir()]
        if not left or time.monotonic() > ends:
            return left
        time.sleep(0.1)


@pytest.mark.parametrize(("layers", "ram"), [(1, True), (5, False)])
def test_an_input_converts_byte_for_byte_from_the_room_its_size_allows(
        broker: BrokerProcess, tmp_path: Path, layers: int, ram: bool) -> None:
    import torch
    from safetensors.torch import load_file

    assert _mounted(broker.state / "ram")
    # 4 MiB of random weights per layer: 4 MiB fits the 16 MiB budget, 20 MiB does not
    weights = {f"layer.{i}.weight": torch.randn(1024, 1024) for i in range(layers)}
    artifact = tmp_path / "shard.pt"
    torch.save(weights, artifact)
    output = tmp_path / "shard.safetensors"
    with Client(broker.address) as client:
        result = client.convert(artifact, output, target="safetensors")
    assert result.assurance == "integrity_verified", result.integrity_note
    got = load_file(str(output))
    assert sorted(got) == sorted(weights)
    assert all(torch.equal(got[name], weights[name]) for name in weights)
    record = _audit(broker, result.job_id)
    size = artifact.stat().st_size
    expected: dict[str, Any] = {"ram": ram, "bytes": size}
    if not ram:
        expected["why"] = "over_budget"
        assert record["warm_container"] is False  # its slots were prepared on disk
    assert record["input_room"] == expected
    # The reading's output was hashed while it was written (output_tail.py), where its
    # sandbox could be given an append-only file: under runc, not gVisor.
    runtime = broker.runtime  # type: ignore[attr-defined]
    assert record["output_hashed"] == ("while_written" if runtime == "runc" else "after")
    assert result.sha256 == hashlib.sha256(output.read_bytes()).hexdigest()
    assert _ram_spool_empty(broker) == []
    assert not any((broker.state / "uploads").iterdir())

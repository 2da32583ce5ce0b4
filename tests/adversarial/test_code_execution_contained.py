"""Threat: an artifact runs code when it is loaded (pickle reduce payloads).

Oracles for each test: a defined outcome with a reason; no host side effect (the canary file
does not appear, the host listener receives nothing); no container left; the broker still
serves a benign job afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversarial import payloads
from tests.adversarial.oracles import (
    Listener,
    Observers,
    assert_still_serves,
    bridge_gateway,
    observers,  # noqa: F401  (fixture)
)
from tests.conftest import BrokerProcess, run_cli

pytestmark = pytest.mark.adversarial


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


def test_reduce_payload_cannot_write_host_files_or_connect_out(
        broker: BrokerProcess, docker_client, listener: Listener, tmp_path: Path) -> None:
    canary = tmp_path / "canary" / "escaped.txt"
    artifact = payloads.malicious_pickle(
        tmp_path / "model.pkl", canary, ports=[listener.port],
        hosts=["127.0.0.1", bridge_gateway(docker_client), "host.docker.internal"])

    done = run_cli("convert", str(artifact), "-o", str(tmp_path / "out.onnx"), "--json",
                   server=broker.address)

    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] in {"rejected", "failed"} and doc["reason"], doc
    assert doc["output"] is None and not (tmp_path / "out.onnx").exists()
    time.sleep(0.5)
    assert not canary.exists(), "the payload wrote a file on the host"
    assert listener.connections == 0, "the payload reached a listener on the host"
    assert_still_serves(broker, tmp_path)


def test_reduce_payload_in_pytorch_checkpoint_is_contained(
        broker: BrokerProcess, docker_client, listener: Listener, tmp_path: Path) -> None:
    canary = tmp_path / "canary.txt"
    source = payloads.escape_attempt_source(canary, [listener.port],
                                            ["127.0.0.1", bridge_gateway(docker_client)])
    artifact = payloads.malicious_torch_zip(tmp_path / "model.pt", source)

    done = run_cli("convert", str(artifact), "--json", server=broker.address)

    assert done.returncode == 1, done.stdout + done.stderr
    assert json.loads(done.stdout)["reason"]
    assert not canary.exists() and listener.connections == 0
    assert_still_serves(broker, tmp_path)


def test_safe_only_policy_refuses_to_unpickle(broker: BrokerProcess, listener: Listener,
                                              tmp_path: Path) -> None:
    canary = tmp_path / "canary.txt"
    artifact = payloads.malicious_pickle(tmp_path / "m.pkl", canary, [listener.port],
                                         ["127.0.0.1"])
    done = run_cli("convert", str(artifact), "--policy", "safe_only", "--json",
                   server=broker.address)
    assert done.returncode == 1
    doc = json.loads(done.stdout)
    assert (doc["status"], doc["reason"]) == ("rejected", "POLICY_VIOLATION"), doc


def test_payload_that_sleeps_forever_ends_at_the_deadline(broker: BrokerProcess,
                                                          tmp_path: Path) -> None:
    artifact = payloads.sleeper_pickle(tmp_path / "sleepy.pkl")
    began = time.monotonic()
    done = run_cli("convert", str(artifact), "--timeout", "8", "--json", server=broker.address)
    elapsed = time.monotonic() - began
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert (doc["status"], doc["reason"]) == ("failed", "SANDBOX_TIMEOUT"), doc
    assert elapsed < 8 + 30, f"deadline of 8 s took {elapsed:.1f} s to enforce"
    assert_still_serves(broker, tmp_path)


def test_a_hostile_shard_loaded_with_code_allowed_runs_only_in_its_sandbox(
        broker: BrokerProcess, observers: Observers, tmp_path: Path) -> None:  # noqa: F811
    """A model directory asked for ``allow_code`` (the default refuses such a shard before
    its code runs): the hostile shard's payload does run, in that shard's sandbox, and
    reaches nothing on the host; the directory converts, says which shard ran code, and its
    tensors are the source's byte for byte."""
    from tests.fixtures import hf_models

    model = hf_models.make_sharded(tmp_path / "tiny", shards=3, extras=False)
    bad = "pytorch_model-00002-of-00003.bin"
    hf_models.add_code_entry(model.path / bad, payloads.escape_attempt_source(
        observers.escape_target, [observers.tcp.port], observers.hosts))
    out = tmp_path / "out"
    done = run_cli("convert", str(model.path), "-o", str(out), "--policy", "allow_code",
                   "--json", server=broker.address, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["shards_that_ran_code"] == [bad], doc
    ran = {s["source"]: s["executed_artifact_code"] for s in doc["shards"]}
    assert ran == {name: name == bad for name in model.shards}, ran
    observers.assert_untouched()
    import torch
    from safetensors.torch import load_file

    got = {k: v for s in doc["shards"] for k, v in load_file(s["output"]).items()}
    for name, want in model.expected.items():
        if name not in model.tied:  # a tied name is the tensor it was tied to
            raw = got[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert raw == want.tobytes(), name
    assert_still_serves(broker, tmp_path)

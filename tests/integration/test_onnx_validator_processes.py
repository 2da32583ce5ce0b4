"""ONNX outputs are validated in the broker's validator processes, not the broker itself: a
normal conversion still returns the same canonical, validated model, validators are replaced
after their job budget, and none outlives the broker."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from airlock_broker.validation import OutputLimits, validate_onnx_bytes
from airlock_client import Client
from tests.conftest import IMAGE, start_broker
from tests.fixtures import models

pytestmark = pytest.mark.integration


def validator_pids(broker_pid: int) -> set[int]:
    """The broker's children that are ONNX validator processes."""
    children: set[int] = set()
    for task in Path(f"/proc/{broker_pid}/task").iterdir():
        text = (task / "children").read_text()
        children.update(int(p) for p in text.split())
    found = set()
    for pid in children:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"airlock_broker.validation.onnx_worker" in cmdline:
            found.add(pid)
    return found


def test_conversion_returns_the_validated_canonical_onnx(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    # One job per validator: every conversion is served by a fresh process.
    config.write_text(f"[sandbox]\nimage = {IMAGE!r}\n\n"
                      "[onnx_validator]\nprocesses = 2\nmax_jobs_per_process = 1\n")
    broker = start_broker(tmp_path, "--config", str(config))
    try:
        before = validator_pids(broker.process.pid)
        assert len(before) == 2, "the broker did not start its validator processes"
        artifact, check = models.make_sklearn_pickle(tmp_path / "in")
        outputs = []
        with Client(broker.address) as client:
            for i in range(2):
                output = tmp_path / f"out{i}.onnx"
                result = client.convert(artifact, output)
                data = output.read_bytes()
                assert result.format == "onnx"
                assert result.sha256 == hashlib.sha256(data).hexdigest()
                outputs.append(data)
        after = validator_pids(broker.process.pid)
    finally:
        code = broker.stop()
    assert code == 0, broker.log.read_text()[-3000:]

    want = check.model.predict_proba(check.sample)
    for data in outputs:
        # What arrived is the validator's canonical form: validating it again changes nothing.
        canonical, info = validate_onnx_bytes(data, OutputLimits())
        assert canonical == data
        assert info.producer_name == "skl2onnx"
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: check.sample})
        names = [o.name for o in session.get_outputs()]
        np.testing.assert_allclose(got[names.index("probabilities")], want, atol=1e-5, rtol=0)

    assert len(after) == 2 and not after & before, "validators were not replaced after a job"
    left = [p for p in before | after if Path(f"/proc/{p}").exists()]
    assert left == [], f"validator processes outlived the broker: {left}"

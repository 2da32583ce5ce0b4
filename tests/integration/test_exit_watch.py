"""The broker learns of a success by freezing the container after the worker says so, of a
clean exit from the kernel (a pidfd on the container's init), and of anything else from the
engine; the verdicts and outputs are the same on every path.

"Nothing runs once the output is read" is proved by the adversarial test in which a setsid
grandchild keeps rewriting the output after the worker is done
(tests/adversarial/test_hostile_text_and_races.py), and by tests/unit/test_freezer.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from airlock_client import Client, ConversionError
from tests.conftest import IMAGE, BrokerProcess, start_broker
from tests.fixtures import models

pytestmark = pytest.mark.integration


def _audit(broker: BrokerProcess, job_id: str) -> dict[str, Any]:
    """The job's audit record (written as the handler ends, just after the client's answer)."""
    deadline = time.monotonic() + 10
    while True:
        lines = (broker.spool / "audit.jsonl").read_text().splitlines()
        found = [r for r in map(json.loads, lines) if r.get("job_id") == job_id]
        if found or time.monotonic() > deadline:
            [record] = found
            return record
        time.sleep(0.05)


def _convert(broker: BrokerProcess, artifact: Path, output: Path) -> str:
    with Client(broker.address) as client:
        return client.convert(artifact, output).job_id


def _predict(model: Path, sample: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, {session.get_inputs()[0].name: sample})]


def test_a_success_is_frozen_and_a_failure_seen_by_the_engine(
        broker: BrokerProcess, tmp_path: Path) -> None:
    artifact, _ = models.make_sklearn_pickle(tmp_path / "in")
    # A freeze gets 0.1 s before the broker falls back to the death (the kernel's or the
    # engine's word): on a very loaded machine that can pass, so a few tries must see the
    # freezer's.
    seen = []
    for attempt in range(5):
        job_id = _convert(broker, artifact, tmp_path / f"out{attempt}.onnx")
        record = _audit(broker, job_id)
        assert record["runtime"] == "runc"
        assert record["exit_code"] == 0
        seen.append(record["exit_seen_by"])
        if seen[-1] == "freezer":
            break
    assert seen[-1] == "freezer" and set(seen) <= {"freezer", "kernel", "engine"}, seen

    artifact, _ = models.make_state_dict(tmp_path / "sd")
    with Client(broker.address) as client, pytest.raises(ConversionError) as info:
        client.convert(artifact, tmp_path / "x.onnx", target="onnx")
    record = _audit(broker, info.value.job_id)
    assert record["exit_code"] not in (0, None)
    assert record["exit_seen_by"] == "engine"


@pytest.mark.parametrize("watch", ["pidfd", "engine"])
def test_the_other_paths_give_the_same_output(broker: BrokerProcess, tmp_path: Path,
                                              watch: str) -> None:
    artifact, check = models.make_sklearn_pickle(tmp_path / "in")
    assert check.sample is not None
    _convert(broker, artifact, tmp_path / "frozen.onnx")
    config = tmp_path / f"{watch}.toml"
    # Its jobs are sklearn pickles (conversion, then the policy loader's reading): the warm
    # path as before, without warm torch and light containers no job here takes.
    config.write_text(f'[sandbox]\nimage = "{IMAGE}"\nexit_watch = "{watch}"\n\n'
                      f'[pools]\nprofiles = ["sklearn"]\nstream_window_seconds = 0\n')
    (tmp_path / watch).mkdir()
    other = start_broker(tmp_path / watch, "--config", str(config))
    try:
        # The pidfd path leaves a clean exit to the engine when the shim has not reaped it in
        # time (a stuck shim, or a very loaded machine): a few tries must see the kernel's.
        seen = []
        for _ in range(5 if watch == "pidfd" else 1):
            job_id = _convert(other, artifact, tmp_path / f"{watch}.onnx")
            seen.append(_audit(other, job_id)["exit_seen_by"])
            if seen[-1] != "engine":
                break
        expected = "kernel" if watch == "pidfd" else "engine"
        assert seen[-1] == expected, seen
        assert set(seen) <= {"kernel", "engine"}, seen
    finally:
        assert other.stop() == 0
    # (The ONNX bytes differ run to run: skl2onnx names nodes uniquely per process.)
    for frozen, seen in zip(_predict(tmp_path / "frozen.onnx", check.sample),
                            _predict(tmp_path / f"{watch}.onnx", check.sample), strict=True):
        np.testing.assert_array_equal(frozen, seen)

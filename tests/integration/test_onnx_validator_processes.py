"""ONNX outputs are validated in the broker's validator processes, not the broker itself: a
normal conversion still returns the same canonical, validated model, each validator serves one
conversion, sees none of the broker's files (an empty root, a uid of its own), and none
outlives the broker."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from airlock_broker.validation import OutputLimits, validate_onnx_bytes
from airlock_client import Client
from tests.conftest import IMAGE, start_broker
from tests.fixtures import models

pytestmark = pytest.mark.integration


def children(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.update(int(p) for p in (task / "children").read_text().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def validator_pids(broker_pid: int) -> set[int]:
    """ONNX validator processes under the broker (its children or their children) that are
    ready to validate (their seccomp filter is on) or validating."""
    found = set()
    for pid in children(broker_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):  # gone since it was listed
            continue
        if b"airlock_broker.validation.onnx_worker" in cmdline:
            found.update(p for p in {pid} | children(pid) if status(p).get("Seccomp") == "2")
    return found


def status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):  # a validator ends after its one job:
        return {}  # its /proc entry goes as it is read (ESRCH), or before
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def wait_for_validators(broker_pid: int, count: int, exclude: set[int]) -> set[int]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = validator_pids(broker_pid) - exclude
        if len(found) >= count:
            return found
        time.sleep(0.05)
    seen = {p: (status(p).get("Seccomp"), status(p).get("Uid")) for p in children(broker_pid)}
    raise AssertionError(f"fewer than {count} validators under a seccomp filter after 120 s; "
                         f"the broker's children (Seccomp, Uid): {seen}")


def test_conversion_returns_the_validated_canonical_onnx(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    # Cold containers only: the test is about the validators, and warm pools would start a
    # container for each profile that no job here uses.
    config.write_text(f"[sandbox]\nimage = {IMAGE!r}\n\n[onnx_validator]\nprocesses = 2\n\n"
                      "[pools]\nmin_warm = 0\n")
    broker = start_broker(tmp_path, "--config", str(config))
    try:
        before = wait_for_validators(broker.process.pid, 2, set())
        assert len(before) == 2, "the broker did not start its validator processes"
        spool = str(tmp_path)
        for pid in before:
            # Its own uid, and an empty read-only root: nothing of the broker's state is there.
            assert status(pid)["Uid"].split() == ["64998"] * 4
            mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            assert len(mounts) == 1 and " / / ro," in mounts[0] and " - tmpfs " in mounts[0], \
                mounts
            assert spool not in "\n".join(mounts)
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
        after = wait_for_validators(broker.process.pid, 2, before)
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

    assert len(after) == 2 and not after & before, "a validator served a second job"
    left = [p for p in before | after if Path(f"/proc/{p}").exists()]
    assert left == [], f"validator processes outlived the broker: {left}"

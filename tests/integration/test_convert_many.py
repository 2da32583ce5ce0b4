"""``Client.convert_many``: many artifacts from one client, a bounded number at a time, one
outcome per artifact, against the real broker, engine and image (issue #15: "the client
library gets a batch helper")."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from airlock_client import Client, ConversionError
from airlock_client._batch_jobs import FALLBACK_JOBS, MAX_DEFAULT_JOBS
from tests.conftest import BrokerProcess
from tests.fixtures import models

pytestmark = pytest.mark.integration


class CountingClient(Client):
    """Counts the conversions in flight at once (each ``convert`` call is one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0

    def convert(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return super().convert(*args, **kwargs)
        finally:
            with self._lock:
                self.in_flight -= 1


def test_every_artifact_gets_its_own_outcome_and_a_failure_stops_no_other(
        broker: BrokerProcess, tmp_path: Path) -> None:
    pairs: list[tuple[Path, Path]] = []
    checks = {}
    for i in range(5):
        artifact, check = models.make_sklearn_pickle(tmp_path / f"m{i}")
        pairs.append((artifact, tmp_path / f"m{i}.onnx"))
        checks[artifact] = check
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00not a model at all\xff" * 64)
    pairs.insert(2, (junk, tmp_path / "junk.onnx"))

    with CountingClient(broker.address) as client:
        with contextlib.closing(client.convert_many(iter(pairs), jobs=2, target="onnx")) as batch:
            outcomes = {done.item[0]: done for done in batch}
        assert client.most_in_flight <= 2

    assert set(outcomes) == {artifact for artifact, _ in pairs}
    failed = outcomes.pop(junk)
    assert isinstance(failed.error, ConversionError) and failed.result is None
    assert failed.error.reason, "a failure carries the broker's reason code"
    assert not (tmp_path / "junk.onnx").exists()
    for artifact, done in outcomes.items():
        assert done.ok, f"{artifact}: {done.error}"
        assert done.result is not None and done.result.format == "onnx"
        output = done.item[1]
        assert done.result.sha256 and output.is_file()
        check = checks[artifact]
        assert check.sample is not None
        session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        got = session.run(None, {session.get_inputs()[0].name: check.sample})
        np.testing.assert_allclose(np.asarray(got[names.index("probabilities")]),
                                   check.model.predict_proba(check.sample),
                                   rtol=1e-4, atol=1e-5)


def test_the_default_concurrency_is_what_the_broker_runs_at_once(broker: BrokerProcess) -> None:
    assert broker.socket is not None
    with Client(f"unix:{broker.socket}") as operator:  # root on its socket: the admin role
        runs = operator.max_concurrent_jobs()
        assert runs > 0
        assert operator.default_jobs() == min(runs, MAX_DEFAULT_JOBS)
    with Client(broker.address) as anonymous:  # may not read the pool status
        assert anonymous.default_jobs() == FALLBACK_JOBS
        with pytest.raises(ValueError, match="jobs must be between 1 and"):
            anonymous.convert_many([], jobs=0)  # at once, not on the first next()

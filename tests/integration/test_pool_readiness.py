"""Pool status tells warm containers still importing from ready ones, against the real engine
and image: a fresh warm container reports ready once its worker has warmed up, and the mark
it leaves never reaches a job's output (the broker would refuse an extra file beside it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airlock_client import PoolStatus
from tests.conftest import IMAGE
from tests.fixtures import models
from tests.integration import pool_helpers as ph

pytestmark = pytest.mark.integration

#: Generous: a sklearn worker imports for 1-2 s on a quiet machine, far longer on a loaded one.
READY_SECONDS = 240.0


def _sklearn(broker: ph.PoolBroker, seen: list[PoolStatus]) -> PoolStatus:
    status = broker.status()["sklearn"]
    seen.append(status)
    return status


def _ready(broker: ph.PoolBroker, seen: list[PoolStatus]) -> PoolStatus:
    return ph.wait_for(
        lambda: (s if (s := _sklearn(broker, seen)).warm == 1 and s.ready == 1 else None),
        READY_SECONDS, "a ready warm sklearn container",
        lambda: f"last status: {seen[-1] if seen else None}\n{broker.log_tail()}")


def test_a_fresh_warm_container_reports_ready_and_its_mark_is_no_output(
        docker_client: Any, tmp_path: Path) -> None:
    config = ph.write_config(tmp_path, {"min_warm": 1, "max_warm": 1,
                                        "profiles": ["sklearn"]}, sandbox={"image": IMAGE})
    seen: list[PoolStatus] = []
    with ph.running_broker(tmp_path, config, docker_client) as broker:
        _ready(broker, seen)
        first = ph.idle_warm_ids(docker_client, broker, "sklearn")
        assert len(first) == 1

        artifact, _ = models.make_sklearn_pickle(tmp_path / "models")
        result = broker.client.convert(artifact, tmp_path / "out.onnx")
        assert result.format == "onnx" and result.output.stat().st_size > 0
        assert result.report.parity and all(p.passed for p in result.report.parity)

        # A fresh container: importing (or already done) first, then ready on its own word.
        broker.client.restart_pools("sklearn")
        seen.clear()
        _ready(broker, seen)
        fresh = ph.idle_warm_ids(docker_client, broker, "sklearn")
        assert len(fresh) == 1 and fresh != first
        for status in seen:  # the split always adds up to the warm containers
            assert status.importing + status.ready == status.warm, status
        status = broker.status()["sklearn"]
        assert status.served_warm >= 1 and status.served_cold == 0

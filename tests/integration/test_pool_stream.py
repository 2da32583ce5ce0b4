"""A pool keeps up with a steady stream of jobs (pool_demand.py), against the real engine and
image: once the broker has seen the stream for a while, no job takes the cold path, though
every one of them arrives before the container the previous job took has been replaced.

Read from the broker's own metrics (``airlock_pool_events``), never from timings. The jobs
are the light profile's (.npy -> safetensors), the cheapest container start there is: the
pool logic is the same for every profile, and the machine these tests share stays usable.
A job that finds no warm container goes cold at once (``wait_for_starting_seconds = 0``), so
each miss shows."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from airlock_client import Client
from tests.conftest import IMAGE, free_port, start_broker
from tests.fixtures import models
from tests.integration import pool_helpers as ph

pytestmark = pytest.mark.integration

#: One job a second: faster than a light container is replaced on this machine under load
#: (its start and imports, 1-3 s), slow enough not to take the machine from its other tenants.
INTERVAL_SECONDS = 1.0
WARM_UP_JOBS = 20
MEASURED_JOBS = 20
STREAM = {"min_warm": 1, "max_warm": 6, "max_starting": 2, "profiles": ["light"],
          "wait_for_starting_seconds": 0.0, "defer_replacement": False,
          "stream_window_seconds": 15.0}


def _metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == want:
            return float(match.group(2))
    raise AssertionError(f"{name}{{{want}}} not in the broker's metrics")


def _stream(client: Client, artifact: Path, out: Path, jobs: int, first: int) -> None:
    """``jobs`` conversions, one started every INTERVAL_SECONDS whatever the others do."""
    lock = threading.Lock()
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            result = client.convert(artifact, out / f"{first + i}.safetensors")
            assert result.format == "safetensors"
        except BaseException as exc:
            with lock:
                errors.append(exc)

    began = time.monotonic()
    futures: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for i in range(jobs):
            time.sleep(max(0.0, began + i * INTERVAL_SECONDS - time.monotonic()))
            futures.append(pool.submit(one, i))
    assert not errors, errors[0]


def test_a_steady_stream_finds_a_warm_container_after_warm_up(
        docker_client: Any, tmp_path: Path) -> None:
    config = ph.write_config(tmp_path, STREAM, sandbox={"image": IMAGE})
    port = free_port()
    metrics = f"http://127.0.0.1:{port}/metrics"
    proc = start_broker(tmp_path, "--config", str(config), "--metrics", f"127.0.0.1:{port}")
    client = Client(proc.unix_address, retry_attempts=1)
    artifact, _ = models.make_npy(tmp_path / "models")
    out = tmp_path / "out"
    out.mkdir()
    try:
        ph.wait_for(lambda: _metric(metrics, "airlock_pool_containers", profile="light",
                                    state="warm") >= 1, 240.0, "a warm light container")
        _stream(client, artifact, out, WARM_UP_JOBS, 0)
        cold_after_warm_up = _metric(metrics, "airlock_pool_events", profile="light",
                                     event="served_cold")
        target = _metric(metrics, "airlock_pool_target_warm", profile="light")
        assert target > 1, f"the stream did not raise the pool's target ({target})"

        _stream(client, artifact, out, MEASURED_JOBS, WARM_UP_JOBS)
        cold = _metric(metrics, "airlock_pool_events", profile="light", event="served_cold")
        warm = _metric(metrics, "airlock_pool_events", profile="light", event="served_warm")
        refill = _metric(metrics, "airlock_pool_refill_seconds", profile="light")
        assert cold == cold_after_warm_up, (
            f"{cold - cold_after_warm_up:g} of {MEASURED_JOBS} jobs took the cold path after "
            f"warm-up (target {target:g}, refill {refill:g} s); {client.pool_status()}")
        assert warm + cold == WARM_UP_JOBS + MEASURED_JOBS
    finally:
        client.close()
        code = proc.stop()
        assert code == 0, proc.log.read_text()[-3000:]
    assert ph.containers_of(docker_client, ph.broker_identity(proc.process.pid)) == []

"""Admission under load: a burst far beyond capacity is served or refused cleanly."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from airlock_client import Client, ConversionError, ServiceUnavailable
from tests.conftest import assert_no_sandbox_left, spool_dirs, start_broker
from tests.fixtures import models

pytestmark = pytest.mark.integration

BURST = 200


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_burst_of_200_is_converted_or_refused_with_busy(docker_client, tmp_path: Path) -> None:
    config = tmp_path / "airlock.toml"
    # One caller (anonymous) sends the whole burst: this is about the broker's places, so
    # the per-principal cap (default 2 + 8/2) is lifted to all of them.
    config.write_text("[broker]\nmax_concurrent_jobs = 2\nmax_queued_jobs = 8\n"
                      "max_jobs_per_principal = 10\n"
                      "[pools]\nmin_warm = 2\nprofiles = [\"light\"]\nmax_starting = 2\n")
    proc = start_broker(tmp_path, "--config", str(config))
    artifact, _ = models.make_npy(tmp_path / "in")
    outcomes: list[str] = []
    lock = threading.Lock()
    go = threading.Event()

    def one(i: int) -> None:
        go.wait(30)
        try:
            with Client(proc.address, retry_attempts=1, wait_when_busy=False) as client:
                client.convert(artifact, tmp_path / f"out-{i}.safetensors")
            result = "ok"
        except (ConversionError, ServiceUnavailable) as exc:
            result = exc.reason
        with lock:
            outcomes.append(result)

    try:
        rss_before = _rss_mib(proc.process.pid)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(300)
        assert len(outcomes) == BURST, "some calls never returned"
        assert set(outcomes) <= {"ok", "BUSY"}, sorted(set(outcomes))
        assert outcomes.count("ok") >= 10 and outcomes.count("BUSY") >= 100, (
            outcomes.count("ok"), outcomes.count("BUSY"))
        assert _rss_mib(proc.process.pid) < rss_before + 100, "broker memory grew unbounded"
        converted = list(tmp_path.glob("out-*.safetensors"))
        assert len(converted) == outcomes.count("ok")
        assert_no_sandbox_left(docker_client)
    finally:
        assert proc.stop() == 0
    leftovers = [p for sub in ("uploads", "slots") for d in spool_dirs(proc.spool, sub)
                 if d.exists() for p in d.iterdir()]
    assert leftovers == []

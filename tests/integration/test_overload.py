"""Overload slows callers down instead of failing them (issue #11, 3b).

A broker whose every place is taken refuses with BUSY and says how long to wait; the client
waits (telling the CLI's user so) and tries again until its own deadline. The places are held
by slow jobs (artifacts that sleep in their sandbox) until the test lets them go, so that the
broker is full for as long as the test needs, on any machine, however busy: thirty CLIs
starting at once can take minutes here before the first reaches the broker.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_client import Client, ConversionError
from tests.adversarial.payloads import sleeper_pickle
from tests.conftest import AIRLOCK, IMAGE, BrokerProcess, assert_no_sandbox_left, start_broker
from tests.fixtures import models

pytestmark = pytest.mark.integration

CALLERS = 30
RUNNING = 2
QUEUED = 2
WAITING_LINE = "waiting for a sandbox (queue "


@pytest.fixture(scope="module")
def small_broker(docker_client, tmp_path_factory) -> Iterator[BrokerProcess]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("overload")
    config = tmp / "airlock.toml"
    config.write_text(f"[broker]\nmax_concurrent_jobs = {RUNNING}\nmax_queued_jobs = {QUEUED}\n"
                      # every caller here is the one anonymous principal: its own cap
                      # (by default below the broker's places) must not be what refuses
                      f"max_jobs_per_principal = {RUNNING + QUEUED}\n"
                      "[pools]\nmin_warm = 2\nprofiles = [\"light\"]\nmax_starting = 2\n"
                      f"[sandbox]\nimage = {IMAGE!r}\n")
    proc = start_broker(tmp, "--config", str(config))
    yield proc
    assert proc.stop() == 0, proc.log.read_text()[-3000:]


def _refused_busy(address: str) -> bool:
    """Whether a new job would be refused now (a raw call: no client retries in the way)."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ConversionServiceStub(channel)
        try:
            list(stub.Convert(iter([pb.ConvertRequest(metadata=pb.ConvertMetadata())]),
                              timeout=30))
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return False


@contextlib.contextmanager
def every_place_held(address: str, tmp: Path) -> Iterator[None]:
    """Slow jobs in every place (``RUNNING`` asleep in a sandbox, ``QUEUED`` waiting for one)
    until the block ends; then they are cancelled and the broker kills their sandboxes."""
    data = sleeper_pickle(tmp / "slow.pkl", seconds=600).read_bytes()
    meta = pb.ConvertMetadata(size_bytes=len(data), filename="slow.pkl", timeout_seconds=600)
    requests = [pb.ConvertRequest(metadata=meta),
                pb.ConvertRequest(chunk=pb.Chunk(data=data, crc32=zlib.crc32(data)))]
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.ConversionServiceStub(channel)
    calls = [stub.Convert(iter(requests), timeout=900) for _ in range(RUNNING + QUEUED)]
    try:
        deadline = time.monotonic() + 120
        while not _refused_busy(address):
            ended = [(call.code(), call.details()) for call in calls if call.done()]
            assert time.monotonic() < deadline, f"the slow jobs never filled the broker: {ended}"
            # A slow job can be refused BUSY while the previous test's cancelled jobs still
            # hold their places, or while this loop's own probe holds one for a moment: it
            # holds nothing then, so send it again rather than wait for a full broker forever.
            calls = [stub.Convert(iter(requests), timeout=900) if call.done() else call
                     for call in calls]
            time.sleep(0.2)
        yield
    finally:
        for call in calls:
            call.cancel()
        channel.close()


def test_a_caller_whose_deadline_is_shorter_than_the_wait_gets_busy_with_the_estimate(
        small_broker: BrokerProcess, tmp_path: Path) -> None:
    artifact, _ = models.make_npy(tmp_path / "in")
    with every_place_held(small_broker.address, tmp_path):
        began = time.monotonic()
        with Client(small_broker.address, timeout=5) as client, \
                pytest.raises(ConversionError) as info:
            client.convert(artifact, tmp_path / "out.safetensors")
        took = time.monotonic() - began
    err = info.value
    assert err.reason == "BUSY" and "retry in about" in err.message, err.message
    estimate = getattr(err, "retry_after", None)
    assert estimate is not None and estimate >= 1, err.message
    assert f"retry in about {estimate:.0f} s" in err.message
    assert getattr(err, "queued", None) == QUEUED  # the slow jobs that wait for a sandbox
    # It never waited past its deadline (on a fresh broker the first estimate, 7.5 s, is
    # beyond it, and it gives up at once; tests/unit/test_retry.py pins that exactly).
    assert took < 5, took
    assert not (tmp_path / "out.safetensors").exists()


def test_thirty_concurrent_cli_conversions_wait_for_a_sandbox_and_all_succeed(
        small_broker: BrokerProcess, docker_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    artifact, _ = models.make_npy(tmp_path / "in")
    env = {**os.environ, "AIRLOCK_SERVER": small_broker.address}
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    try:
        with every_place_held(small_broker.address, tmp_path):
            for i in range(CALLERS):
                out, err = tmp_path / f"stdout-{i}", tmp_path / f"stderr-{i}"
                with out.open("wb") as stdout, err.open("wb") as stderr:
                    procs.append((subprocess.Popen(
                        [AIRLOCK, "convert", str(artifact), "-o",
                         str(tmp_path / f"out-{i}.safetensors"), "--json"],
                        stdout=stdout, stderr=stderr, env=env), out, err))
            # The broker stays full until a caller has said it is waiting (or all gave up).
            deadline = time.monotonic() + 540
            while not any(WAITING_LINE in err.read_text() for _, _, err in procs):
                assert any(p.poll() is None for p, _, _ in procs), "every caller gave up"
                assert time.monotonic() < deadline, "no caller ever waited"
                time.sleep(0.2)
        for proc, _, _ in procs:
            proc.wait(900)
        failed = [(i, p.returncode, err.read_text()[-500:]) for i, (p, _, err) in
                  enumerate(procs) if p.returncode != 0]
        assert failed == [], failed
        docs = [json.loads(out.read_text()) for _, out, _ in procs]
        assert {d["status"] for d in docs} == {"ok"}
        assert len(list(tmp_path.glob("out-*.safetensors"))) == CALLERS
        assert_no_sandbox_left(docker_client)  # the slow jobs' too
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)

"""Lifecycle: a cancelled call kills its sandbox at once; SIGTERM drains gracefully."""

from __future__ import annotations

import signal
import threading
import time
import zlib
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_client import Client
from tests.adversarial import payloads
from tests.conftest import (
    IMAGE,
    BrokerProcess,
    assert_no_sandbox_left,
    job_containers,
    spool_dirs,
    start_broker,
)

pytestmark = pytest.mark.integration


def _busy_containers(docker_client) -> list[str]:  # type: ignore[no-untyped-def]
    return job_containers(docker_client)


def _wait(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_cancelled_call_kills_its_sandbox_at_once(broker: BrokerProcess, docker_client,
                                                  tmp_path: Path) -> None:
    data = payloads.reduce_pickle("import time\ntime.sleep(600)")
    requests = [pb.ConvertRequest(metadata=pb.ConvertMetadata(size_bytes=len(data))),
                pb.ConvertRequest(chunk=pb.Chunk(data=data, crc32=zlib.crc32(data)))]
    with grpc.insecure_channel(broker.address) as channel:
        call = pb_grpc.ConversionServiceStub(channel).Convert(iter(requests), timeout=300)
        _wait(lambda: _busy_containers(docker_client) != [])  # the job is running
        began = time.monotonic()
        call.cancel()
        assert_no_sandbox_left(docker_client)
        # "At once" against the payload's 600 s; the window also holds the refill's start.
        assert time.monotonic() - began < 60
    # and the broker still serves
    artifact = payloads.fake_success_pickle(tmp_path / "ok.pkl")
    with Client(broker.address) as client:
        assert client.convert(artifact, tmp_path / "o.safetensors").format == "safetensors"


def test_sigterm_finishes_jobs_in_flight_then_removes_everything(docker_client,
                                                                 tmp_path: Path) -> None:
    # The payload's job runs two sandboxes one after the other (the policy reading refuses
    # its globals, then the full load): on a busy machine that can exceed the default 30 s
    # grace. What is tested is that the broker waits for it, so the grace is generous; and
    # the drain (health NOT_SERVING, new jobs refused) is the default's, as in production.
    config = tmp_path / "broker.toml"
    # Pools: the payload's sandboxes are sklearn ones; the light pool's idle warm container is
    # there at the signal (the sklearn one is the job's), and must be removed too. No torch.
    config.write_text(f'[broker]\nshutdown_grace_seconds = 180\nshutdown_drain_seconds = 2.0\n\n'
                      f'[sandbox]\nimage = "{IMAGE}"\n\n'
                      f'[pools]\nprofiles = ["sklearn", "light"]\nstream_window_seconds = 0\n')
    proc = start_broker(tmp_path, "--config", str(config))
    try:
        artifact = payloads.fake_success_pickle(tmp_path / "slow.pkl", sleep_seconds=5)
        outcome: dict[str, object] = {}

        def convert() -> None:
            with Client(proc.address) as client:
                try:
                    outcome["result"] = client.convert(artifact, tmp_path / "o.safetensors")
                except Exception as exc:
                    outcome["error"] = exc

        worker = threading.Thread(target=convert)
        worker.start()
        # The job must be admitted before the signal: a warm container still starting also
        # counts as busy, so wait for the job's own log line too.
        _wait(lambda: _busy_containers(docker_client) != []
              and " bytes sha256=" in proc.log.read_text(errors="replace"))
        with grpc.insecure_channel(proc.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            # Watched, not polled: NOT_SERVING shows only for the 2 s drain, which a busy
            # machine can let pass between two polls.
            watch = health.Watch(request, timeout=120)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            proc.process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # a new job is refused while the broker drains
            refused = payloads.fake_success_pickle(tmp_path / "late.pkl")
            with Client(proc.address, retry_attempts=1) as client, pytest.raises(Exception) as info:
                client.convert(refused, tmp_path / "late.out")
            assert getattr(info.value, "reason", "") in {"SANDBOX_UNAVAILABLE", "UNAVAILABLE"}
        worker.join(60)
        assert "error" not in outcome, outcome
        assert proc.process.wait(60) == 0
    finally:
        proc.stop()
    mine = [c for c in docker_client.api.containers(all=True, filters={"label": "airlock.broker"})
            if c["Labels"]["airlock.broker"].split(":")[1] == str(proc.process.pid)]
    assert mine == []
    assert [p for slots in spool_dirs(proc.spool, "slots") if slots.exists()
            for p in slots.iterdir()] == []


def test_stalled_upload_ends_at_the_idle_deadline(docker_client, tmp_path: Path) -> None:
    config = tmp_path / "airlock.toml"
    config.write_text("[broker]\nupload_idle_seconds = 2\n[pools]\nmin_warm = 0\n")
    proc = start_broker(tmp_path, "--config", str(config))
    stalled = threading.Event()

    def requests():  # type: ignore[no-untyped-def]
        data = b"\x80\x04\x95" + b"\0" * 100
        yield pb.ConvertRequest(metadata=pb.ConvertMetadata(size_bytes=10_000))
        yield pb.ConvertRequest(chunk=pb.Chunk(data=data, crc32=zlib.crc32(data)))
        stalled.wait(30)  # a client that stops sending without closing the stream

    try:
        with grpc.insecure_channel(proc.address) as channel:
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                list(pb_grpc.ConversionServiceStub(channel).Convert(requests(), timeout=60))
            stalled.set()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - began < 20
        _wait(lambda: all(not d.exists() or list(d.iterdir()) == []
                          for d in spool_dirs(proc.spool, "uploads")), timeout=10)
    finally:
        stalled.set()
        assert proc.stop() == 0

"""The engine goes away and comes back: health, pool status and admission follow, pools refill.

The fake sandbox stands in for the engine (its ``unavailable`` flag); the real engine is
stopped in tests/integration/test_faults.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.jobs import judge
from airlock_broker.errors import Reason
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.sandboxes.sandbox import Outcome
from airlock_client import Client, ServiceUnavailable
from tests.unit.fakes import FakeSandbox, running_broker
from tests.unit.test_broker import PICKLE, write_safetensors

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _wait(cond, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_outage_flips_health_refuses_with_the_reason_and_recovery_refills(
        tmp_path: Path) -> None:
    config = BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "spool",
                          selftest_on_start=False, unix_socket=tmp_path / "run" / "broker.sock",
                          pools=PoolSettings(min_warm=1, profiles=("sklearn",),
                                             engine_check_seconds=0.05))
    backend = FakeSandbox(config.spool_root, write_safetensors)
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    with running_broker(config, backend) as broker, \
            grpc.insecure_channel(f"127.0.0.1:{broker.port}") as channel, \
            Client(f"unix:{config.unix_socket}", retry_attempts=1) as client:  # root: admin
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return int(health.Check(health_pb2.HealthCheckRequest(), timeout=5).status)

        _wait(lambda: client.pool_status()[0].warm == 1)
        assert status() == SERVING and client.pool_status()[0].unavailable == ""

        backend.unavailable = True  # the engine stops
        _wait(lambda: status() == NOT_SERVING)
        why = client.pool_status()[0].unavailable
        assert "fake engine is down" in why
        prepared = backend.prepared
        with pytest.raises(ServiceUnavailable) as info:
            client.convert(src, tmp_path / "out.safetensors")
        assert info.value.reason == "SANDBOX_UNAVAILABLE" and "fake engine is down" in str(
            info.value)
        assert backend.prepared == prepared  # refused at once, not after a failed start

        backend.unavailable = False  # the engine is back
        backend.dead |= backend.live  # and, as after a real restart, the warm ones are dead
        _wait(lambda: status() == SERVING)
        _wait(lambda: client.pool_status()[0].warm == 1 and backend.prepared > prepared)
        assert client.pool_status()[0].unavailable == ""
        result = client.convert(src, tmp_path / "out.safetensors")
        assert result.format == "safetensors"


def test_a_kill_recorded_by_the_engine_is_sandbox_killed_not_a_conversion_failure() -> None:
    killed = Outcome(exit_code=137, oom_killed=False, timed_out=False, duration_seconds=1,
                     image_id="", runtime="runc", killed_by="signal 9 sent through the engine")
    with pytest.raises(Exception) as info:
        judge(killed, None, 60)
    assert info.value.reason is Reason.SANDBOX_KILLED  # type: ignore[attr-defined]
    assert "signal 9" in str(info.value)
    # The same exit code without the engine's record is the artifact's own doing.
    selfmade = Outcome(exit_code=137, oom_killed=False, timed_out=False, duration_seconds=1,
                       image_id="", runtime="runc")
    with pytest.raises(Exception) as info:
        judge(selfmade, None, 60)
    assert info.value.reason is Reason.CONVERSION_FAILED  # type: ignore[attr-defined]

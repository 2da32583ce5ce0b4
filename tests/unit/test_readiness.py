"""One readiness object: holds and their order, what health says, and a drained broker refusing
before it reads a byte of the upload."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from airlock_broker.config import BrokerConfig
from airlock_broker.errors import Reason
from airlock_broker.readiness import DRAINED_WHY, POOL_HOLDS, STOPPING_WHY, Hold, Readiness
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_client import Client, ServiceUnavailable
from tests.unit.fakes import FakeSandbox, running_broker
from tests.unit.test_broker import PICKLE, audit_records, write_safetensors


def test_holds_are_independent_and_a_refusal_names_the_first_one() -> None:
    ready = Readiness()
    assert ready.serving and ready.refusal() is None
    ready.hold(Hold.ENGINE_DOWN, "the sandbox engine is unavailable: gone")
    ready.hold(Hold.DRAINED, DRAINED_WHY)
    refused = ready.refusal()
    assert refused is not None and refused.reason is Reason.SANDBOX_UNAVAILABLE
    assert refused.message == DRAINED_WHY  # DRAINED comes before ENGINE_DOWN
    ready.release(Hold.DRAINED)
    assert ready.held(Hold.ENGINE_DOWN) and not ready.held(Hold.DRAINED)
    refused = ready.refusal()
    assert refused is not None and "engine is unavailable: gone" in refused.message
    ready.hold(Hold.ENGINE_DOWN, "the sandbox engine is unavailable: still gone")  # replaced
    assert ready.why(Hold.ENGINE_DOWN).endswith("still gone")
    ready.release(Hold.ENGINE_DOWN)
    ready.release(Hold.ENGINE_DOWN)  # releasing what is not held is harmless
    assert ready.refusal() is None and ready.why(Hold.ENGINE_DOWN) == ""


def test_the_pools_ask_only_their_own_holds() -> None:
    """A job admitted before a shutdown still gets its sandbox during the grace period."""
    ready = Readiness()
    ready.hold(Hold.STOPPING, STOPPING_WHY)
    ready.hold(Hold.SELFTEST, "the isolation self-test failed: x")
    assert ready.refusal(*POOL_HOLDS) is None
    ready.check(*POOL_HOLDS)
    with pytest.raises(Exception) as info:
        ready.check()
    assert info.value.message == STOPPING_WHY  # type: ignore[attr-defined]


def test_health_serves_through_an_operator_drain_and_not_through_anything_else() -> None:
    ready = Readiness()
    ready.hold(Hold.DRAINED, DRAINED_WHY)
    assert ready.serving
    for kind in (Hold.STOPPING, Hold.SELFTEST, Hold.ENGINE_DOWN):
        ready.hold(kind, "why")
        assert not ready.serving
        ready.release(kind)
        assert ready.serving


def test_a_change_of_serving_wakes_a_follower_and_other_changes_do_not() -> None:
    async def main() -> None:
        ready = Readiness()
        follower = asyncio.create_task(ready.until_serving_is_not(True))
        ready.hold(Hold.DRAINED, DRAINED_WHY)  # still serving
        for _ in range(5):
            await asyncio.sleep(0)
        assert not follower.done()
        ready.hold(Hold.ENGINE_DOWN, "down")
        async with asyncio.timeout(5):
            await follower
        # Already different: returns at once.
        async with asyncio.timeout(5):
            await ready.until_serving_is_not(True)

    asyncio.run(main())


def test_a_drained_broker_refuses_before_it_reads_the_upload(tmp_path: Path) -> None:
    config = BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "spool",
                          selftest_on_start=False, unix_socket=tmp_path / "run" / "broker.sock",
                          provenance_key=tmp_path / "provenance-key.pem",
                          pools=PoolSettings(min_warm=0))
    backend = FakeSandbox(config.spool_root, write_safetensors)
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    with running_broker(config, backend), \
            Client(f"unix:{config.unix_socket}", retry_attempts=1) as client:  # root: admin
        client.drain_pools()
        assert all(p.draining for p in client.pool_status())
        with pytest.raises(ServiceUnavailable) as info:
            client.convert(src, tmp_path / "out.safetensors")
        assert info.value.reason == "SANDBOX_UNAVAILABLE"
        assert DRAINED_WHY in str(info.value)
        [drain, record] = audit_records(tmp_path, 2)
        assert (drain["action"], drain["principal"]) == ("drain", "uid:0")
        # Refused at admission: the request's metadata (the first message) was never read.
        assert record["reason"] == "SANDBOX_UNAVAILABLE"
        assert "filename" not in record and "declared_size" not in record
        assert "input_size" not in record
        assert backend.prepared == 0
        client.resume_pools()
        assert client.convert(src, tmp_path / "out.safetensors").format == "safetensors"

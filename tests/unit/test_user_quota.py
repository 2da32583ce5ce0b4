"""A local user's subordinate uids count as that user for every per-caller bound.

Processes in a user's namespaces reach the broker's Unix socket as any of the user's
subordinate uids (``/etc/subuid``: 65,536 each on Debian with ``uidmap``), and
``SO_PEERCRED`` names that host uid. Found by review: the principal, and with it every bound
kept per principal, was the subordinate uid, so one user with 16 of them held all 256 call
places (refusing root's admin calls and health checks), two held every admission place, and
eight every fast-path ticket. Each test here failed before (the principal counted as
itself). A subordinate uid is still named as itself (audit, tickets' owner)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from airlock_broker.api.auth import _CURRENT, Authenticator, Principal
from airlock_broker.api.rpc_limits import RequestArrival
from airlock_broker.conversion.admission import Admission
from airlock_broker.conversion.pipeline import ConversionPipeline
from airlock_broker.errors import AirlockError, Reason
from airlock_broker.fastpath.local_handles import HandleTable
from airlock_broker.security.auth_config import AuthConfig
from airlock_broker.security.uid_owners import UidOwners
from tests.unit.test_broker_limits import Aborted, Context, never

USER = 1000
OWNERS = UidOwners([(100000, 165536, USER)])


def _local(uid: int) -> Principal:
    return Authenticator(AuthConfig(), owners=OWNERS)._local(uid)


def test_a_subordinate_uid_is_named_as_itself_and_counted_as_its_owner() -> None:
    sub = _local(100001)
    assert (sub.name, sub.method, sub.quota) == ("uid:100001", "peercred", "uid:1000")
    assert sub.uid == 100001
    assert _local(USER).quota == "uid:1000"
    assert _local(165536).quota == "uid:165536"  # past the range: a user of its own
    assert Principal("ci", "token", frozenset()).quota == "ci"


def test_calls_waiting_for_their_request_are_bounded_per_user() -> None:
    async def as_(principal: Principal, call: Any) -> Any:
        _CURRENT.set(principal)  # the task's own context, as the auth interceptor sets it
        return await call

    async def run() -> None:
        arrival = RequestArrival(seconds=60, limit=2)
        sent = asyncio.Event()
        contexts = [Context() for _ in range(3)]
        calls = [asyncio.ensure_future(as_(_local(100000 + i), arrival._request(never(sent), c)))
                 for i, c in enumerate(contexts)]
        done, pending = await asyncio.wait(calls, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and isinstance(next(iter(done)).exception(), Aborted)
        assert [c.code for c in contexts].count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 1
        assert arrival.waiting == {"uid:1000": 2}
        sent.set()
        await asyncio.gather(*pending)

    asyncio.run(run())


def test_fast_path_tickets_are_bounded_per_user() -> None:
    table = HandleTable(60, 32, per_principal=2)
    for uid in (100000, 100001):
        caller = _local(uid)
        table.issue(caller.name, uid=caller.uid, counted_as=caller.quota)
    third = _local(100002)
    with pytest.raises(AirlockError) as info:
        table.issue(third.name, uid=third.uid, counted_as=third.quota)
    assert info.value.reason is Reason.BUSY and "already has 2" in info.value.message
    other = _local(2000)  # another user is not held back
    assert table.issue(other.name, uid=other.uid, counted_as=other.quota)


def test_admission_places_are_bounded_per_user() -> None:
    async def run() -> None:
        admission = Admission(max_running=2, max_waiting=2, max_per_principal=1)
        # A job is admitted under its ``counted_as`` (``ConversionPipeline.convert``).
        pipeline = ConversionPipeline(None, None, admission, None, None, None)  # type: ignore[arg-type]
        jobs = [pipeline.job(p.name, p.method, "unix:", p.quota)
                for p in (_local(100000), _local(100001))]
        assert [j.record.principal for j in jobs] == ["uid:100000", "uid:100001"]
        async with admission.admit(jobs[0].counted_as):
            with pytest.raises(AirlockError) as info:
                async with admission.admit(jobs[1].counted_as):
                    pass
        assert info.value.reason is Reason.BUSY and "'uid:1000'" in info.value.message

    asyncio.run(run())

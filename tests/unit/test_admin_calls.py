"""The operators' calls (``AdminServicer``): one self-test at a time, and a failure nobody
expected is INTERNAL with a reason, never gRPC's UNKNOWN with an exception's text.

Found by review: each ``RunSelfTest`` started its containers outside the admission places and
readiness, so an admin (or a stolen admin token) asking 20 times at once started 20; and an
``OSError`` from a pool restart reached the caller as UNKNOWN, with its path."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.api.admin import AdminServicer
from airlock_broker.ops.selftest import Check, SelfTestReport


class Aborted(Exception):
    pass


class Context:
    def __init__(self) -> None:
        self.status: grpc.Status | None = None

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise Aborted()


def _reason(status: grpc.Status) -> str:
    """The ErrorInfo reason the status carries, as a client reads it."""
    from google.rpc import error_details_pb2, status_pb2

    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    for detail in status_pb2.Status.FromString(raw).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    raise AssertionError("no ErrorInfo in the status")


def test_concurrent_self_tests_run_once_and_share_the_report() -> None:
    runs: list[int] = []

    async def selftest() -> SelfTestReport:
        runs.append(1)
        await asyncio.sleep(0)  # all twenty have asked before it even started
        return SelfTestReport(checks=(Check("network", True, "none", "sandbox"),),
                              runtime="runc", image_id="sha256:x")

    async def run() -> list[Any]:
        admin = AdminServicer(None, selftest)  # type: ignore[arg-type]
        replies = await asyncio.gather(*(admin.RunSelfTest(pb.RunSelfTestRequest(), Context())  # type: ignore[arg-type]
                                         for _ in range(20)))
        again = await admin.RunSelfTest(pb.RunSelfTestRequest(), Context())  # type: ignore[arg-type]
        return [*replies, again]

    replies = asyncio.run(run())
    assert len(runs) == 2, "twenty at once shared one run; the one after ran its own"
    assert all(r.passed and r.image_id == "sha256:x" for r in replies)


def test_an_unexpected_failure_is_internal_with_a_reason_and_no_path(
        caplog: pytest.LogCaptureFixture) -> None:
    class Pools:
        async def restart(self, profile: str | None) -> int:
            raise OSError(2, "No such file or directory", "/var/lib/airlock/spool/slots/x")

    async def selftest() -> SelfTestReport:
        raise OSError(13, "Permission denied", "/var/lib/airlock/spool/slots/y")

    async def run() -> list[Context]:
        admin = AdminServicer(Pools(), selftest)  # type: ignore[arg-type]
        contexts = [Context(), Context()]
        with pytest.raises(Aborted):
            await admin.RestartPools(pb.RestartPoolsRequest(), contexts[0])  # type: ignore[arg-type]
        with pytest.raises(Aborted):
            await admin.RunSelfTest(pb.RunSelfTestRequest(), contexts[1])  # type: ignore[arg-type]
        return contexts

    for context in asyncio.run(run()):
        status = context.status
        assert status is not None and status.code == grpc.StatusCode.INTERNAL
        assert "/var/lib" not in status.details and "see its log" in status.details
        assert _reason(status) == "INTERNAL"
    assert "/var/lib/airlock/spool/slots/x" in caplog.text  # the operator's log has it all


def test_each_action_on_the_pools_is_in_the_audit_log_with_who_asked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Found by review: drains, restarts and self-tests were in the process log alone, which a
    log flood or rotation loses: an operator's action (or a stolen admin token's) left no
    durable record. Each is an audit line now, with the principal and how it ended."""
    import json

    from airlock_broker.api.auth import _CURRENT, Principal
    from airlock_broker.conversion.audit import AuditLog
    from airlock_broker.errors import Reason, error

    class Pools:
        def drain(self) -> None:
            pass

        def resume(self) -> None:
            pass

        async def restart(self, profile: str | None) -> int:
            if profile == "nope":
                raise error(Reason.BAD_REQUEST, "unknown profile 'nope'")
            return 2

    async def selftest() -> SelfTestReport:
        return SelfTestReport(checks=(Check("network", True, "none", "sandbox"),),
                              runtime="runc", image_id="sha256:x")

    class Peer(Context):
        def peer(self) -> str:
            return "unix:"

    audit = AuditLog(tmp_path / "audit.jsonl")

    async def run() -> None:
        _CURRENT.set(Principal("uid:0", "peercred", frozenset()))
        admin = AdminServicer(Pools(), selftest, audit=audit)  # type: ignore[arg-type]
        await admin.DrainPools(pb.DrainPoolsRequest(), Peer())  # type: ignore[arg-type]
        await admin.ResumePools(pb.ResumePoolsRequest(), Peer())  # type: ignore[arg-type]
        await admin.RestartPools(pb.RestartPoolsRequest(profile="light"), Peer())  # type: ignore[arg-type]
        with pytest.raises(Aborted):
            await admin.RestartPools(pb.RestartPoolsRequest(profile="nope"), Peer())  # type: ignore[arg-type]
        await admin.RunSelfTest(pb.RunSelfTestRequest(), Peer())  # type: ignore[arg-type]

    asyncio.run(run())
    audit.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(d["action"], d["outcome"], d.get("profile"), d.get("replaced")) for d in lines] == [
        ("drain", "ok", None, None), ("resume", "ok", None, None), ("restart", "ok", "light", 2),
        ("restart", "rejected", "nope", None), ("selftest", "ok", None, None)]
    assert all(d["principal"] == "uid:0" and d["auth"] == "peercred" and d["peer"] == "unix:"
               and "job_id" not in d for d in lines)
    assert lines[3]["reason"] == "BAD_REQUEST" and lines[4]["passed"] is True

"""Exhausting the broker without converting anything heavy: callers that never read their
answer, one principal taking every place, idle health watchers. Real gRPC, fake sandbox.

The adversarial tests (tests/adversarial/test_broker_exhaustion.py) play the same attacks
against the real broker and engine.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors.numpy import save

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.api.server import Broker
from airlock_broker.config import BrokerConfig
from airlock_broker.conversion import audit
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.security.auth_config import (
    AuthConfig,
    Role,
    TokenEntry,
    mint_token,
    token_digest,
)
from airlock_broker.security.exposure import RpcLimits
from airlock_client import Client
from airlock_client._wire import error_from_rpc
from airlock_sandbox.contract import OUTPUT_NAMES, JobSpec, OutputFormat
from tests.unit.fakes import FakeSandbox, running_broker
from tests.unit.raw_http2 import Http2Caller
from tests.unit.test_broker import PICKLE

#: 16 MiB: several times what HTTP/2 flow control lets the broker write to a caller that does
#: not read (4-8 MiB measured), so such an answer really stalls.
BIG = save({"w": np.zeros(4 * 1024 * 1024, dtype=np.float32)})
ALICE, BOB = mint_token(), mint_token()
TOKENS = (TokenEntry("alice", frozenset({Role.CONVERT}), token_digest(ALICE)),
          TokenEntry("bob", frozenset({Role.CONVERT}), token_digest(BOB)))


def write_big(spec: JobSpec, data: bytes, out: Path) -> int:
    (out / OUTPUT_NAMES[OutputFormat.SAFETENSORS]).write_bytes(BIG)
    return 0


class Running:
    def __init__(self, broker: Broker, backend: FakeSandbox, spool: Path) -> None:
        self.broker, self.backend, self.spool = broker, backend, spool
        self.address = f"127.0.0.1:{broker.port}"

    def audit(self) -> list[dict[str, Any]]:
        path = self.spool / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def results(self) -> list[str]:
        folder = self.spool / "results"
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    managers: list[Any] = []

    def _start(**overrides: Any) -> Running:
        overrides.setdefault("pools", PoolSettings(min_warm=0))
        overrides.setdefault("selftest_on_start", False)
        overrides.setdefault("provenance_key", tmp_path / "provenance-key.pem")
        # Integrity's second sandbox is not this file's subject (test_format_decision).
        overrides.setdefault("verify_integrity", False)
        spool = tmp_path / f"spool{len(managers)}"
        config = BrokerConfig(listen="127.0.0.1:0", state_root=spool, **overrides)
        backend = FakeSandbox(spool, write_big)
        manager = running_broker(config, backend)
        broker = manager.__enter__()
        managers.append(manager)
        return Running(broker, backend, spool)

    yield _start
    for manager in managers:
        manager.__exit__(None, None, None)


def wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def own_channel(address: str) -> grpc.Channel:
    """A channel on a connection of its own (gRPC shares connections between channels)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def requests(data: bytes, key: str = "", hold: threading.Event | None = None
             ) -> Iterator[pb.ConvertRequest]:
    yield pb.ConvertRequest(metadata=pb.ConvertMetadata(size_bytes=len(data),
                                                        idempotency_key=key))
    if hold is not None:
        hold.wait(60)
    yield pb.ConvertRequest(chunk=pb.Chunk(data=data, crc32=zlib.crc32(data)))


def timed_convert(address: str, tmp_path: Path, name: str, **client: Any) -> float:
    src = tmp_path / "model.pkl"
    src.write_bytes(PICKLE)
    began = time.monotonic()
    with Client(address, **client) as c:
        c.convert(src, tmp_path / f"{name}.safetensors")
    return time.monotonic() - began


def test_callers_that_never_read_their_answer_hold_no_sandbox(start, tmp_path: Path) -> None:
    run = start(max_concurrent_jobs=2, answer_drain_seconds=3.0)
    usual = timed_convert(run.address, tmp_path, "first")
    channels = [own_channel(run.address) for _ in range(2)]
    try:
        # As many callers as sandboxes: each converts, then never reads its 16 MiB answer.
        # One sends an idempotency key (its result is kept for a retry), one does not.
        stalled = [pb_grpc.ConversionServiceStub(ch).Convert(requests(PICKLE, key))
                   for ch, key in zip(channels, ("kept", ""), strict=True)]
        wait_for(lambda: len(run.backend.specs) == 3)
        took = timed_convert(run.address, tmp_path, "benign", timeout=30, retry_attempts=1)
        assert took < max(10 * usual, 10.0), (took, usual)
        # The stalled answers end at the drain deadline: everything they held is released.
        wait_for(lambda: sum(r.get("reason") == "DEADLINE_EXCEEDED" for r in run.audit()) == 2)
        assert run.broker.admission.admitted == 0 and run.backend.live == set()
        records = [r for r in run.audit() if r.get("reason") == "DEADLINE_EXCEEDED"]
        assert {r["outcome"] for r in records} == {"failed"}
        assert all("not read within 3 s" in r["message"] for r in records)
        # Only the idempotency store's copies remain (the benign calls' keys and "kept").
        kept = next(r["job_id"] for r in records if r["idempotency_key"] == "kept")
        unkept = next(r["job_id"] for r in records if r["idempotency_key"] == "")
        # The unkept answer's file is unlinked on a worker thread, just after its end.
        wait_for(lambda: unkept not in run.results(), timeout=60)
        assert kept in run.results() and len(run.results()) == 3
        # A stalled caller that reads on at last gets the reason, behind what was queued.
        with pytest.raises(grpc.RpcError) as info:
            for _ in stalled[1]:
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error_from_rpc(info.value).reason == "DEADLINE_EXCEEDED"  # type: ignore[attr-defined]
        stalled[0].cancel()
    finally:
        for ch in channels:
            ch.close()
    # ... and the kept one's retry is answered from the kept file, without converting.
    with grpc.insecure_channel(run.address) as ch:
        messages = list(pb_grpc.ConversionServiceStub(ch).Convert(requests(PICKLE, "kept"),
                                                                   timeout=30))
    assert messages[0].result.replayed and messages[0].result.job_id == kept
    output = b"".join(m.chunk.data for m in messages[1:])
    assert hashlib.sha256(output).hexdigest() == messages[0].result.output_sha256
    assert len(run.backend.specs) == 4


def test_one_principal_cannot_take_every_place(start, tmp_path: Path) -> None:
    run = start(max_concurrent_jobs=1, max_queued_jobs=3, max_jobs_per_principal=2,
                auth=AuthConfig(tokens=TOKENS))
    hold = threading.Event()
    alice = own_channel(run.address)
    auth = (("authorization", f"Bearer {ALICE}"),)
    try:
        # Alice's uploads never finish: each holds an admission place and no sandbox.
        held = [pb_grpc.ConversionServiceStub(alice).Convert(requests(PICKLE, hold=hold),
                                                             metadata=auth, timeout=60)
                for _ in range(2)]
        wait_for(lambda: run.broker.admission.admitted == 2)
        with pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.ConversionServiceStub(alice).Convert(requests(PICKLE), metadata=auth,
                                                              timeout=30))
        err = error_from_rpc(info.value)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.reason == "BUSY"  # type: ignore[attr-defined]
        assert "2 jobs of principal 'alice' in progress, the limit per principal is 2 (of 4 " \
               "places)" in err.message  # type: ignore[attr-defined]
        # Bob still gets in, and converts.
        timed_convert(run.address, tmp_path, "bob", token=BOB, retry_attempts=1)
        hold.set()
        for call in held:
            first, *_ = call
            assert first.result.job_id
    finally:
        hold.set()
        alice.close()
    assert [r["principal"] for r in run.audit() if r.get("reason") == "BUSY"] == ["alice"]


def _watch(channel: grpc.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))


def _first_status(call: Any) -> int:
    return int(next(call).status)


def test_health_watch_and_reflection_streams_are_bounded(start) -> None:
    run = start(rpc=RpcLimits(max_open_streams=2))
    serving = health_pb2.HealthCheckResponse.SERVING
    with own_channel(run.address) as channel:
        watchers = [_watch(channel) for _ in range(2)]
        assert [_first_status(w) for w in watchers] == [serving, serving]
        with pytest.raises(grpc.RpcError) as info:
            _first_status(_watch(channel))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit is 2 ([rpc] max_open_streams)" in (info.value.details() or "")
        # Reflection streams count against the same bound.
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        with pytest.raises(grpc.RpcError) as info:
            next(reflect)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Health checks and conversions still work.
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == serving
        messages = list(pb_grpc.ConversionServiceStub(channel).Convert(requests(PICKLE),
                                                                       timeout=30))
        assert messages[0].result.job_id
        # A watcher that leaves frees its place.
        watchers[0].cancel()
        deadline = time.monotonic() + 30
        while True:
            again = _watch(channel)
            try:
                assert _first_status(again) == serving
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the cancelled watcher's place never freed"
                time.sleep(0.05)
        for w in (watchers[1], again):
            w.cancel()


def test_the_server_refuses_calls_beyond_max_concurrent_rpcs(start) -> None:
    run = start(rpc=RpcLimits(max_open_streams=1, max_concurrent_rpcs=2, max_waiting_calls=1))
    hold = threading.Event()
    with own_channel(run.address) as channel:
        try:
            held = [pb_grpc.ConversionServiceStub(channel).Convert(
                requests(PICKLE, hold=hold), timeout=30) for _ in range(2)]
            wait_for(lambda: run.broker.admission.admitted == 2)
            with pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 calls are in progress, the limit is 2 ([rpc] max_concurrent_rpcs)" in (
                info.value.details() or "")
        finally:
            hold.set()
        for call in held:
            first, *_ = call
            assert first.result.job_id


def _checks_answered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The health checks the broker's servicer answered (their service names), as they are."""
    from grpc_health.v1 import health

    answered: list[str] = []
    check = health.aio.HealthServicer.Check

    async def counted(self: Any, request: Any, context: Any) -> Any:
        answered.append(request.service)
        return await check(self, request, context)
    monkeypatch.setattr(health.aio.HealthServicer, "Check", counted)
    return answered


def test_calls_whose_answer_the_caller_never_lets_out_cannot_take_every_place(
        start, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in the eleventh review: a caller that sets its HTTP/2 stream windows to 0 and
    sends health checks (no credentials needed) on one connection. Each check is answered,
    but the answer cannot leave, and gRPC counted the call against ``max_concurrent_rpcs``
    until its stream closed: at the connection's age, an hour and a half. Every other call
    was refused meanwhile ("Concurrent RPC limit exceeded!"). Now a call counts while its
    task runs, and an answer not out in time ends its task (within ``PROMPT_SECONDS`` once
    the principal has ``max_waiting_calls`` calls waiting)."""
    answered = _checks_answered(monkeypatch)
    run = start(rpc=RpcLimits(max_concurrent_rpcs=32, max_waiting_calls=4, max_open_streams=2,
                              request_seconds=30))
    caller = Http2Caller(run.broker.port)  # its windows are 0: no answer reaches it
    try:
        for _ in range(64):
            caller.unary("/grpc.health.v1.Health/Check")
        # At least every place was answered (and, before, held): the flood is in.
        wait_for(lambda: len(answered) >= 32, timeout=60)
        deadline = time.monotonic() + 60  # served at once now; before, never
        while True:
            try:
                with own_channel(run.address) as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=10)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert time.monotonic() < deadline, f"another caller was refused: {exc.details()}"
                time.sleep(0.2)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert not caller.closed.is_set()  # the flood's connection was still open throughout
    finally:
        caller.close()


def test_one_peer_cannot_hold_more_than_its_share_of_stuck_streams(
        start, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found after the eleventh review: an answer the broker gave up on (its caller's HTTP/2
    windows are 0) stays in gRPC as a stuck stream (about 15 KB) until its connection closes,
    an hour and a half later; one client (no token needed: Health.Check) could hold
    ``max_streams_per_connection`` on each of ``max_connections`` connections, some 15 GiB.
    Now each counts against its peer (here 127.0.0.1) for that long, and at
    ``max_stuck_answers_per_peer`` the peer's new calls are refused at once: trailers only,
    which leave through a window of 0, so the refused stream closes. Another peer (::1) is
    served throughout."""
    answered = _checks_answered(monkeypatch)
    limits = RpcLimits(max_concurrent_rpcs=16, max_waiting_calls=4, max_open_streams=2,
                       request_seconds=0.5, max_stuck_answers_per_peer=8)
    run = start(rpc=limits)
    callers = [Http2Caller(run.broker.port) for _ in range(2)]  # windows of 0: nothing leaves

    def ended() -> int:  # refused: its trailers came (no answer can)
        return sum(len(c.ended) for c in callers)
    sent = in_a_row = 0
    try:
        # One call at a time on two connections, each once answered or refused (so
        # ``max_concurrent_rpcs`` refuses none), until ten in a row are refused; before, none
        # was, and every stream stayed stuck.
        while sent < 150 and in_a_row < 10:
            before = ended()
            callers[sent % 2].unary("/grpc.health.v1.Health/Check")
            sent += 1
            wait_for(lambda n=sent: len(answered) + ended() >= n, timeout=60)
            in_a_row = in_a_row + 1 if ended() > before else 0
        stuck = sent - ended()
        assert in_a_row == 10, f"{sent} calls, {ended()} refused: {stuck} streams stuck"
        # The 8 counted, plus those in progress when the eighth was (at most 16: every place).
        assert stuck <= 8 + 16, f"{stuck} streams stuck of {sent} calls"
        # A gRPC client from the same peer is told why, with the numbers.
        with grpc.insecure_channel(f"127.0.0.1:{run.broker.port}") as channel, \
                pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "answers to calls from 127.0.0.1 did not leave" in (info.value.details() or "")
        assert "the limit is 8 ([rpc] max_stuck_answers_per_peer)" in (
            info.value.details() or "")
        # Another peer is served.
        with grpc.insecure_channel(f"[::1]:{run.broker.port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert not any(c.closed.is_set() for c in callers)  # their connections stayed open
    finally:
        for caller in callers:
            caller.close()


def test_stuck_answers_count_per_peer_for_a_streams_life_and_forget_the_oldest_peer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from airlock_broker.api import rpc_limits

    now = [1000.0]
    monkeypatch.setattr(rpc_limits.time, "monotonic", lambda: now[0])
    stuck = rpc_limits.StuckAnswers(limit=2, keep_seconds=100, peers=2)
    for _ in range(5):
        stuck.record("10.0.0.1")
    assert stuck.held("10.0.0.1") == 2 and len(stuck.until["10.0.0.1"]) == 2
    now[0] += 100
    assert stuck.held("10.0.0.1") == 0 and "10.0.0.1" not in stuck.until
    for peer in ("a", "b", "c"):
        stuck.record(peer)
    assert list(stuck.until) == ["b", "c"]


class _Peer:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


@pytest.mark.parametrize(("peer", "key"), [
    ("ipv4:192.0.2.7:5555", "192.0.2.7"),
    ("ipv6:[::1]:5555", "::1"),
    ("ipv6:[::ffff:192.0.2.7]:5555", "192.0.2.7"),
    ("ipv6:[2001:db8:1:2:3:4:5:6]:5555", "2001:db8:1:2::/64"),
    ("unix:", "unix:anonymous"),
])
def test_a_stuck_answer_counts_against_an_address_or_a_local_principal(peer: str,
                                                                        key: str) -> None:
    from airlock_broker.api.rpc_limits import peer_key

    assert peer_key(_Peer(peer)) == key  # type: ignore[arg-type]


def _withheld(hold: threading.Event) -> Iterator[health_pb2.HealthCheckRequest]:
    """A request stream that sends nothing until ``hold`` is set: the call's headers only."""
    hold.wait(120)
    return
    yield  # a generator


def _health_check_streaming(channel: grpc.Channel) -> Any:
    """Health.Check with a request stream of the caller's: it may send nothing."""
    return channel.stream_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString)


def test_calls_that_withhold_their_request_cannot_take_every_place(start) -> None:
    """gRPC counts a call from its first frame, and ran a unary method only once its request
    arrived: calls that sent their headers and never their message (a health check needs no
    credentials) held every one of ``max_concurrent_rpcs``, and every other call, probes and
    conversions included, was refused. Now at most ``max_waiting_calls`` of one principal
    wait; the others are refused at once, and those that wait give up after
    ``request_seconds``."""
    run = start(rpc=RpcLimits(max_open_streams=1, max_concurrent_rpcs=6, max_waiting_calls=2,
                              request_seconds=30))
    serving = health_pb2.HealthCheckResponse.SERVING
    hold = threading.Event()
    with own_channel(run.address) as channel:
        check = _health_check_streaming(channel)
        try:
            withheld = [check.future(_withheld(hold), timeout=120) for _ in range(6)]
            # Beyond the two that may wait (whichever came first): refused, not held.
            wait_for(lambda: sum(call.done() for call in withheld) >= 4)
            refused = [call.exception() for call in withheld if call.done()]
            waiting = [call for call in withheld if not call.done()]
            assert len(refused) == 4 and len(waiting) == 2
            assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
            assert "the limit is 2 ([rpc] max_waiting_calls)" in (refused[0].details() or "")
            # A probe and a conversion are served while two calls withhold their request.
            assert health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10).status == serving
            messages = list(pb_grpc.ConversionServiceStub(channel).Convert(
                requests(PICKLE), timeout=30))
            assert messages[0].result.job_id
        finally:
            hold.set()
        # The two that waited end when their stream does, without a request.
        for call in waiting:
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "without its request message" in (info.value.details() or "")


def test_a_call_that_never_sends_its_request_gives_up_its_place(start) -> None:
    run = start(rpc=RpcLimits(request_seconds=1))
    hold = threading.Event()
    with own_channel(run.address) as channel:
        check = _health_check_streaming(channel)
        try:
            with pytest.raises(grpc.RpcError) as info:
                check(_withheld(hold), timeout=60)
        finally:
            hold.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no request message arrived within 1 s ([rpc] request_seconds)" in (
        info.value.details() or "")


class Aborted(Exception):
    """What ``Context.abort`` raises, as gRPC's does."""


class Context:
    """A call's context for ``RequestArrival``: the code it was aborted with."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise Aborted(details)


async def never(sent: Any) -> Any:
    """A request stream whose one message comes only once ``sent`` (an asyncio.Event) is."""
    await sent.wait()
    yield health_pb2.HealthCheckRequest()


def test_a_call_counts_as_waiting_from_its_start_and_beyond_the_limit_is_refused_at_once(
        ) -> None:
    """Counted only after a grace, calls reopened as fast as they were refused held places
    uncounted (a trickle of header frames kept the server full). Every call counts from its
    first step; one beyond the limit gets ``PROMPT_SECONDS`` for its request, then is
    refused."""
    import asyncio

    from airlock_broker.api.rpc_limits import RequestArrival

    async def run() -> None:
        arrival = RequestArrival(seconds=60, limit=2)
        sent = asyncio.Event()
        contexts = [Context() for _ in range(3)]
        calls = [asyncio.ensure_future(arrival._request(never(sent), c)) for c in contexts]
        await asyncio.sleep(0)  # each call has taken its first step
        assert arrival.waiting == {"anonymous": 3}
        done, pending = await asyncio.wait(calls, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and isinstance(next(iter(done)).exception(), Aborted)
        assert [c.code for c in contexts].count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 1
        assert arrival.waiting == {"anonymous": 2}
        sent.set()  # the two that wait send their requests and are served
        results = await asyncio.gather(*pending)
        assert all(isinstance(r, health_pb2.HealthCheckRequest) for r in results)
        assert arrival.waiting == {}

    asyncio.run(run())


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + b"\x04" + bytes(5)  # + SETTINGS


def _closed_within(sock: Any, seconds: float) -> bool:
    """Whether the broker closes ``sock`` within ``seconds`` (what it sends first, a GOAWAY
    or its settings, is read and dropped)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    return True


def test_connections_that_hold_a_descriptor_and_make_no_call_are_closed(start) -> None:
    """Found by review: a connection that sent only the HTTP/2 preface (or nothing) held a
    descriptor of the broker's for the hour of ``max_connection_age_seconds``, and calls are
    authenticated, connections are not: thousands ran the broker out of descriptors. An idle
    connection is now closed after ``[rpc] max_connection_idle_seconds``, one that never
    finishes its handshake after ``handshake_seconds``; callers are served meanwhile."""
    import socket

    run = start(rpc=RpcLimits(max_connection_idle_seconds=1, handshake_seconds=1))
    idle = socket.create_connection(("127.0.0.1", run.broker.port))
    silent = socket.create_connection(("127.0.0.1", run.broker.port))
    try:
        idle.sendall(_PREFACE)
        with grpc.insecure_channel(run.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
                health_pb2.HealthCheckResponse.SERVING
        # 1 s each; 30 s is only the bound of a busy machine's lateness.
        assert _closed_within(idle, 30), "an idle connection stayed open"
        assert _closed_within(silent, 30), "a connection without a handshake stayed open"
    finally:
        idle.close()
        silent.close()


def test_the_broker_raises_its_soft_descriptor_limit_to_the_hard_one() -> None:
    import subprocess
    import sys

    script = ("import resource\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))\n"
              "from airlock_broker.ops.process_limits import raise_open_files_limit\n"
              "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.split() == ["4096", "4096"]


def test_connections_beyond_the_cap_are_closed_at_once_and_the_broker_serves_after(
        start) -> None:
    """A backstop beside the idle and handshake times: connections are not authenticated, and
    a flood of them (each idle one lives minutes) ran the broker out of descriptors, failing
    the jobs in flight. At ``[rpc] max_connections`` a new one is closed at once."""
    import socket

    run = start(rpc=RpcLimits(max_connections=2))
    held = [socket.create_connection(("127.0.0.1", run.broker.port)) for _ in range(2)]
    for sock in held:
        sock.sendall(_PREFACE)
        sock.settimeout(30)
        assert sock.recv(4096), "a connection within the cap is answered"
    extra = socket.create_connection(("127.0.0.1", run.broker.port))
    try:
        extra.sendall(_PREFACE)
        assert _closed_within(extra, 30), "a connection beyond the cap stayed open"
    finally:
        extra.close()
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 60  # the broker notices the two closed, then serves again
    while True:
        try:
            with grpc.insecure_channel(run.address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10)
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "the broker did not serve after the flood"
            time.sleep(0.2)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING



def test_calls_refused_before_their_upload_cannot_fill_the_audit_log(
        start, tmp_path: Path) -> None:
    # Found by review: each refused call wrote a full record (1.5 KB with a long file name):
    # one client sending refused calls filled the disk at 40 GiB a day.
    run = start(auth=AuthConfig(tokens=TOKENS))
    alice = (("authorization", f"Bearer {ALICE}"),)
    refused = pb.ConvertRequest(metadata=pb.ConvertMetadata(size_bytes=1, filename="\n" * 5000,
                                                            target=99))
    began = time.monotonic()
    with own_channel(run.address) as channel:
        stub = pb_grpc.ConversionServiceStub(channel)
        for _ in range(100):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Convert(iter([refused]), metadata=alice, timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    windows = (time.monotonic() - began) // audit.REFUSAL_WINDOW_SECONDS + 1
    refusals = [r for r in run.audit() if r["principal"] == "alice"]
    assert 0 < len(refusals) <= audit.REFUSALS_PER_WINDOW * windows < 100, len(refusals)
    assert {r["reason"] for r in refusals} == {"BAD_REQUEST"}
    # A job that got further always has its record, whatever alice's refusals left.
    timed_convert(run.address, tmp_path, "converted", token=ALICE)
    wait_for(lambda: any(r.get("outcome") == "ok" and r["principal"] == "alice"
                         for r in run.audit()))

"""The client's retry policies: BUSY is waited out until the deadline, after the broker's
estimate; UNAVAILABLE keeps its bounded budget; nothing else is retried.

The schedule runs on a fake clock (its sleeps advance it), so the numbers are exact. The last
tests go through real gRPC to an in-process broker whose fake sandbox is held by a gate.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.wait_estimate import JobTimes
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_client import BusyWait, Client, ConversionError, ServiceUnavailable
from airlock_client._progress import busy_notice
from airlock_client._retry import RetryPolicy, RetrySchedule
from airlock_client._wire import error_from_rpc
from tests.unit.fakes import running_broker
from tests.unit.test_broker import PICKLE, write_safetensors
from tests.unit.test_idempotency import GatedSandbox


@dataclass
class FakeTime:
    now: float = 0.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def busy(hint: float | None = None, queued: int | None = 3) -> ConversionError:
    return ConversionError("BUSY", f"full; retry in about {hint} s", kind="failed",
                           code="RESOURCE_EXHAUSTED", retry_after=hint, queued=queued)


def down() -> ServiceUnavailable:
    return ServiceUnavailable("connection refused")


def call(outcomes: Sequence[BaseException | str], *, deadline: float = 900.0,
         rand: float = 0.0, policy: RetryPolicy | None = None,
         seen: list[BusyWait] | None = None) -> tuple[str, FakeTime, int]:
    """Run one call whose attempts have these outcomes; (result, time, attempts made)."""
    fake = FakeTime()
    schedule = RetrySchedule(policy or RetryPolicy(), deadline,
                             None if seen is None else seen.append,
                             clock=fake.clock, rand=lambda: rand)
    attempts = iter(outcomes)
    made = 0
    for attempt in schedule.retrying(sleep=fake.sleep):
        with attempt:
            made += 1
            outcome = next(attempts)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome, fake, made
    raise AssertionError("unreachable")


def test_busy_is_retried_until_it_clears_however_many_attempts_it_takes() -> None:
    result, fake, made = call([busy(10.0)] * 12 + ["ok"], rand=0.5)
    assert result == "ok" and made == 13  # the old client gave up after 4 attempts or 60 s
    assert fake.sleeps == [10.0 * 1.25] * 12  # the estimate, stretched by the jitter


def test_a_busy_wait_is_never_shorter_than_the_estimate_nor_past_the_deadline() -> None:
    seen: list[BusyWait] = []
    with pytest.raises(ConversionError) as info:
        call([busy(10.0)] * 10, deadline=30.0, rand=1.0, seen=seen)
    assert info.value.reason == "BUSY" and info.value.retry_after == 10.0  # the last answer
    # 15 s (10 + 50 % jitter), then what is left short of a last second for the attempt (14),
    # then less than the estimate is left: give up, with the broker's BUSY.
    assert [w.seconds for w in seen] == [15.0, 14.0]


def test_a_caller_whose_deadline_is_shorter_than_the_estimate_gets_busy_at_once() -> None:
    seen: list[BusyWait] = []
    with pytest.raises(ConversionError) as info:
        call([busy(12.5), "ok"], deadline=5.0, seen=seen)
    assert info.value.reason == "BUSY" and info.value.retry_after == 12.5
    assert "retry in about 12.5 s" in info.value.message
    assert seen == []


def test_busy_without_an_estimate_backs_off_exponentially_up_to_a_cap() -> None:
    result, fake, _ = call([busy(None)] * 9 + ["ok"])
    assert result == "ok"
    assert fake.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_broker_that_always_says_now_is_not_hammered() -> None:
    result, fake, _ = call([busy(0.0)] * 3 + ["ok"])
    assert result == "ok" and fake.sleeps == [0.5, 0.5, 0.5]


def test_wait_when_busy_false_raises_busy_at_once() -> None:
    with pytest.raises(ConversionError) as info:
        call([busy(1.0), "ok"], policy=RetryPolicy(wait_when_busy=False))
    assert info.value.reason == "BUSY"


def test_unavailable_keeps_its_bounded_policy() -> None:
    with pytest.raises(ServiceUnavailable):
        call([down()] * 10 + ["ok"], policy=RetryPolicy(unavailable_attempts=4))
    made = []
    with pytest.raises(ServiceUnavailable):
        fake = FakeTime()
        schedule = RetrySchedule(RetryPolicy(unavailable_attempts=4), 900.0, clock=fake.clock,
                                 rand=lambda: 1.0)
        for attempt in schedule.retrying(sleep=fake.sleep):
            with attempt:
                made.append(fake.now)
                raise down()
    assert len(made) == 4 and fake.sleeps == [0.25, 0.5, 1.0]


def test_unavailable_gives_up_after_its_time_budget() -> None:
    policy = RetryPolicy(unavailable_attempts=100, unavailable_seconds=20.0)
    with pytest.raises(ServiceUnavailable):
        call([down()] * 100, policy=policy, rand=1.0)


def test_the_outage_count_restarts_once_the_broker_answers() -> None:
    outcomes: list[BaseException | str] = [down(), down(), down(), busy(2.0), down(), down(),
                                           down(), "ok"]
    result, _, made = call(outcomes, policy=RetryPolicy(unavailable_attempts=4))
    assert result == "ok" and made == 8


@pytest.mark.parametrize("refusal", [
    ConversionError("POLICY_VIOLATION", "no", kind="rejected", code="FAILED_PRECONDITION"),
    # gRPC's own RESOURCE_EXHAUSTED (a message over the size limit) is not the broker's BUSY.
    ConversionError("RESOURCE_EXHAUSTED", "too large", kind="failed",
                    code="RESOURCE_EXHAUSTED"),
])
def test_a_refusal_is_never_retried(refusal: ConversionError) -> None:
    with pytest.raises(ConversionError) as info:
        call([refusal, "ok"])
    assert info.value is refusal


def test_the_caller_sees_each_wait_and_can_end_it() -> None:
    seen: list[BusyWait] = []
    call([busy(2.0, queued=5), busy(None, queued=None), "ok"], seen=seen)
    assert seen == [
        BusyWait(queued=5, retry_after=2.0, seconds=2.0, attempt=1,
                 message="full; retry in about 2.0 s"),
        BusyWait(queued=None, retry_after=None, seconds=1.0, attempt=2,
                 message="full; retry in about None s")]

    class Stop(Exception):
        pass

    def stop(wait: BusyWait) -> None:
        raise Stop

    fake = FakeTime()
    schedule = RetrySchedule(RetryPolicy(), 900.0, stop, clock=fake.clock, rand=lambda: 0.0)
    with pytest.raises(Stop):
        for attempt in schedule.retrying(sleep=fake.sleep):
            with attempt:
                raise busy(2.0)
    assert fake.sleeps == []


def test_the_cli_prints_one_waiting_line_per_wait() -> None:
    out = io.StringIO()
    notice = busy_notice("convert", out)
    notice(BusyWait(queued=4, retry_after=7.5, seconds=9.2, attempt=1, message="\x1b[2J"))
    notice(BusyWait(queued=None, retry_after=None, seconds=0.5, attempt=2, message=""))
    assert out.getvalue().splitlines() == [
        "airlock convert: waiting for a sandbox (queue 4); trying again in 9 s",
        "airlock convert: waiting for a sandbox (queue ?); trying again in 0 s"]


# -- the wire: RetryInfo as the client reads it -----------------------------------------------


class _Refused(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A failed call as grpc hands it over, with the status details we choose."""

    def __init__(self, details: list[object], code: grpc.StatusCode) -> None:
        packed = []
        for message in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(message)
            packed.append(any_detail)
        self._status = status_pb2.Status(code=code.value[0], message="full", details=packed)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "full"

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return (("grpc-status-details-bin", self._status.SerializeToString()),)

    def initial_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: object) -> bool:
        return False


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(int(seconds * 1e9))
    return info


def test_the_client_reads_retry_info_and_the_queue() -> None:
    info = error_details_pb2.ErrorInfo(reason="BUSY", metadata={"queued": "7", "kind": "failed"})
    err = error_from_rpc(_Refused([info, _retry_info(12.5)], grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert isinstance(err, ConversionError)
    assert (err.reason, err.retry_after, err.queued) == ("BUSY", 12.5, 7)


@pytest.mark.parametrize("queued", ["-1", "x", "\u0663", "1" * 40, ""])
def test_a_queue_that_is_not_a_count_is_ignored(queued: str) -> None:
    info = error_details_pb2.ErrorInfo(reason="BUSY", metadata={"queued": queued})
    err = error_from_rpc(_Refused([info, _retry_info(-5)], grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert isinstance(err, ConversionError)
    assert err.queued is None and err.retry_after is None


# -- end to end, in process -------------------------------------------------------------------


@pytest.fixture
def full_broker(tmp_path: Path) -> Iterator[tuple[str, GatedSandbox, object]]:
    """One place, held by a job the gate keeps in its sandbox; recent jobs took 0.2 s."""
    config = BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "spool",
                          max_concurrent_jobs=1, max_queued_jobs=0,
                          pools=PoolSettings(min_warm=0), selftest_on_start=False,
                          provenance_key=tmp_path / "key.pem")
    backend = GatedSandbox(config.spool_root, write_safetensors, gate=threading.Event())
    with running_broker(config, backend) as broker:
        broker.admission.job_times = JobTimes(prior=0.2)
        address = f"127.0.0.1:{broker.port}"
        src = tmp_path / "first.pkl"
        src.write_bytes(PICKLE)
        first = threading.Thread(target=lambda: Client(address).convert(
            src, tmp_path / "first.out"))
        first.start()
        deadline = time.monotonic() + 30
        # In its sandbox (prepared inside the run slot), not still uploading.
        while broker.admission.admitted == 0 or backend.prepared == 0:
            assert time.monotonic() < deadline, "the first job never reached its sandbox"
            time.sleep(0.01)
        try:
            yield address, backend, broker
        finally:
            backend.gate.set()  # type: ignore[union-attr]
            first.join(30)


def test_a_full_broker_answers_busy_with_its_estimate(full_broker, tmp_path: Path) -> None:
    address, _, _ = full_broker
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    with Client(address, wait_when_busy=False) as client, \
            pytest.raises(ConversionError) as info:
        client.convert(src, tmp_path / "out")
    err = info.value
    # Nothing waits for the one place, so: one job at the pace of recent jobs, at least 1 s.
    assert (err.reason, err.code, err.queued, err.retry_after) == (
        "BUSY", "RESOURCE_EXHAUSTED", 0, 1.0)
    assert "retry in about 1 s" in err.message


def test_the_client_waits_for_a_full_broker_and_tells_its_caller(full_broker,
                                                                 tmp_path: Path) -> None:
    address, backend, _ = full_broker
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    seen: list[BusyWait] = []

    def waiting(wait: BusyWait) -> None:
        seen.append(wait)
        if len(seen) == 2:
            backend.gate.set()  # the place frees up while the caller waits

    with Client(address, timeout=60) as client:
        result = client.convert(src, tmp_path / "out.safetensors", on_busy=waiting)
    assert result.format == "safetensors"
    assert len(seen) >= 2 and all(w.queued == 0 and w.retry_after == 1.0 for w in seen)
    assert all(1.0 <= w.seconds <= 1.5 for w in seen)


def test_closing_the_client_ends_a_wait_to_retry(full_broker, tmp_path: Path) -> None:
    """A batch's second Ctrl-C closes the client: a conversion waiting out a BUSY (here a
    minute, the broker's estimate) must end at once with CANCELLED, not sleep it out."""
    address, _, broker = full_broker
    broker.admission.job_times = JobTimes(prior=60.0)  # type: ignore[attr-defined]
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    client = Client(address, timeout=600)
    seen: list[BusyWait] = []

    def waiting(wait: BusyWait) -> None:
        seen.append(wait)
        threading.Timer(0.2, client.close).start()

    began = time.monotonic()
    with pytest.raises(ConversionError) as info:
        client.convert(src, tmp_path / "out.safetensors", on_busy=waiting)
    assert info.value.reason == "CANCELLED"
    assert seen and seen[0].seconds >= 50  # it was told to wait about a minute...
    assert time.monotonic() - began < 30  # ...and did not

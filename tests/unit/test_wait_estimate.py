"""BUSY says how long to wait: queue depth times recent job time, sent as ``RetryInfo``."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from google.rpc import error_details_pb2

from airlock_broker.api.wire import status_of
from airlock_broker.conversion.admission import Admission
from airlock_broker.conversion.wait_estimate import (
    MAX_JOB_SECONDS,
    MAX_WAIT_SECONDS,
    MIN_WAIT_SECONDS,
    PRIOR_JOB_SECONDS,
    JobTimes,
)
from airlock_broker.errors import AirlockError, Reason, RetryAfter, error


def test_the_estimate_follows_recent_jobs() -> None:
    times = JobTimes(prior=5.0, weight=0.5)
    assert times.typical == 5.0
    times.record(1.0)
    assert times.typical == 3.0
    times.record(1.0)
    assert times.typical == 2.0


def test_one_outlier_cannot_make_every_caller_wait_for_ever() -> None:
    times = JobTimes(prior=5.0, weight=1.0)
    times.record(10**9)
    assert times.typical == MAX_JOB_SECONDS
    times.record(float("nan"))
    times.record(float("inf"))
    assert times.typical == MAX_JOB_SECONDS
    times.record(-3.0)  # a clock step: counted as an instant job, not a negative one
    assert times.typical == 0.0


def test_the_wait_is_the_queue_and_one_more_at_the_pace_of_the_places() -> None:
    times = JobTimes(prior=4.0)
    wait = times.wait(queued=5, places=2)
    assert (wait.seconds, wait.queued, wait.job_seconds) == ((5 + 1) * 4.0 / 2, 5, 4.0)
    assert times.wait(queued=0, places=8).seconds == MIN_WAIT_SECONDS
    assert times.wait(queued=10**6, places=1).seconds == MAX_WAIT_SECONDS
    assert times.wait(queued=-2, places=0).queued == 0


@pytest.mark.parametrize(("prior", "weight"), [(0.0, 0.5), (5.0, 0.0), (5.0, 1.5)])
def test_job_times_refuse_nonsense(prior: float, weight: float) -> None:
    with pytest.raises(ValueError):
        JobTimes(prior=prior, weight=weight)


def test_busy_carries_the_estimate_and_the_queue() -> None:
    async def scenario() -> AirlockError:
        admission = Admission(max_running=2, max_waiting=3)
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(5):
                await stack.enter_async_context(admission.admit())
            for _ in range(2):  # two of the five hold a sandbox place, three wait
                await stack.enter_async_context(admission.run_slot())
            with pytest.raises(AirlockError) as info:
                async with admission.admit():
                    pass
        return info.value

    busy = asyncio.run(scenario())
    expected = (3 + 1) * PRIOR_JOB_SECONDS / 2
    assert busy.reason is Reason.BUSY
    assert busy.retry_after == RetryAfter(seconds=expected, queued=3)
    assert "3 waiting for one of 2 sandboxes" in busy.message
    assert f"retry in about {expected:.0f} s" in busy.message


def test_time_in_a_sandbox_place_feeds_the_estimate_unless_the_job_was_abandoned() -> None:
    async def scenario() -> list[float]:
        admission = Admission(max_running=1, max_waiting=0)
        seen = [admission.job_times.typical]
        async with admission.run_slot():
            pass
        seen.append(admission.job_times.typical)
        with pytest.raises(AirlockError):
            async with admission.run_slot():
                raise error(Reason.CONVERSION_FAILED, "it held the place all the same")
        seen.append(admission.job_times.typical)

        async def abandoned() -> None:
            async with admission.run_slot():
                await asyncio.sleep(3600)

        task = asyncio.ensure_future(abandoned())
        await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        seen.append(admission.job_times.typical)
        return seen

    prior, after_ok, after_failure, after_cancel = asyncio.run(scenario())
    assert prior == PRIOR_JOB_SECONDS
    assert after_ok == pytest.approx(prior * 0.8, abs=0.05)  # an instant job, weight 0.2
    assert after_failure == pytest.approx(after_ok * 0.8, abs=0.05)
    assert after_cancel == after_failure


def test_busy_status_holds_error_info_and_retry_info() -> None:
    busy = error(Reason.BUSY, "full", retry_after=RetryAfter(seconds=12.5, queued=7))
    status = status_of(busy, "job-1")
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(retry)
    assert info.reason == "BUSY" and dict(info.metadata) == {
        "job_id": "job-1", "kind": "failed", "queued": "7"}
    assert retry.retry_delay.ToNanoseconds() == 12_500_000_000


def test_other_errors_carry_no_retry_info() -> None:
    status = status_of(error(Reason.POLICY_VIOLATION, "no"), "job-2")
    assert len(status.details) == 1
    assert not status.details[0].Is(error_details_pb2.RetryInfo.DESCRIPTOR)

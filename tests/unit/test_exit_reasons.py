"""An artifact chooses the sandbox's exit code (the code it runs can call ``os._exit``), so no
exit code may map to a reason that a client or ``migrate`` retries: that would let a hostile
artifact have itself converted again and again (#11 §7)."""

from __future__ import annotations

import grpc
import pytest

from airlock_broker.conversion.jobs import EXIT_REASONS, judge
from airlock_broker.errors import STATUS_TABLE, AirlockError, Reason
from airlock_broker.sandboxes.sandbox import Outcome
from airlock_client._migrate_options import TRANSIENT_REASONS
from airlock_sandbox.contract import WorkerExit

#: Status codes the client retries (DESIGN §2: only UNAVAILABLE / RESOURCE_EXHAUSTED) and
#: INTERNAL, which ``migrate`` counts as transient.
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.INTERNAL}


def outcome(code: int | None) -> Outcome:
    return Outcome(exit_code=code, oom_killed=False, timed_out=False, duration_seconds=1.0,
                   image_id="", runtime="runc")


@pytest.mark.parametrize("code", [None, *range(1, 256)])
def test_no_exit_code_the_artifact_can_choose_is_retryable(code: int | None) -> None:
    with pytest.raises(AirlockError) as caught:
        judge(outcome(code), {"error": "\x1b[31mretry me"}, 60.0)
    reason = caught.value.reason
    assert STATUS_TABLE[reason][0] not in RETRIED, (code, reason)
    assert str(reason) not in TRANSIENT_REASONS, (code, reason)
    assert "\x1b" not in caught.value.message


def test_the_exit_table_names_no_retryable_reason() -> None:
    for code, reason in EXIT_REASONS.items():
        assert STATUS_TABLE[reason][0] not in RETRIED, (code, reason)


def test_a_refused_job_spec_is_a_bad_request_with_a_hint() -> None:
    with pytest.raises(AirlockError) as caught:
        judge(outcome(WorkerExit.BAD_JOB_SPEC), {"error": "unsupported dtype 'q8'"}, 60.0)
    assert caught.value.reason is Reason.BAD_REQUEST
    assert STATUS_TABLE[Reason.BAD_REQUEST][0] is grpc.StatusCode.INVALID_ARGUMENT
    assert "check the input specs" in caught.value.message
    assert "unsupported dtype 'q8'" in caught.value.message


def test_the_workers_sentence_is_shown_without_its_envelope() -> None:
    """The report's ``error`` is ``{"exit", "message"}``: the caller reads the sentence, not a
    Python dict, and the exit name only once."""
    said = {"exit": "PARITY_FAILED", "message": "PARITY_FAILED: 'y' differs by up to 2.86"}
    with pytest.raises(AirlockError) as caught:
        judge(outcome(WorkerExit.PARITY_FAILED), {"error": said}, 60.0)
    message = caught.value.message
    assert message.endswith("(sandbox said, unverified: 'y' differs by up to 2.86)"), message
    assert "{" not in message and message.count("PARITY_FAILED") == 0, message
    hostile = {"exit": 7, "message": ["\x1b[2J", {"nested": True}]}
    with pytest.raises(AirlockError) as caught:
        judge(outcome(WorkerExit.PARITY_FAILED), {"error": hostile}, 60.0)
    assert "unverified" in caught.value.message and "\x1b" not in caught.value.message

"""Records of calls refused before their upload are written within a budget per principal
(conversion/audit.py): a caller's cheap refusals cannot fill the disk, another principal's
still appear, the next record says how many were left out, and a job's record always is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from airlock_broker.conversion import audit
from airlock_broker.conversion.audit import AuditLog, AuditRecord


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _refused(principal: str, n: int) -> AuditRecord:
    record = AuditRecord(job_id=f"job-{principal}-{n}", principal=principal)
    record.set(outcome="failed", reason="BAD_REQUEST", filename="\n" * 5000)
    return record


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_refusals_are_budgeted_per_principal_and_the_next_says_how_many_were_left_out(
        tmp_path: Path) -> None:
    clock = Clock()
    log = AuditLog(tmp_path / "audit.jsonl", clock=clock)
    try:
        per = audit.REFUSALS_PER_WINDOW
        for n in range(per + 5):
            log.write(_refused("mallory", n), before_upload=True)
        log.write(_refused("alice", 0), before_upload=True)  # her own budget
        job = AuditRecord(job_id="job-converted", principal="mallory")
        job.set(outcome="ok")
        log.write(job)  # a job that got further: always
        lines = _lines(tmp_path / "audit.jsonl")
        assert [r["principal"] for r in lines].count("mallory") == per + 1
        assert {r["job_id"] for r in lines} >= {"job-alice-0", "job-converted"}

        clock.now += audit.REFUSAL_WINDOW_SECONDS  # the next window
        log.write(_refused("mallory", 99), before_upload=True)
        last = _lines(tmp_path / "audit.jsonl")[-1]
        assert last["job_id"] == "job-mallory-99" and last["refusals_not_recorded"] == 5
    finally:
        log.close()


def test_many_principals_do_not_add_up_to_many_budgets(tmp_path: Path,
                                                         monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Found by review of the fix: budgets keyed by principal alone, a user's subordinate
    # uids (each its own principal) evicted each other's and every refusal was written.
    monkeypatch.setattr(audit, "_MAX_BUDGETS", 8)
    clock = Clock()
    log = AuditLog(tmp_path / "audit.jsonl", clock=clock)
    try:
        for uid in range(1000):
            log.write(_refused(f"uid:{uid}", 0), before_upload=True)
        assert len(log._refusals) == 8
        assert len(_lines(tmp_path / "audit.jsonl")) == audit.REFUSALS_IN_ALL_PER_WINDOW
        clock.now += audit.REFUSAL_WINDOW_SECONDS
        log.write(_refused("uid:1", 1), before_upload=True)
        last = _lines(tmp_path / "audit.jsonl")[-1]
        assert last["refusals_not_recorded_in_all"] == 1000 - audit.REFUSALS_IN_ALL_PER_WINDOW
    finally:
        log.close()


def test_a_users_subordinate_uids_share_its_budget(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", clock=Clock())
    try:
        for uid in range(100):  # each its own principal, all counted as user 1000's
            log.write(_refused(f"uid:{100000 + uid}", 0), before_upload=True, caller="uid:1000")
        assert len(_lines(tmp_path / "audit.jsonl")) == audit.REFUSALS_PER_WINDOW
    finally:
        log.close()


def test_a_refusal_that_says_something_of_its_caller_is_always_written(tmp_path: Path) -> None:
    # Found by review of the fix: someone else's ticket, refused before an upload, was hidden
    # among twenty cheap refusals.
    log = AuditLog(tmp_path / "audit.jsonl", clock=Clock())
    try:
        for n in range(audit.REFUSALS_PER_WINDOW + 5):
            log.write(_refused("mallory", n), before_upload=True)
        stolen = AuditRecord(job_id="job-stolen-ticket", principal="mallory")
        stolen.set(outcome="denied", reason="LOCAL_HANDLE_FOREIGN")
        log.write(stolen, before_upload=True)
        assert _lines(tmp_path / "audit.jsonl")[-1]["job_id"] == "job-stolen-ticket"
    finally:
        log.close()

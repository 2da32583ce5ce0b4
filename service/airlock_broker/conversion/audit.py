"""The audit log: one JSON line per job, and one per operator action on the pools (an
``action`` instead of a ``job_id``), appended, never rewritten.

It records who asked for what, what the broker observed and decided, and what it returned;
never artifact bytes and never secrets. Every string that came from a caller or a sandbox is
escaped by ``json.dumps(ensure_ascii=True)`` (control characters included) and capped.

A call refused before its upload began (the broker busy or drained, metadata it refuses)
costs its caller one small message, and its record was up to 1.5 KB: one client filled the
disk at 40 GiB a day (found by review). Those records (``BUDGETED`` reasons only) are written
within a budget per caller (``REFUSALS_PER_WINDOW`` per ``REFUSAL_WINDOW_SECONDS``; a user's
subordinate uids are that user, auth.Principal.quota) and one for all callers together
(``REFUSALS_IN_ALL_PER_WINDOW``: many principals do not add up to many budgets); the next
one written says how many were left out (``refusals_not_recorded``, and
``refusals_not_recorded_in_all``). A refusal that says something about its caller (a ticket
that is not theirs, a credential) is always written, as is every job that got further, and
the metrics count every call.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airlock_broker.ops.log_budget import LogBudget
from airlock_broker.security.state_dirs import open_private_file
from airlock_broker.timestamps import utc_second

log = logging.getLogger(__name__)

_MAX_STRING = 512
#: Records of calls refused before their upload, per caller and window (see above).
REFUSALS_PER_WINDOW = 20
REFUSAL_WINDOW_SECONDS = 10.0
#: ... and for all callers together.
REFUSALS_IN_ALL_PER_WINDOW = 200
#: The reasons whose records are budgeted: what any caller can have at the cost of a message.
BUDGETED = frozenset({"BAD_REQUEST", "BUSY", "SANDBOX_UNAVAILABLE", "CANCELLED",
                      "DEADLINE_EXCEEDED", "TOO_LARGE", "SAMPLE_TOO_LARGE", "SAMPLE_INVALID",
                      "SPOOL_FULL", "LOCAL_TRANSFER_DISABLED"})
#: Callers whose refusal budgets are kept (the least recently refused is forgotten; the
#: budget for all callers still holds).
_MAX_BUDGETS = 1024


@dataclass
class AuditRecord:
    """Filled in as a job progresses; written once, in the job's ``finally``."""

    job_id: str
    peer: str = ""
    principal: str = "anonymous"
    started: float = field(default_factory=time.time)
    fields: dict[str, Any] = field(default_factory=dict)

    def set(self, **values: Any) -> None:
        self.fields.update(values)

    def document(self) -> dict[str, Any]:
        doc = {
            "time": utc_second(self.started),
            "job_id": self.job_id,
            "principal": self.principal,
            "peer": self.peer,
            **self.fields,
            "duration_seconds": round(time.time() - self.started, 3),
        }
        return {k: _cap(v) for k, v in doc.items()}


def _cap(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= _MAX_STRING else value[:_MAX_STRING] + "..."
    if isinstance(value, dict):
        return {str(k)[:64]: _cap(v) for k, v in list(value.items())[:64]}
    if isinstance(value, (list, tuple)):
        return [_cap(v) for v in list(value)[:64]]
    return value


class AuditLog:
    """Appends records to a file opened ``O_APPEND``: one ``write`` per line, 0600.

    Opened ``O_NOFOLLOW`` and checked (state_dirs.open_private_file): a planted
    ``audit.jsonl -> /etc/ld.so.preload`` (or a hard link to it) would otherwise have the
    broker append caller-chosen text to a file of root's. Its directory is checked at start-up.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._fd = open_private_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self._lock = threading.Lock()
        self._clock = clock
        self._refusals: OrderedDict[str, LogBudget] = OrderedDict()
        self._all_refusals = LogBudget(REFUSALS_IN_ALL_PER_WINDOW, REFUSAL_WINDOW_SECONDS,
                                       clock)

    def write(self, record: AuditRecord, *, before_upload: bool = False,
              caller: str = "") -> None:
        """Never raises: a full disk must not turn a finished job into a crash; it is logged.
        ``before_upload``: the call was refused before its upload began, so a record of a
        ``BUDGETED`` reason is written within the budgets of ``caller`` (default: the
        principal) and of all callers (see the module docstring)."""
        if before_upload and record.fields.get("reason") in BUDGETED:
            written, dropped = self._refusal_budget(caller or record.principal).take()
            if not written:
                return
            written, dropped_in_all = self._all_refusals.take()
            if not written:
                return
            if dropped:
                record.set(refusals_not_recorded=dropped)
            if dropped_in_all:
                record.set(refusals_not_recorded_in_all=dropped_in_all)
        self._append(record.document(), f"job {record.job_id}")

    def _refusal_budget(self, caller: str) -> LogBudget:
        with self._lock:
            budget = self._refusals.pop(caller, None) or LogBudget(
                REFUSALS_PER_WINDOW, REFUSAL_WINDOW_SECONDS, self._clock)
            self._refusals[caller] = budget  # the most recently refused last
            while len(self._refusals) > _MAX_BUDGETS:
                self._refusals.popitem(last=False)
            return budget

    def action(self, action: str, principal: str, auth: str, peer: str, **fields: Any) -> None:
        """An operator's action (a drain, a restart, a self-test), with who asked and how it
        ended; never raises, as ``write``."""
        doc = {"time": utc_second(time.time()), "action": action,
               "principal": principal, "auth": auth, "peer": peer, **fields}
        self._append({k: _cap(v) for k, v in doc.items()}, f"the {action} action")

    def _append(self, doc: dict[str, Any], what: str) -> None:
        line = json.dumps(doc, ensure_ascii=True, sort_keys=True, default=str) + "\n"
        try:
            with self._lock:
                os.write(self._fd, line.encode())
        except OSError as exc:
            log.error("could not write the audit record of %s: %s", what, exc)

    def close(self) -> None:
        """Idempotent: the descriptor number is closed once, never a reused one."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

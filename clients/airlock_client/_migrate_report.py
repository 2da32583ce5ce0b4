"""What ``airlock migrate`` reports: one :class:`Outcome` per source version, its
:class:`Status`, the one-line description progress prints, and the tallies the summary and
the exit code are built from. No registry or broker calls here."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from airlock_client import _lineage as tags


class Status(enum.StrEnum):
    CONVERTED = "converted"                 # migrated by this run
    ALREADY_MIGRATED = "already_migrated"   # a migrated twin exists: skipped
    WOULD_CONVERT = "would_convert"         # --dry-run: this run would convert it
    REJECTED = "rejected"                   # a check refused the artifact or its output
    FAILED = "failed"                       # conversion or download failed
    FAILED_EARLIER = "failed_earlier"       # refused by an earlier run: skipped (retry_failed)
    NOT_READY = "not_ready"                 # the registry has not finished creating it
    NOT_STARTED = "not_started"             # the run stopped (abort, Ctrl-C) before it
    UNVERIFIED = "unverified"               # --dry-run with no pinned key: claims a twin


#: Outcomes that leave a version without a migrated twin, for a reason worth an exit code.
PROBLEMS = frozenset({Status.REJECTED, Status.FAILED, Status.FAILED_EARLIER, Status.NOT_READY})


@dataclass(frozen=True)
class Outcome:
    """What happened to one source version."""

    model: str
    version: str
    status: Status
    #: ``NAME-airlock/VERSION`` of the migrated twin, when there is one.
    target: str = ""
    format: str = ""
    assurance: str = ""
    #: Whether converting it ran the artifact's own code in the sandbox (signed; None when
    #: nothing was converted or the record does not say).
    executed_artifact_code: bool | None = None
    source_sha256: str = ""
    output_sha256: str = ""
    reason: str = ""
    message: str = ""
    seconds: float = 0.0


def describe(outcome: Outcome) -> str:
    """The outcome as the end of one progress line."""
    if outcome.status in {Status.CONVERTED, Status.ALREADY_MIGRATED}:
        extra = f" {outcome.format} {outcome.assurance}".rstrip() if outcome.format else ""
        if outcome.executed_artifact_code:
            extra += " (its code ran in the sandbox)"
        return f"{outcome.status} -> {outcome.target}{extra}"
    return f"{outcome.status}: {outcome.reason}: {tags.clip(outcome.message, 200)}"


def counts(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """How many versions ended in each status (every status present, zeros included)."""
    tally = dict.fromkeys((str(s) for s in Status), 0)
    for outcome in outcomes:
        tally[str(outcome.status)] += 1
    return tally


def with_not_started(planned: Sequence[tuple[str, str]],
                     outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Every planned (model, version), in the plan's order: its outcome, or ``NOT_STARTED``
    for a version a stopped run never reached (a summary of 6 outcomes out of 30 must still
    say 30)."""
    ended: dict[tuple[str, str], Outcome | None] = {(o.model, o.version): o for o in outcomes}
    rows = [ended.pop(item, None) or Outcome(*item, Status.NOT_STARTED) for item in planned]
    return rows + [o for o in ended.values() if o is not None]  # none, unless cut short


def iter_problems(outcomes: Sequence[Outcome]) -> Iterator[Outcome]:
    return (o for o in outcomes if o.status in PROBLEMS)

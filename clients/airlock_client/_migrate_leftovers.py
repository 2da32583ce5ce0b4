"""Runs that a killed ``airlock migrate`` left open, and whether one holds a conversion.

``migrate`` logs each conversion in a run of the ``airlock-migrations`` experiment before it
registers the run as a twin, and closes the run after. A process killed in between (SIGKILL,
the machine gone) leaves the run RUNNING: with both files logged and no twin, with a twin but
never closed, or with nothing at all. The next run finds these runs (``find``: one paged
search) and, for a version it migrates, adopts one whose files verify like a twin's
(``verify``: signed by the pinned key, the model file = the signed sha256 and size, the signed
subject and input = this very source version) instead of converting again; it closes the rest
as FAILED. A run's tags, like a version's, are believed for nothing but finding it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from airlock_client import _lineage as tags
from airlock_client._errors import SafeLoadError
from airlock_client._registry import Registry, walk_pages
from airlock_client._twin import Download, Listing, output_format, verified_output
from airlock_client.provenance import ProvenanceRecord, PublicKeyLike, check_source

#: MLflow's search filter for runs still open.
OPEN = "attributes.status = 'RUNNING'"


@dataclass(frozen=True)
class OpenRun:
    run_id: str
    #: The run's artifact root; its files are under ``tags.ARTIFACT_DIR``.
    artifact_uri: str
    tags: Mapping[str, str]


def find(registry: Registry, experiment: str,
         page_size: int) -> dict[tuple[str, str], list[OpenRun]]:
    """The experiment's open runs, by the (source model, source version) their tags name."""
    found = registry.get_experiment_by_name(experiment)
    if found is None:
        return {}
    experiment_id = str(found.experiment_id)
    runs: dict[tuple[str, str], list[OpenRun]] = {}
    for run in walk_pages(lambda token: registry.search_runs(
            [experiment_id], filter_string=OPEN, max_results=page_size, page_token=token),
            f"the open runs of the experiment {experiment!r}"):
        open_run = _open_run(run)
        model, version = (open_run.tags.get(tags.SOURCE_MODEL, ""),
                          open_run.tags.get(tags.SOURCE_VERSION, ""))
        if model and version:
            runs.setdefault((model, version), []).append(open_run)
    return runs


def verify(run: OpenRun, download: Download, public_key: PublicKeyLike, *, subject: str,
           source_sha256: str, listing: Listing | None = None) -> ProvenanceRecord:
    """The signed record of the conversion ``run`` holds, once its files verify as the
    conversion of ``subject`` from bytes whose sha256 is ``source_sha256``; else raise an
    ``IntegrityError`` (files missing, unsigned, altered, or of another source)."""
    fmt = output_format(run.tags.get(tags.OUTPUT_FORMAT, ""))
    if fmt is None:
        raise SafeLoadError("NOT_AIRLOCK_OUTPUT", f"run {run.run_id} names no output format")
    base = f"{run.artifact_uri.rstrip('/')}/{tags.ARTIFACT_DIR}"
    record, _ = verified_output(download, base, fmt, public_key, f"run {run.run_id}",
                                listing=listing)
    check_source(record, subject=subject, sha256=source_sha256)
    return record


def _open_run(run: Any) -> OpenRun:
    """MLflow's ``Run`` (info and data) as the little this module reads of it."""
    return OpenRun(run_id=str(run.info.run_id), artifact_uri=str(run.info.artifact_uri),
                   tags={str(k): str(v) for k, v in (run.data.tags or {}).items()})

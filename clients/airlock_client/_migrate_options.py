"""What a run of ``airlock migrate`` is given: its :class:`Options`, the callables that fetch
and convert a version and print progress, and which failure reasons a later run retries. No
registry or broker calls here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from airlock_client import _lineage as tags
from airlock_client._registry import DEFAULT_PAGE_SIZE
from airlock_client._types import ConversionResult
from airlock_client.batch import MAX_CONCURRENCY
from airlock_client.mlflow_source import DOWNLOAD_FAILED

if TYPE_CHECKING:
    from airlock_client.model_dir import DirectoryResult

#: ``convert(model_dir, output, subject) -> result``: convert in the broker's sandbox, with
#: ``subject`` (``models:/NAME/VERSION``) signed into the provenance.
Convert = Callable[[Path, Path, str], ConversionResult]
#: ``convert_directory(model_dir, output_dir, subject)``: convert the Hugging Face model
#: directory in ``model_dir`` (an MLflow transformers version) file by file into the new
#: directory ``output_dir``, each file signed as ``subject/FILE`` (``model_dir``).
ConvertDirectory = Callable[[Path, Path, str], "DirectoryResult"]
#: One line of progress for a human (the CLI prints it on stderr).
Progress = Callable[[str], None]

EXPERIMENT = "airlock-migrations"
#: The most versions one run migrates at once (``--jobs``).
MAX_JOBS = MAX_CONCURRENCY
#: Failure reasons that judge the moment, not the artifact: retried by the next run.
TRANSIENT_REASONS = frozenset({
    "SANDBOX_TIMEOUT", "SANDBOX_OOM", "BUSY", "DEADLINE_EXCEEDED", "CANCELLED",
    "SANDBOX_UNAVAILABLE", "UNAVAILABLE", "INTERNAL", "DOWNLOAD_FAILED", DOWNLOAD_FAILED,
})


@dataclass(frozen=True)
class Options:
    page_size: int = DEFAULT_PAGE_SIZE
    dry_run: bool = False
    #: Point this alias of each target model at the twin of its newest migrated version.
    alias: str | None = None
    retry_failed: bool = False
    target_suffix: str = tags.TARGET_SUFFIX
    experiment: str = EXPERIMENT
    #: Versions migrated at once (1: one after the other).
    jobs: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.jobs <= MAX_JOBS:
            raise ValueError(f"jobs must be between 1 and {MAX_JOBS}, not {self.jobs}")

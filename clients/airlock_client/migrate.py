"""Migrate an MLflow model registry through Airlock, a bounded number of versions at a time.

For every version of the selected registered models, ``Migration`` downloads the version's
files (bytes only), has the broker convert them in a sandbox, and registers the result as a new
version of ``<NAME>-airlock``: a version whose artifacts are exactly one ONNX or safetensors
file and its signed provenance, tagged with where it came from (see ``_lineage``). Nothing in
this module opens a model; conversion happens in the broker's sandboxes.

Runs are resumable and idempotent: the target model's versions are the record of what is done,
so a version that already has a migrated twin is skipped, and a run that stopped half-way is
simply run again. A twin counts only when its signed provenance verifies with the pinned key
and names this very source version and its bytes (``_twin``); tags are never enough, because
anyone who may write to the registry can set them. An alias is only ever pointed at such a
twin. A version the broker refused is tagged on the source (reason and message) and
skipped by later runs unless ``retry_failed``; failures that say nothing about the artifact
(timeouts, a busy or restarting service) are retried on the next run. One version failing never
stops the run; the broker or the tracking server going away does (``MigrationAborted``),
because every later version would fail the same way.

Versions are migrated ``Options.jobs`` at a time (``batch.run_bounded``): they are taken
from the walk as slots free up, and the outcomes are reported in the walk's order (model by
model, oldest version first) whatever order they finished in. A target model's alias is set
once all of its versions are done. With more than one job, the twins' version numbers follow
the order in which conversions finish (each twin's tags name its source version). An
interrupted run (Ctrl-C) starts nothing new and lets the versions in flight finish, so none
is left registered but untagged.

This module runs the walk; ``_migrate_walk`` selects models and finds targets,
``_migrate_version`` migrates one version, ``_migrate_report`` holds what is reported,
``_migrate_options`` what a run is given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from airlock_client import _lineage as tags
from airlock_client._batch_jobs import JOBS_PROFILE, MAX_DEFAULT_JOBS, default_jobs
from airlock_client._errors import (
    AccessDenied,
    AirlockError,
    ModelSourceError,
    ServiceUnavailable,
)
from airlock_client._lineage import TARGET_SUFFIX
from airlock_client._migrate_leftovers import find as find_open_runs
from airlock_client._migrate_options import (
    EXPERIMENT,
    MAX_JOBS,
    TRANSIENT_REASONS,
    Convert,
    ConvertDirectory,
    Options,
    Progress,
)
from airlock_client._migrate_pace import Pace
from airlock_client._migrate_report import (
    PROBLEMS,
    Outcome,
    Status,
    counts,
    iter_problems,
    with_not_started,
)
from airlock_client._migrate_version import VersionMigration
from airlock_client._migrate_walk import SelectionError, Target, find_target, select
from airlock_client._registry import Fetch, ModelVersion, Registry, model_versions
from airlock_client._twin import Download, Listing
from airlock_client.batch import Done, run_bounded
from airlock_client.provenance import PublicKeyLike

__all__ = [
    "EXPERIMENT", "JOBS_PROFILE", "MAX_DEFAULT_JOBS", "MAX_JOBS", "PROBLEMS", "TARGET_SUFFIX",
    "TRANSIENT_REASONS", "Convert", "ConvertDirectory", "Download", "Fetch", "Migration",
    "MigrationAborted", "Options", "Outcome", "Progress", "SelectionError", "Status", "counts",
    "default_jobs", "iter_problems", "with_not_started",
]


_DEFAULTS = Options()
#: (position in the walk, 1-based; model; version; its target)
_Item = tuple[int, str, ModelVersion, Target]


class MigrationAborted(AirlockError):
    """The broker or the tracking server went away, or the broker refused the credentials;
    ``outcomes`` is what was done before. ``reason``: BROKER_UNAVAILABLE,
    REGISTRY_UNAVAILABLE, UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, reason: str, message: str, outcomes: Sequence[Outcome]) -> None:
        super().__init__(message, reason=reason)
        self.outcomes = list(outcomes)


class Migration:
    """One run of ``airlock migrate`` over a registry (see the module docstring)."""

    def __init__(self, registry: Registry, *, fetch: Fetch, convert: Convert,
                 download: Download, public_key: PublicKeyLike | None,
                 options: Options = _DEFAULTS, progress: Progress | None = None,
                 abandon: Callable[[], None] | None = None,
                 convert_directory: ConvertDirectory | None = None,
                 listing: Listing | None = None) -> None:
        """``download(artifact_uri, dest_dir)`` fetches a twin's files (bytes only) to verify
        them; ``public_key`` is the broker's key, pinned (never one fetched from the broker:
        what is verified with it is written into the registry). Only a dry run may pass None
        (``ValueError`` otherwise): its versions that claim a twin are ``UNVERIFIED``. With
        ``options.jobs`` above 1, ``fetch``, ``convert``, ``download`` and ``progress`` are
        called from several threads at once (one version each). ``abandon`` makes the
        conversions in flight end at once when a second Ctrl-C comes while they finish (the
        CLI closes its broker client: they fail as ``CANCELLED``, which the next run
        retries). ``convert_directory`` converts a version that holds a Hugging Face model
        directory (an MLflow transformers model with PyTorch weights) file by file, and its
        twin is that safetensors directory (``_twin_dir``); without it such a version is sent
        as its bundle, which the broker refuses (``UNSUPPORTED_FLAVOR``). ``listing`` lists a
        folder of the artifact store: a claimed twin whose folder holds anything beside its
        files (an ``MLmodel`` MLflow's loaders would follow) is no twin."""
        self.registry = registry
        self.options = options
        self.progress = progress or (lambda _line: None)
        #: Versions done (failed, skipped) so far, the conversions' rate and the time left.
        self.throughput = Pace()
        #: (model, version) of every version the walk holds, in its order, as listed so far.
        self.planned: list[tuple[str, str]] = []
        #: The outcomes of the last ``run`` so far, in the walk's order once it returns or
        #: raises: what an interrupted run (KeyboardInterrupt) had finished.
        self.outcomes: list[Outcome] = []
        self._abandon = abandon
        self._versions = VersionMigration(registry, fetch=fetch, convert=convert,
                                          download=download, public_key=public_key,
                                          options=options, progress=self.progress,
                                          convert_directory=convert_directory,
                                          listing=listing)

    def select(self, names: Sequence[str] | None) -> list[str]:
        """The models to migrate: ``names`` (each checked), or every model but Airlock's own."""
        return select(self.registry, names, self.options.page_size, self.options.target_suffix)

    def run(self, names: Sequence[str] | None) -> list[Outcome]:
        """Migrate every version of the selected models; never stops for one version."""
        outcomes: list[Outcome] = []
        self.outcomes, self.planned = outcomes, []
        try:
            models = self.select(names)
            plan = [(name, model_versions(self.registry, name, self.options.page_size),
                     find_target(self.registry, name, self.options.target_suffix,
                                 self.options.page_size)) for name in models]
            self.planned = [(name, str(mv.version)) for name, versions, _ in plan
                            for mv in versions]
            total = sum(len(versions) for _, versions, _ in plan)
            self.progress(f"{total} version(s) in {len(plan)} registered model(s)"
                          f"{' (dry run: nothing will change)' if self.options.dry_run else ''}"
                          f"{f', {self.options.jobs} at a time' if self.options.jobs > 1 else ''}")
            self.throughput = Pace(total)
            if not self.options.dry_run:
                self._versions.open_runs = find_open_runs(
                    self.registry, self.options.experiment, self.options.page_size)
            try:
                self._walk(plan, total, outcomes)
            finally:
                order = {name: i for i, name in enumerate(models)}
                outcomes.sort(key=lambda o: (order[o.model], int(o.version)))
        except ServiceUnavailable as exc:
            raise MigrationAborted("BROKER_UNAVAILABLE", exc.message, outcomes) from exc
        except AccessDenied as exc:  # the caller's credentials, not the artifact
            raise MigrationAborted(exc.reason, exc.message, outcomes) from exc
        except ModelSourceError as exc:  # where this run's own outputs would go: every one
            raise MigrationAborted(exc.reason, exc.message, outcomes) from exc
        except (SelectionError, MigrationAborted):
            raise
        except Exception as exc:  # the registry client raises its own tree (and requests')
            raise MigrationAborted("REGISTRY_UNAVAILABLE",
                                   f"{type(exc).__name__}: {tags.clip(str(exc), 300)}",
                                   outcomes) from exc
        return outcomes

    def _walk(self, plan: Sequence[tuple[str, Sequence[ModelVersion], Target]], total: int,
              outcomes: list[Outcome]) -> None:
        """Migrate the plan's versions ``jobs`` at a time, appending each outcome as it ends.

        A version's exception (the broker or the registry gone: every later version would fail
        the same way) stops the walk: nothing new starts, what is in flight finishes, and the
        first such exception is raised."""
        left = {name: len(versions) for name, versions, _ in plan}

        def items() -> Iterator[_Item]:
            position = 0
            for name, versions, target in plan:
                for mv in versions:
                    position += 1
                    yield position, name, mv, target

        #: Every outcome by position as its version ends, on the version's thread: an
        #: interrupted batch lets the versions in flight finish but yields them no more.
        ended: dict[int, Outcome] = {}
        reported: set[int] = set()

        def work(item: _Item) -> Outcome:
            position, name, mv, target = item
            ended[position] = outcome = self._versions.one(name, mv, target,
                                                           f"[{position}/{total}]")
            return outcome

        failure: Exception | None = None
        batch = run_bounded(items(), work, concurrency=self.options.jobs,
                            stop=lambda done: not done.ok, abandon=self._abandon)
        try:
            with contextlib.closing(batch):
                try:
                    for done in batch:
                        if done.error is not None:
                            failure = failure or done.error
                            continue
                        reported.add(done.item[0])
                        self._finished(done, outcomes, left, failure is None)
                except KeyboardInterrupt:
                    self.progress("interrupted: no new version starts, the ones in flight "
                                  "finish (run again to resume)")
                    raise
        finally:  # closed: the versions in flight have ended, reported or not
            outcomes.extend(o for p, o in sorted(ended.items()) if p not in reported)
        if failure is not None:
            raise failure

    def _finished(self, done: Done[_Item, Outcome], outcomes: list[Outcome],
                  left: dict[str, int], going: bool) -> None:
        _, name, _, target = done.item
        outcome = done.result
        assert outcome is not None
        outcomes.append(outcome)
        self.throughput.add(outcome)
        self.progress(self.throughput.line())
        left[name] -= 1
        if not left[name] and going:
            self._set_alias(target, [o for o in outcomes if o.model == name])

    def _set_alias(self, target: Target, outcomes: Sequence[Outcome]) -> None:
        alias = self.options.alias
        done = [o for o in outcomes if o.status in {Status.CONVERTED, Status.ALREADY_MIGRATED}]
        if not alias or self.options.dry_run or not done:
            return
        newest = max(done, key=lambda o: int(o.version))
        unknown = sorted(int(v) for m, v in self._versions.unchecked
                         if m == newest.model and int(v) > int(newest.version))
        if unknown:
            self.progress(f"alias {target.name}@{alias} left as it is: {newest.model} "
                          f"v{unknown[-1]} has a twin that could not be checked this run")
            return
        version = newest.target.rpartition("/")[2]
        if target.aliases.get(alias) == version:
            return
        with self._versions.writes:
            self.registry.set_registered_model_alias(target.name, alias, version)
        target.aliases[alias] = version
        self.progress(f"alias {target.name}@{alias} -> {newest.target} "
                      f"(from {newest.model} v{newest.version})")

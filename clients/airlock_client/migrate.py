"""Migrate an MLflow model registry through Airlock, one version at a time.

For every version of the selected registered models, ``Migration`` downloads the version's
files (bytes only), has the broker convert them in a sandbox, and registers the result as a new
version of ``<NAME>-airlock``: a version whose artifacts are exactly one ONNX or safetensors
file and its signed provenance, tagged with where it came from (see ``_lineage``). Nothing in
this module opens a model; conversion happens in the broker's sandboxes.

Runs are resumable and idempotent: the target model's versions are the record of what is done,
so a version that already has a migrated twin is skipped, and a run that stopped half-way is
simply run again. A version the broker refused is tagged on the source (reason and message) and
skipped by later runs unless ``retry_failed``; failures that say nothing about the artifact
(timeouts, a busy or restarting service) are retried on the next run. One version failing never
stops the run; the broker or the tracking server going away does (``MigrationAborted``),
because every later version would fail the same way.
"""

from __future__ import annotations

import contextlib
import enum
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from airlock_client import _lineage as tags
from airlock_client._errors import (
    AccessDenied,
    AirlockError,
    ConversionError,
    IntegrityError,
    ModelSourceError,
    ServiceUnavailable,
)
from airlock_client._registry import (
    DEFAULT_PAGE_SIZE,
    ModelVersion,
    RegisteredModel,
    Registry,
    filter_literal,
    model_versions,
    registered_models,
    tag,
)
from airlock_client._types import ConversionResult
from airlock_client.mlflow_source import DOWNLOAD_FAILED

#: ``fetch(models_uri, dest_dir) -> model_dir``: download a version's files, bytes only.
Fetch = Callable[[str, Path], Path]
#: ``convert(model_dir, output) -> result``: convert in the broker's sandbox, verified.
Convert = Callable[[Path, Path], ConversionResult]
#: One line of progress for a human (the CLI prints it on stderr).
Progress = Callable[[str], None]

TARGET_SUFFIX = "-airlock"
#: MLflow 3 keeps prompts in the model registry too; they are text, not models.
_PROMPT_TAG = "mlflow.prompt.is_prompt"
EXPERIMENT = "airlock-migrations"
#: Failure reasons that judge the moment, not the artifact: retried by the next run.
TRANSIENT_REASONS = frozenset({
    "SANDBOX_TIMEOUT", "SANDBOX_OOM", "BUSY", "DEADLINE_EXCEEDED", "CANCELLED",
    "SANDBOX_UNAVAILABLE", "UNAVAILABLE", "INTERNAL", "DOWNLOAD_FAILED", DOWNLOAD_FAILED,
})


class Status(enum.StrEnum):
    CONVERTED = "converted"                 # migrated by this run
    ALREADY_MIGRATED = "already_migrated"   # a migrated twin exists: skipped
    WOULD_CONVERT = "would_convert"         # --dry-run: this run would convert it
    REJECTED = "rejected"                   # a check refused the artifact or its output
    FAILED = "failed"                       # conversion or download failed
    FAILED_EARLIER = "failed_earlier"       # refused by an earlier run: skipped (retry_failed)
    NOT_READY = "not_ready"                 # the registry has not finished creating it


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
    source_sha256: str = ""
    output_sha256: str = ""
    reason: str = ""
    message: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Options:
    page_size: int = DEFAULT_PAGE_SIZE
    dry_run: bool = False
    #: Point this alias of each target model at the twin of its newest migrated version.
    alias: str | None = None
    retry_failed: bool = False
    target_suffix: str = TARGET_SUFFIX
    experiment: str = EXPERIMENT


class SelectionError(AirlockError):
    """A named model does not exist or cannot be migrated (a usage error)."""


class MigrationAborted(AirlockError):
    """The broker or the tracking server went away, or the broker refused the credentials;
    ``outcomes`` is what was done before. ``reason``: BROKER_UNAVAILABLE,
    REGISTRY_UNAVAILABLE, UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, reason: str, message: str, outcomes: Sequence[Outcome]) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.outcomes = list(outcomes)


@dataclass
class _Target:
    name: str
    exists: bool
    #: source version -> the target version that is its migrated twin
    twins: dict[str, ModelVersion] = field(default_factory=dict)
    conflict: str = ""
    aliases: dict[str, str] = field(default_factory=dict)


class Migration:
    """One run of ``airlock migrate`` over a registry (see the module docstring)."""

    def __init__(self, registry: Registry, *, fetch: Fetch, convert: Convert,
                 options: Options = Options(), progress: Progress | None = None) -> None:
        self.registry = registry
        self.fetch = fetch
        self.convert = convert
        self.options = options
        self.progress = progress or (lambda _line: None)
        self._experiment_id: str | None = None

    # -- selection ---------------------------------------------------------------------------

    def select(self, names: Sequence[str] | None) -> list[str]:
        """The models to migrate: ``names`` (each checked), or every model but Airlock's own."""
        if names is None:
            return [m.name for m in registered_models(self.registry, self.options.page_size)
                    if tag(m, tags.ROLE) != tags.ROLE_MIGRATED
                    and tag(m, _PROMPT_TAG) != "true"]
        chosen: list[str] = []
        for name in dict.fromkeys(names):
            found = self._registered_model(name)
            if found is None:
                raise SelectionError(f"no registered model is named {name!r}")
            if tag(found, tags.ROLE) == tags.ROLE_MIGRATED:
                raise SelectionError(f"{name!r} holds Airlock's migrated versions; migrate its "
                                     f"source ({tag(found, tags.SOURCE_MODEL) or '?'}) instead")
            chosen.append(name)
        return chosen

    # -- the run -----------------------------------------------------------------------------

    def run(self, names: Sequence[str] | None) -> list[Outcome]:
        """Migrate every version of the selected models; never stops for one version."""
        outcomes: list[Outcome] = []
        try:
            models = self.select(names)
            plan = [(name, model_versions(self.registry, name, self.options.page_size),
                     self._target(name)) for name in models]
            total = sum(len(versions) for _, versions, _ in plan)
            self.progress(f"{total} version(s) in {len(plan)} registered model(s)"
                          f"{' (dry run: nothing will change)' if self.options.dry_run else ''}")
            done = 0
            for name, versions, target in plan:
                for mv in versions:
                    done += 1
                    outcome = self._one(name, mv, target, f"[{done}/{total}]")
                    outcomes.append(outcome)
                self._set_alias(target, [o for o in outcomes if o.model == name])
        except ServiceUnavailable as exc:
            raise MigrationAborted("BROKER_UNAVAILABLE", exc.message, outcomes) from exc
        except AccessDenied as exc:  # the caller's credentials, not the artifact
            raise MigrationAborted(exc.reason, exc.message, outcomes) from exc
        except (SelectionError, MigrationAborted):
            raise
        except Exception as exc:  # the registry client raises its own tree (and requests')
            raise MigrationAborted("REGISTRY_UNAVAILABLE",
                                   f"{type(exc).__name__}: {tags.clip(str(exc), 300)}",
                                   outcomes) from exc
        return outcomes

    def _one(self, name: str, mv: ModelVersion, target: _Target, step: str) -> Outcome:
        version = str(mv.version)
        skip = self._skip(name, mv, target)
        if skip is not None:
            self.progress(f"{step} {name} v{version}: {_describe(skip)}")
            return skip
        if self.options.dry_run:
            outcome = Outcome(name, version, Status.WOULD_CONVERT, target=f"{target.name}/?")
            self.progress(f"{step} {name} v{version}: would convert")
            return outcome
        self.progress(f"{step} {name} v{version}: converting")
        began = time.monotonic()
        outcome = self._migrate(name, version, target)
        outcome = Outcome(**{**outcome.__dict__, "seconds": round(time.monotonic() - began, 3)})
        self.progress(f"{step} {name} v{version}: {_describe(outcome)} "
                      f"({outcome.seconds:.1f} s)")
        return outcome

    def _skip(self, name: str, mv: ModelVersion, target: _Target) -> Outcome | None:
        version = str(mv.version)
        twin = target.twins.get(version)
        if twin is not None:
            # A run that stopped between registering and tagging the source finishes here.
            where = f"{target.name}/{twin.version}"
            if not self.options.dry_run and tag(mv, tags.MIGRATED_TO) != where:
                self._mark_source(name, version, Status.CONVERTED, migrated_to=where)
            return Outcome(name, version, Status.ALREADY_MIGRATED, target=where,
                           format=tag(twin, tags.OUTPUT_FORMAT),
                           assurance=tag(twin, tags.VERDICT),
                           source_sha256=tag(twin, tags.SOURCE_SHA256),
                           output_sha256=tag(twin, tags.OUTPUT_SHA256))
        if target.conflict:
            return Outcome(name, version, Status.REJECTED, reason="TARGET_CONFLICT",
                           message=target.conflict)
        if (mv.status or "READY") != "READY":
            return Outcome(name, version, Status.NOT_READY, reason="VERSION_NOT_READY",
                           message=f"the registry says {mv.status}")
        earlier, reason = tag(mv, tags.STATUS), tag(mv, tags.REASON)
        if (earlier in {Status.REJECTED, Status.FAILED} and reason not in TRANSIENT_REASONS
                and not self.options.retry_failed):
            return Outcome(name, version, Status.FAILED_EARLIER, reason=reason,
                           message=tag(mv, tags.MESSAGE))
        return None

    def _migrate(self, name: str, version: str, target: _Target) -> Outcome:
        work = Path(tempfile.mkdtemp(prefix="airlock-migrate-"))
        try:
            try:
                model_dir = self.fetch(f"models:/{name}/{version}", work / "source")
            except ModelSourceError as exc:  # refused before upload (links, escapes, caps)
                status = Status.FAILED if exc.reason == DOWNLOAD_FAILED else Status.REJECTED
                return self._failed(name, version, status, exc.reason, exc.message)
            except Exception as exc:  # whatever else the artifact store raised
                return self._failed(name, version, Status.FAILED, "DOWNLOAD_FAILED",
                                    f"{type(exc).__name__}: {exc}")
            try:
                result = self.convert(model_dir, work / "out" / "converted")
            except (ServiceUnavailable, AccessDenied):
                raise
            except ConversionError as exc:
                status = Status.REJECTED if exc.kind == "rejected" else Status.FAILED
                return self._failed(name, version, status, exc.reason, exc.message)
            except AirlockError as exc:  # provenance or stream integrity: refuse the output
                status = Status.REJECTED if isinstance(exc, IntegrityError) else Status.FAILED
                return self._failed(name, version, status,
                                    getattr(exc, "reason", "") or "CLIENT_ERROR", str(exc))
            except OSError as exc:
                return self._failed(name, version, Status.FAILED, "CLIENT_ERROR",
                                    f"{type(exc).__name__}: {exc}")
            record = result.provenance_record
            if not result.provenance or record is None:
                return self._failed(name, version, Status.FAILED, "PROVENANCE_MISSING",
                                    "the broker returned no signed provenance")
            twin = self._register(name, version, target, result, work / "out")
            where = f"{target.name}/{twin.version}"
            target.twins[version] = twin
            self._mark_source(name, version, Status.CONVERTED, migrated_to=where)
            return Outcome(name, version, Status.CONVERTED, target=where, format=result.format,
                           assurance=record.assurance, source_sha256=record.input_sha256,
                           output_sha256=record.output_sha256)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # -- registry writes ---------------------------------------------------------------------

    def _register(self, name: str, version: str, target: _Target, result: ConversionResult,
                  out_dir: Path) -> ModelVersion:
        """Log the file and its provenance in a run; make them a version of the target model."""
        record = result.provenance_record
        assert record is not None
        file_name = tags.OUTPUT_FILES[result.format]
        model_file = out_dir / file_name
        result.output.replace(model_file)
        provenance_file = out_dir / (file_name + tags.PROVENANCE_SUFFIX)
        provenance_file.write_bytes(result.provenance)
        lineage = {
            tags.SOURCE_MODEL: name, tags.SOURCE_VERSION: version,
            tags.SOURCE_SHA256: record.input_sha256, tags.OUTPUT_SHA256: record.output_sha256,
            tags.OUTPUT_FORMAT: result.format, tags.OUTPUT_FILE: file_name,
            tags.PROVENANCE_FILE: provenance_file.name, tags.VERDICT: record.assurance,
            tags.VALIDATION: record.validation, tags.JOB_ID: record.job_id,
            tags.PROVENANCE_KEY: record.key_fingerprint,
        }
        self._ensure_target(name, target)
        run = self.registry.create_run(self._experiment(), tags=lineage,
                                       run_name=f"airlock {name} v{version}")
        run_id = str(run.info.run_id)
        finished = False
        try:
            for path in (model_file, provenance_file):
                self.registry.log_artifact(run_id, str(path), tags.ARTIFACT_DIR)
            twin = self.registry.create_model_version(
                target.name, source=f"{run.info.artifact_uri}/{tags.ARTIFACT_DIR}",
                run_id=run_id, tags=lineage,
                description=f"{name} version {version} converted by Airlock to "
                            f"{result.format} ({record.assurance}); load it with "
                            "airlock_client.load_verified, never with MLflow's loaders.")
            finished = True
        finally:
            with contextlib.suppress(Exception):
                self.registry.set_terminated(run_id, "FINISHED" if finished else "FAILED")
        return twin

    def _failed(self, name: str, version: str, status: Status, reason: str,
                message: str) -> Outcome:
        if not self.options.dry_run:
            self._mark_source(name, version, status, reason=reason, message=message)
        return Outcome(name, version, status, reason=reason, message=tags.clip(message))

    def _mark_source(self, name: str, version: str, status: Status, *, migrated_to: str = "",
                     reason: str = "", message: str = "") -> None:
        set_tag = self.registry.set_model_version_tag
        set_tag(name, version, tags.STATUS, str(status))
        if migrated_to:
            set_tag(name, version, tags.MIGRATED_TO, migrated_to)
            for stale in (tags.REASON, tags.MESSAGE):
                with contextlib.suppress(Exception):  # absent tags are fine
                    self.registry.delete_model_version_tag(name, version, stale)
        else:
            set_tag(name, version, tags.REASON, reason)
            set_tag(name, version, tags.MESSAGE, tags.clip(message))

    def _ensure_target(self, source: str, target: _Target) -> None:
        if target.exists:
            return
        self.registry.create_registered_model(
            target.name, tags={tags.ROLE: tags.ROLE_MIGRATED, tags.SOURCE_MODEL: source},
            description=f"{source}, converted by Airlock: each version holds one ONNX or "
                        "safetensors file and its signed provenance.")
        target.exists = True

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self.registry.get_experiment_by_name(self.options.experiment)
            self._experiment_id = (str(found.experiment_id) if found is not None else
                                   str(self.registry.create_experiment(self.options.experiment)))
        return self._experiment_id

    def _set_alias(self, target: _Target, outcomes: Sequence[Outcome]) -> None:
        alias = self.options.alias
        done = [o for o in outcomes if o.status in {Status.CONVERTED, Status.ALREADY_MIGRATED}]
        if not alias or self.options.dry_run or not done:
            return
        newest = max(done, key=lambda o: int(o.version))
        version = newest.target.rpartition("/")[2]
        if target.aliases.get(alias) == version:
            return
        self.registry.set_registered_model_alias(target.name, alias, version)
        target.aliases[alias] = version
        self.progress(f"alias {target.name}@{alias} -> {newest.target} "
                      f"(from {newest.model} v{newest.version})")

    # -- reads -------------------------------------------------------------------------------

    def _registered_model(self, name: str) -> RegisteredModel | None:
        page = self.registry.search_registered_models(
            filter_string=f"name = {filter_literal(name)}", max_results=10)
        return next((m for m in page if m.name == name), None)

    def _target(self, source: str) -> _Target:
        """The target model and its twins (source version -> target version), paged."""
        name = tags.target_name(source, self.options.target_suffix)
        page = self.registry.search_registered_models(
            filter_string=f"name = {filter_literal(name)}", max_results=10)
        found = next((m for m in page if m.name == name), None)
        if found is None:
            return _Target(name, exists=False)
        if (tag(found, tags.ROLE) != tags.ROLE_MIGRATED
                or tag(found, tags.SOURCE_MODEL) != source):
            return _Target(name, exists=True, conflict=(
                f"{name!r} exists and is not Airlock's target for {source!r}; rename it or "
                "choose another --target-suffix"))
        twins: dict[str, ModelVersion] = {}
        for mv in model_versions(self.registry, name, self.options.page_size):
            if tag(mv, tags.SOURCE_MODEL) == source and tag(mv, tags.SOURCE_VERSION):
                twins.setdefault(tag(mv, tags.SOURCE_VERSION), mv)
        return _Target(name, exists=True, twins=twins,
                       aliases={str(k): str(v) for k, v in (found.aliases or {}).items()})


def _describe(outcome: Outcome) -> str:
    if outcome.status in {Status.CONVERTED, Status.ALREADY_MIGRATED}:
        extra = f" {outcome.format} {outcome.assurance}".rstrip() if outcome.format else ""
        return f"{outcome.status} -> {outcome.target}{extra}"
    return f"{outcome.status}: {outcome.reason}: {tags.clip(outcome.message, 200)}"


def counts(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """How many versions ended in each status (every status present, zeros included)."""
    tally = dict.fromkeys((str(s) for s in Status), 0)
    for outcome in outcomes:
        tally[str(outcome.status)] += 1
    return tally


def iter_problems(outcomes: Sequence[Outcome]) -> Iterator[Outcome]:
    return (o for o in outcomes if o.status in PROBLEMS)

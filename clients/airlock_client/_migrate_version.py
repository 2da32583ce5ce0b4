"""Migrate one source version: skip it if it already has a verified twin (or was refused
before), otherwise download its files (bytes only), have the broker convert them, log the
output and its signed provenance in a run, register that as a version of the target model, and
tag the source with the result. One version failing is an :class:`Outcome`; only the broker or
the credentials going away raise, because every later version would fail the same way.

"Already migrated" is decided from signed provenance, never from tags: a version that claims
to be the twin counts only when ``_twin`` verifies it against the source's own bytes, which
costs a download of the source and of the twin's model file on every run."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from airlock_client import _lineage as tags
from airlock_client import _migrate_leftovers as leftovers
from airlock_client._errors import (
    AccessDenied,
    AirlockError,
    ConversionError,
    IntegrityError,
    ModelSourceError,
    ServiceUnavailable,
)
from airlock_client._migrate_leftovers import OpenRun
from airlock_client._migrate_report import Outcome, Status, describe
from airlock_client._migrate_walk import Target
from airlock_client._registry import DEFAULT_PAGE_SIZE, ModelVersion, Registry, tag
from airlock_client._twin import (
    Download,
    bundle_sha256,
    check_lineage,
    read_twin,
    source_subject,
)
from airlock_client._types import ConversionResult
from airlock_client.batch import MAX_CONCURRENCY
from airlock_client.mlflow_source import DOWNLOAD_FAILED
from airlock_client.provenance import (
    ProvenanceError,
    ProvenanceRecord,
    PublicKeyLike,
    check_output,
    check_source,
    load_public_key,
    verify_envelope,
)

#: ``fetch(models_uri, dest_dir) -> model_dir``: download a version's files, bytes only.
Fetch = Callable[[str, Path], Path]
#: ``convert(model_dir, output, subject) -> result``: convert in the broker's sandbox, with
#: ``subject`` (``models:/NAME/VERSION``) signed into the provenance.
Convert = Callable[[Path, Path, str], ConversionResult]
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


class VersionMigration:
    """Migrates single versions for one run (it caches the run's experiment id).

    ``public_key`` is the pinned key: every twin is verified with it before it counts (see
    ``_twin``), and so is every fresh conversion before it is registered, whatever key the
    ``convert`` callable verified with. A dry run may go without one (it converts and writes
    nothing): a version that claims a twin is then reported ``UNVERIFIED``, never believed.

    ``one`` may run on several threads at once, one version each: downloads, checks and
    conversions overlap, while the registry writes (registering a twin, tagging a source)
    take turns under one lock. They are a small part of a version's time, and one at a time
    the run's own state (the experiment, whether a target model exists, its twins) needs no
    other guard, nor does a tracking server with a single-writer store (sqlite) see them race.
    """

    def __init__(self, registry: Registry, *, fetch: Fetch, convert: Convert,
                 download: Download, public_key: PublicKeyLike | None, options: Options,
                 progress: Progress) -> None:
        self.registry = registry
        self.fetch = fetch
        self.convert = convert
        self.download = download
        if public_key is None and not options.dry_run:
            raise ValueError("only a dry run may go without the pinned public key: everything "
                             "else is verified with it before it is written into the registry")
        self._public_key = None if public_key is None else load_public_key(public_key)
        self.options = options
        self.progress = progress
        self._experiment_id: str | None = None
        #: Held by every registry write of the run (``Migration`` sets aliases under it too).
        self.writes = threading.Lock()
        #: (model, version) whose claimed twins could not be checked this run (the source
        #: could not be read): nobody knows whether they are migrated, so no alias moves past.
        self.unchecked: set[tuple[str, str]] = set()
        #: Runs a killed migrate left open, by the source version they name (``Migration``
        #: fills it before the walk; see ``_migrate_leftovers``).
        self.open_runs: dict[tuple[str, str], list[OpenRun]] = {}

    def one(self, name: str, mv: ModelVersion, target: Target, step: str) -> Outcome:
        version = str(mv.version)
        if target.conflict:
            outcome = Outcome(name, version, Status.REJECTED, reason="TARGET_CONFLICT",
                              message=target.conflict)
        elif target.twins.get(version) and self._public_key is None:
            outcome = self._refusal(name, mv) or self._unverified(name, version, target)
        elif target.twins.get(version):
            outcome = self._with_twins(name, mv, target, step)
        else:
            outcome = self._refusal(name, mv) or self._fresh(name, version, target, step)
        took = f" ({outcome.seconds:.1f} s)" if outcome.seconds else ""
        self.progress(f"{step} {name} v{version}: {describe(outcome)}{took}")
        return outcome

    @property
    def public_key(self) -> EllipticCurvePublicKey:
        """The pinned key; only a dry run has none, and it never asks."""
        if self._public_key is None:
            raise ValueError("no pinned public key (a dry run's) to verify with")
        return self._public_key

    def _unverified(self, name: str, version: str, target: Target) -> Outcome:
        claims = ", ".join(f"{target.name}/{mv.version}" for mv in target.twins[version])
        return Outcome(name, version, Status.UNVERIFIED, message=(
            f"{claims} claims to be its twin; not verified: a dry run with no --public-key "
            "(or AIRLOCK_PUBLIC_KEY) checks no twin, and tags alone are never believed"))

    def _refusal(self, name: str, mv: ModelVersion) -> Outcome | None:
        """Why this version is not converted now although it has no (verified) twin."""
        version = str(mv.version)
        if (mv.status or "READY") != "READY":
            return Outcome(name, version, Status.NOT_READY, reason="VERSION_NOT_READY",
                           message=f"the registry says {mv.status}")
        earlier, reason = tag(mv, tags.STATUS), tag(mv, tags.REASON)
        if (earlier in {Status.REJECTED, Status.FAILED} and reason not in TRANSIENT_REASONS
                and not self.options.retry_failed):
            return Outcome(name, version, Status.FAILED_EARLIER, reason=reason,
                           message=tag(mv, tags.MESSAGE))
        return None

    def _fresh(self, name: str, version: str, target: Target, step: str) -> Outcome:
        if self.options.dry_run:
            return Outcome(name, version, Status.WOULD_CONVERT, target=f"{target.name}/?")
        work = Path(tempfile.mkdtemp(prefix="airlock-migrate-"))
        try:
            model_dir = self._fetch(name, version, work)
            if isinstance(model_dir, Outcome):
                return model_dir
            resumed = self._resume(name, version, target, model_dir, work, None, step)
            if resumed is not None:
                return resumed
            self.progress(f"{step} {name} v{version}: converting")
            return self._migrate(name, version, target, model_dir, work, source_sha256=None)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _with_twins(self, name: str, mv: ModelVersion, target: Target, step: str) -> Outcome:
        """Skip the version if one of the versions claiming to be its twin verifies (see
        ``_twin``); otherwise say why each did not, and convert it (unless refused)."""
        version = str(mv.version)
        work = Path(tempfile.mkdtemp(prefix="airlock-migrate-"))
        try:
            model_dir = self._fetch(name, version, work)
            if isinstance(model_dir, Outcome):
                self.unchecked.add((name, version))
                return model_dir
            try:
                digest = bundle_sha256(model_dir, work)
            except ModelSourceError as exc:
                self.unchecked.add((name, version))
                return self._failed(name, version, Status.REJECTED, exc.reason, exc.message)
            refused: list[str] = []
            for claim in target.twins[version]:
                where = f"{target.name}/{claim.version}"
                try:
                    twin = read_twin(self.registry, self.download, claim, self.public_key,
                                     keep_bytes=False)
                    check_lineage(twin, claim, model=name, version=version, sha256=digest)
                except IntegrityError as exc:
                    refused.append(f"{where} ({getattr(exc, 'reason', 'INTEGRITY_ERROR')})")
                    self.progress(f"{step} {name} v{version}: WARNING: {where} claims to be "
                                  f"its twin but is not: {exc}")
                    continue
                return self._already(name, version, mv, where, twin.record, claim.run_id)
            note = f"not a verified twin, ignored: {', '.join(refused)}"
            refusal = self._refusal(name, mv)
            if refusal is not None:
                return refusal
            if self.options.dry_run:
                return Outcome(name, version, Status.WOULD_CONVERT, target=f"{target.name}/?",
                               message=note)
            resumed = self._resume(name, version, target, model_dir, work, digest, step)
            if resumed is not None:
                return resumed
            self.progress(f"{step} {name} v{version}: converting")
            outcome = self._migrate(name, version, target, model_dir, work,
                                    source_sha256=digest)
            return Outcome(**{**outcome.__dict__, "message": outcome.message or note})
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _already(self, name: str, version: str, mv: ModelVersion, where: str,
                 record: ProvenanceRecord, run_id: str | None) -> Outcome:
        # A run that stopped between registering and tagging the source finishes here, and
        # a run that could not download the source to check its twin is taken back.
        if not self.options.dry_run and (tag(mv, tags.MIGRATED_TO) != where
                                         or tag(mv, tags.STATUS) != Status.CONVERTED):
            with self.writes:
                self._mark_source(name, version, Status.CONVERTED, migrated_to=where)
        # Killed after registering the twin, before closing its run: the run did its job.
        for left in self.open_runs.pop((name, version), []):
            self._close(left, "FINISHED" if left.run_id == run_id else "FAILED")
        return Outcome(name, version, Status.ALREADY_MIGRATED, target=where,
                       format=record.output_format, assurance=record.assurance,
                       executed_artifact_code=executed_code(record),
                       source_sha256=record.input_sha256, output_sha256=record.output_sha256)

    def _resume(self, name: str, version: str, target: Target, model_dir: Path, work: Path,
                digest: str | None, step: str) -> Outcome | None:
        """Register the conversion a killed run left in an open run, if one of them verifies
        (no second conversion); close the others as FAILED. None: there is none to adopt."""
        left = self.open_runs.pop((name, version), [])
        if not left:
            return None
        adopted: Outcome | None = None
        try:
            digest = digest or bundle_sha256(model_dir, work)
        except ModelSourceError:
            digest = None  # the conversion refuses it too, with the reason
        for run in left:
            if adopted is None and digest is not None:
                try:
                    record = leftovers.verify(run, self.download, self.public_key,
                                              subject=source_subject(name, version),
                                              source_sha256=digest)
                except IntegrityError as exc:
                    self.progress(f"{step} {name} v{version}: run {run.run_id}, left open by "
                                  f"a stopped migrate, does not verify; closed as FAILED: "
                                  f"{exc}")
                else:
                    adopted = self._adopt(name, version, target, run, record)
                    continue
            self._close(run, "FAILED")
        return adopted

    def _adopt(self, name: str, version: str, target: Target, run: OpenRun,
               record: ProvenanceRecord) -> Outcome:
        file_name = tags.OUTPUT_FILES[record.output_format]
        with self.writes:
            self._ensure_target(name, target)
            twin = self.registry.create_model_version(
                target.name, source=f"{run.artifact_uri.rstrip('/')}/{tags.ARTIFACT_DIR}",
                run_id=run.run_id, tags=_lineage(name, version, record, file_name),
                description=_description(name, version, record))
            self.registry.set_terminated(run.run_id, "FINISHED")
            where = f"{target.name}/{twin.version}"
            target.twins.setdefault(version, []).insert(0, twin)
            self._mark_source(name, version, Status.CONVERTED, migrated_to=where)
        return Outcome(name, version, Status.CONVERTED, target=where,
                       format=record.output_format, assurance=record.assurance,
                       executed_artifact_code=executed_code(record),
                       source_sha256=record.input_sha256, output_sha256=record.output_sha256,
                       message=f"registered from run {run.run_id}, which a stopped migrate "
                               "left open (its files verified): not converted again")

    def _close(self, run: OpenRun, status: str) -> None:
        with self.writes, contextlib.suppress(Exception):  # bookkeeping; the next run retries
            self.registry.set_terminated(run.run_id, status)

    def _fetch(self, name: str, version: str, work: Path) -> Path | Outcome:
        try:
            return Path(self.fetch(f"models:/{name}/{version}", work / "source"))
        except ModelSourceError as exc:  # refused before upload (links, escapes, caps)
            status = Status.FAILED if exc.reason == DOWNLOAD_FAILED else Status.REJECTED
            return self._failed(name, version, status, exc.reason, exc.message)
        except Exception as exc:  # whatever else the artifact store raised
            return self._failed(name, version, Status.FAILED, "DOWNLOAD_FAILED",
                                f"{type(exc).__name__}: {exc}")

    def _migrate(self, name: str, version: str, target: Target, model_dir: Path, work: Path,
                 source_sha256: str | None) -> Outcome:
        began = time.monotonic()
        outcome = self._convert(name, version, target, model_dir, work, source_sha256)
        return Outcome(**{**outcome.__dict__, "seconds": round(time.monotonic() - began, 3)})

    def _convert(self, name: str, version: str, target: Target, model_dir: Path, work: Path,
                 source_sha256: str | None) -> Outcome:
        subject = source_subject(name, version)
        try:
            result = self.convert(model_dir, work / "out" / "converted", subject)
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
        if not result.provenance:
            return self._failed(name, version, Status.FAILED, "PROVENANCE_MISSING",
                                "the broker returned no signed provenance")
        try:  # with the pinned key, whatever key ``convert`` used: this goes into a registry
            record = verify_envelope(result.provenance, self.public_key)
            check_output(record, sha256=result.sha256, size=result.size)
            check_source(record, subject=subject,
                         sha256=source_sha256 or result.input_sha256)
        except ProvenanceError as exc:
            return self._failed(name, version, Status.REJECTED, exc.reason, exc.message)
        with self.writes:
            twin = self._register(name, version, target, result, record, work / "out")
            where = f"{target.name}/{twin.version}"
            target.twins.setdefault(version, []).insert(0, twin)
            self._mark_source(name, version, Status.CONVERTED, migrated_to=where)
        return Outcome(name, version, Status.CONVERTED, target=where, format=result.format,
                       assurance=record.assurance,
                       executed_artifact_code=executed_code(record),
                       source_sha256=record.input_sha256,
                       output_sha256=record.output_sha256)

    # -- registry writes ---------------------------------------------------------------------

    def _register(self, name: str, version: str, target: Target, result: ConversionResult,
                  record: ProvenanceRecord, out_dir: Path) -> ModelVersion:
        """Log the file and its provenance in a run; make them a version of the target model."""
        file_name = tags.OUTPUT_FILES[result.format]
        model_file = out_dir / file_name
        result.output.replace(model_file)
        provenance_file = out_dir / (file_name + tags.PROVENANCE_SUFFIX)
        provenance_file.write_bytes(result.provenance)
        lineage = _lineage(name, version, record, file_name)
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
                run_id=run_id, tags=lineage, description=_description(name, version, record))
            finished = True
        finally:
            with contextlib.suppress(Exception):
                self.registry.set_terminated(run_id, "FINISHED" if finished else "FAILED")
        return twin

    def _failed(self, name: str, version: str, status: Status, reason: str,
                message: str) -> Outcome:
        if not self.options.dry_run:
            with self.writes:
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

    def _ensure_target(self, source: str, target: Target) -> None:
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


def _lineage(name: str, version: str, record: ProvenanceRecord,
             file_name: str) -> dict[str, str]:
    """The tags of a twin (and of its run), from the signed record of its conversion."""
    return {
        tags.SOURCE_MODEL: name, tags.SOURCE_VERSION: version,
        tags.SOURCE_SHA256: record.input_sha256, tags.OUTPUT_SHA256: record.output_sha256,
        tags.OUTPUT_FORMAT: record.output_format, tags.OUTPUT_FILE: file_name,
        tags.PROVENANCE_FILE: file_name + tags.PROVENANCE_SUFFIX,
        tags.VERDICT: record.assurance, tags.VALIDATION: record.validation,
        tags.JOB_ID: record.job_id, tags.PROVENANCE_KEY: record.key_fingerprint,
        tags.EXECUTED_CODE: "true" if executed_code(record) else "false",
    }


def executed_code(record: ProvenanceRecord) -> bool:
    """Whether the signed record says the conversion ran the artifact's code (the sandbox's
    claim, signed: a record that does not say counts as no, as ``airlock verify`` shows it)."""
    return record.conversion.get("executed_artifact_code") is True


def _description(name: str, version: str, record: ProvenanceRecord) -> str:
    return (f"{name} version {version} converted by Airlock to {record.output_format} "
            f"({record.assurance}); load it with airlock_client.load_verified, never with "
            "MLflow's loaders.")

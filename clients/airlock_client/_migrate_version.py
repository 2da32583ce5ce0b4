"""Migrate one source version: skip it if it already has a verified twin (or was refused
before), otherwise download its files (bytes only), have the broker convert them, log the
output and its signed provenance in a run, register that as a version of the target model, and
tag the source with the result. One version failing is an :class:`Outcome`; only the broker or
the credentials going away raise, because every later version would fail the same way.

"Already migrated" is decided from signed provenance, never from tags: a version that claims
to be the twin counts only when ``_twin`` verifies it against the source's own bytes, which
costs a download of the source and of the twin's model file on every run.

A version holding a Hugging Face model directory (an MLflow transformers model with PyTorch
weights) is converted file by file when the run is given a directory converter, and its twin
is that safetensors directory, checked file by file against the source's own files
(``_twin_dir``). A run killed half-way through such a version converts it again.

This module decides what happens to a version; ``_migrate_convert`` converts one and verifies
the output, ``_migrate_register`` writes the registry, ``_migrate_options`` holds what a run
is given."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from airlock_client import _lineage as tags
from airlock_client import _migrate_leftovers as leftovers
from airlock_client._errors import IntegrityError, ModelSourceError
from airlock_client._lineage import executed_code
from airlock_client._migrate_convert import (
    Failure,
    convert_directory_verified,
    convert_verified,
)
from airlock_client._migrate_leftovers import OpenRun
from airlock_client._migrate_options import (
    TRANSIENT_REASONS,
    Convert,
    ConvertDirectory,
    Options,
    Progress,
)
from airlock_client._migrate_register import Registrar
from airlock_client._migrate_report import Outcome, Status, describe
from airlock_client._migrate_walk import Target
from airlock_client._registry import Fetch, ModelVersion, Registry, tag
from airlock_client._run_dir import scratch_dir
from airlock_client._twin import (
    Download,
    Listing,
    bundle_sha256,
    check_lineage,
    read_twin,
    source_subject,
)
from airlock_client._twin_dir import (
    SourceFiles,
    check_directory_lineage,
    is_directory_source,
    read_directory_twin,
    source_files,
)
from airlock_client._twin_dir import executed_code as directory_ran_code
from airlock_client.mlflow_source import DOWNLOAD_FAILED
from airlock_client.provenance import ProvenanceRecord, PublicKeyLike, load_public_key
from airlock_client.verify_dir import VerifiedDirectory


@dataclass(frozen=True)
class Migrated:
    """What a twin holds, as a version's outcome reports it (one definition for every way a
    version ends up migrated)."""

    format: str
    assurance: str
    executed_code: bool
    #: The signed input's sha256: "" for a directory (each file has its own).
    source_sha256: str
    #: The model file's, or the index's (or the one weights file's) for a directory.
    output_sha256: str

    @classmethod
    def of_file(cls, record: ProvenanceRecord) -> Migrated:
        return cls(record.output_format, record.assurance, executed_code(record),
                   record.input_sha256, record.output_sha256)

    @classmethod
    def of_directory(cls, verified: VerifiedDirectory) -> Migrated:
        whole = verified.whole
        return cls("safetensors", whole.assurance, directory_ran_code(verified),
                   "" if verified.index is not None else whole.input_sha256,
                   whole.output_sha256)

    def outcome(self, name: str, version: str, status: Status, where: str, *,
                message: str = "") -> Outcome:
        return Outcome(name, version, status, target=where, format=self.format,
                       assurance=self.assurance, executed_artifact_code=self.executed_code,
                       source_sha256=self.source_sha256, output_sha256=self.output_sha256,
                       message=message)


class VersionMigration:
    """Migrates single versions for one run (its ``registrar`` writes the registry).

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
                 progress: Progress, convert_directory: ConvertDirectory | None = None,
                 listing: Listing | None = None) -> None:
        self.registry = registry
        self.fetch = fetch
        self.convert = convert
        #: The artifact store's listing: a claimed twin's folder must hold its files and
        #: nothing else (None: not checked; the files are still verified).
        self.listing = listing
        #: None: a model-directory version is sent as its MLflow bundle, like any other.
        self.convert_directory = convert_directory
        self.download = download
        if public_key is None and not options.dry_run:
            raise ValueError("only a dry run may go without the pinned public key: everything "
                             "else is verified with it before it is written into the registry")
        self._public_key = None if public_key is None else load_public_key(public_key)
        self.options = options
        self.progress = progress
        self.registrar = Registrar(registry, options.experiment)
        #: The registrar's lock, which ``Migration`` sets aliases under too.
        self.writes = self.registrar.writes
        #: (model, version) whose claimed twins could not be checked this run (the source
        #: could not be read): nobody knows whether they are migrated, so no alias moves past.
        self.unchecked: set[tuple[str, str]] = set()
        #: Runs a killed migrate left open, by the source version they name (``Migration``
        #: fills it before the walk; see ``_migrate_leftovers``).
        self.open_runs: dict[tuple[str, str], list[OpenRun]] = {}

    def one(self, name: str, mv: ModelVersion, target: Target, step: str) -> Outcome:
        version = str(mv.version)
        if target.conflict:
            outcome = Outcome(name, version, Status.REJECTED, reason=target.reason,
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
        with scratch_dir("airlock-migrate") as work:
            model_dir = self._fetch(name, version, work)
            if isinstance(model_dir, Outcome):
                return model_dir
            directory = self._directory(name, version, model_dir)
            if isinstance(directory, Outcome):
                return directory
            by_files = directory and self.convert_directory is not None
            resumed = self._resume(name, version, target, model_dir, work, None, step,
                                   adoptable=not by_files)
            if resumed is not None:
                return resumed
            self.progress(f"{step} {name} v{version}: converting")
            return self._migrate(name, version, target, model_dir, work, source_sha256=None,
                                 directory=by_files)

    def _with_twins(self, name: str, mv: ModelVersion, target: Target, step: str) -> Outcome:
        """Skip the version if one of the versions claiming to be its twin verifies (see
        ``_twin``); otherwise say why each did not, and convert it (unless refused)."""
        version = str(mv.version)
        with scratch_dir("airlock-migrate") as work:
            model_dir = self._fetch(name, version, work)
            if isinstance(model_dir, Outcome):
                self.unchecked.add((name, version))
                return model_dir
            directory = self._directory(name, version, model_dir)
            if isinstance(directory, Outcome):
                self.unchecked.add((name, version))
                return directory
            try:
                source = source_files(model_dir) if directory else None
                digest = None if directory else bundle_sha256(model_dir, work)
            except ModelSourceError as exc:
                self.unchecked.add((name, version))
                return self._failed(name, version, Status.REJECTED, exc.reason, exc.message)
            refused: list[str] = []
            # The twin the source names first, then the oldest: a later copy of a twin's files
            # (with files or tags of its own beside them) never takes its place.
            named = tag(mv, tags.MIGRATED_TO)
            claims = sorted(target.twins[version],
                            key=lambda c: (f"{target.name}/{c.version}" != named,
                                           int(c.version)))
            # Every claim is tried until one verifies: one that cannot be read (a location the
            # store cannot list, which anyone who may register a version can name) never
            # keeps the genuine twin from counting, nor, with none, the version from being
            # converted.
            unreadable = ""  # this machine's disk failed while checking one: next run
            for claim in claims:
                where = f"{target.name}/{claim.version}"
                try:
                    checked = self._check_twin(name, version, claim, work, source, digest)
                except OSError as exc:
                    unreadable = unreadable or (f"cannot check {where}, which claims to be its "
                                                f"twin: {type(exc).__name__}: {exc}")
                    continue
                except IntegrityError as exc:
                    refused.append(f"{where} ({getattr(exc, 'reason', 'INTEGRITY_ERROR')})")
                    self.progress(f"{step} {name} v{version}: WARNING: {where} claims to be "
                                  f"its twin but is not: {exc}")
                    continue
                return self._already(name, version, mv, where, checked, claim.run_id)
            if unreadable:
                self.unchecked.add((name, version))
                return self._failed(name, version, Status.FAILED, DOWNLOAD_FAILED, unreadable)
            note = f"not a verified twin, ignored: {', '.join(refused)}"
            refusal = self._refusal(name, mv)
            if refusal is not None:
                return refusal
            if self.options.dry_run:
                return Outcome(name, version, Status.WOULD_CONVERT, target=f"{target.name}/?",
                               message=note)
            by_files = directory and self.convert_directory is not None
            resumed = self._resume(name, version, target, model_dir, work, digest, step,
                                   adoptable=not by_files)
            if resumed is not None:
                return resumed
            self.progress(f"{step} {name} v{version}: converting")
            outcome = self._migrate(name, version, target, model_dir, work,
                                    source_sha256=digest, directory=by_files)
            return Outcome(**{**outcome.__dict__, "message": outcome.message or note})

    def _check_twin(self, name: str, version: str, claim: ModelVersion, work: Path,
                    source: SourceFiles | None, digest: str | None) -> Migrated:
        """What ``claim`` holds once it verifies as the twin of ``name`` v``version`` (a
        directory twin when ``source`` is given, else a file twin of bytes ``digest``); else
        raise ``IntegrityError``."""
        if source is None:
            twin = read_twin(self.registry, self.download, claim, self.public_key,
                             keep_bytes=False, listing=self.listing)
            check_lineage(twin, claim, model=name, version=version, sha256=digest)
            return Migrated.of_file(twin.record)
        dest = work / f"twin-{claim.version}"
        try:
            twin_dir = read_directory_twin(self.registry, self.download, claim,
                                           self.public_key, dest, source,
                                           source_subject(name, version),
                                           listing=self.listing)
            check_directory_lineage(twin_dir, claim, model=name, version=version,
                                    source=source)
            return Migrated.of_directory(twin_dir.verified)
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def _directory(self, name: str, version: str, model_dir: Path) -> bool | Outcome:
        """Whether the version holds a model directory (an MLflow transformers model with
        PyTorch weights); an Outcome when its bundle is refused as unsafe to read."""
        try:
            return is_directory_source(model_dir)
        except ModelSourceError as exc:
            return self._failed(name, version, Status.REJECTED, exc.reason, exc.message)

    def _already(self, name: str, version: str, mv: ModelVersion, where: str,
                 migrated: Migrated, run_id: str | None) -> Outcome:
        # A run that stopped between registering and tagging the source finishes here, and
        # a run that could not download the source to check its twin is taken back.
        if not self.options.dry_run and (tag(mv, tags.MIGRATED_TO) != where
                                         or tag(mv, tags.STATUS) != Status.CONVERTED):
            self.registrar.mark_source(name, version, Status.CONVERTED, migrated_to=where)
        # Killed after registering the twin, before closing its run: the run did its job.
        for left in self.open_runs.pop((name, version), []):
            self.registrar.close(left, "FINISHED" if left.run_id == run_id else "FAILED")
        return migrated.outcome(name, version, Status.ALREADY_MIGRATED, where)

    def _resume(self, name: str, version: str, target: Target, model_dir: Path, work: Path,
                digest: str | None, step: str, *, adoptable: bool) -> Outcome | None:
        """Register the conversion a killed run left in an open run, if one of them verifies
        (no second conversion); close the others as FAILED. None: there is none to adopt.
        A directory's (not ``adoptable``) are all closed: it is converted again."""
        left = self.open_runs.pop((name, version), [])
        if not left:
            return None
        adopted: Outcome | None = None
        try:
            digest = (digest or bundle_sha256(model_dir, work)) if adoptable else None
        except ModelSourceError:
            digest = None  # the conversion refuses it too, with the reason
        for run in left:
            if adopted is None and digest is not None:
                try:
                    record = leftovers.verify(run, self.download, self.public_key,
                                              listing=self.listing,
                                              subject=source_subject(name, version),
                                              source_sha256=digest)
                except IntegrityError as exc:
                    self.progress(f"{step} {name} v{version}: run {run.run_id}, left open by "
                                  f"a stopped migrate, does not verify; closed as FAILED: "
                                  f"{exc}")
                else:
                    adopted = self._adopt(name, version, target, run, record)
                    continue
            self.registrar.close(run, "FAILED")
        return adopted

    def _adopt(self, name: str, version: str, target: Target, run: OpenRun,
               record: ProvenanceRecord) -> Outcome:
        where = self.registrar.adopt(name, version, target, run, record)
        return Migrated.of_file(record).outcome(
            name, version, Status.CONVERTED, where,
            message=f"registered from run {run.run_id}, which a stopped migrate left open "
                    "(its files verified): not converted again")

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
                 source_sha256: str | None, *, directory: bool) -> Outcome:
        began = time.monotonic()
        outcome = (self._convert_directory(name, version, target, model_dir, work) if directory
                   else self._convert(name, version, target, model_dir, work, source_sha256))
        return Outcome(**{**outcome.__dict__, "seconds": round(time.monotonic() - began, 3)})

    def _convert_directory(self, name: str, version: str, target: Target, model_dir: Path,
                           work: Path) -> Outcome:
        assert self.convert_directory is not None
        verified = convert_directory_verified(self.convert_directory, model_dir,
                                              work / "out" / "converted",
                                              source_subject(name, version), self.public_key)
        if isinstance(verified, Failure):
            return self._failed(name, version, verified.status, verified.reason,
                                verified.message)
        where = self.registrar.register_directory(name, version, target, verified)
        return Migrated.of_directory(verified).outcome(name, version, Status.CONVERTED, where)

    def _convert(self, name: str, version: str, target: Target, model_dir: Path, work: Path,
                 source_sha256: str | None) -> Outcome:
        converted = convert_verified(self.convert, model_dir, work / "out" / "converted",
                                     source_subject(name, version), self.public_key,
                                     source_sha256=source_sha256)
        if isinstance(converted, Failure):
            return self._failed(name, version, converted.status, converted.reason,
                                converted.message)
        result, record = converted
        where = self.registrar.register(name, version, target, result, record, work / "out")
        return Migrated.of_file(record).outcome(name, version, Status.CONVERTED, where)

    def _failed(self, name: str, version: str, status: Status, reason: str,
                message: str) -> Outcome:
        if not self.options.dry_run:
            self.registrar.mark_source(name, version, status, reason=reason, message=message)
        return Outcome(name, version, status, reason=reason, message=tags.clip(message))

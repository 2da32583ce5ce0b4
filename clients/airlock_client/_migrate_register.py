"""The registry writes of ``airlock migrate``: a verified conversion logged in a run of the
run's experiment and registered as a version of the target model (its twin), tagged and
described from its signed record; a conversion a stopped migrate left in an open run
registered from that run; the source version tagged with what happened to it; and open runs
closed. It writes what it is given: the output was verified before (``_migrate_convert``,
``_migrate_leftovers``). One write at a time, under one lock."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from airlock_client import _lineage as tags
from airlock_client._artifact_locations import check_location
from airlock_client._migrate_leftovers import OpenRun
from airlock_client._migrate_report import Status
from airlock_client._migrate_walk import Target
from airlock_client._registry import ModelVersion, Registry
from airlock_client._twin_dir import directory_tags
from airlock_client._types import ConversionResult
from airlock_client.provenance import ProvenanceRecord
from airlock_client.verify_dir import VerifiedDirectory


class Registrar:
    """The registry writes of one run (it caches the run's experiment id), taking turns under
    ``writes``: every public method takes the lock, the private ones expect it held."""

    def __init__(self, registry: Registry, experiment: str) -> None:
        self.registry = registry
        self.experiment = experiment
        self._experiment_id: str | None = None
        #: Held by every registry write of the run (``Migration`` sets aliases under it too).
        self.writes = threading.Lock()

    def register(self, name: str, version: str, target: Target, result: ConversionResult,
                 record: ProvenanceRecord, out_dir: Path) -> str:
        """Register the verified conversion of ``name`` v``version`` as its twin and tag the
        source with it; the twin's ``NAME-airlock/VERSION``."""
        with self.writes:
            twin = self._register(name, version, target, result, record, out_dir)
            where = f"{target.name}/{twin.version}"
            target.twins.setdefault(version, []).insert(0, twin)
            self._mark_source(name, version, Status.CONVERTED, migrated_to=where)
        return where

    def register_directory(self, name: str, version: str, target: Target,
                           verified: VerifiedDirectory) -> str:
        """Register the verified conversion of ``name`` v``version``'s model directory (every
        file of ``verified.path``, records beside them) as its twin and tag the source with
        it; the twin's ``NAME-airlock/VERSION``."""
        lineage = directory_tags(name, version, verified)
        whole = verified.whole
        with self.writes:
            self._ensure_target(name, target)
            twin = self._log(target, sorted(verified.path.iterdir()), lineage, name, version,
                             _description(name, version, whole, directory=True))
            where = f"{target.name}/{twin.version}"
            target.twins.setdefault(version, []).insert(0, twin)
            self._mark_source(name, version, Status.CONVERTED, migrated_to=where)
        return where

    def adopt(self, name: str, version: str, target: Target, run: OpenRun,
              record: ProvenanceRecord) -> str:
        """Register the verified conversion ``run`` holds as the twin, close the run as
        FINISHED and tag the source; the twin's ``NAME-airlock/VERSION``."""
        file_name = tags.OUTPUT_FILES[record.output_format]
        with self.writes:
            self._ensure_target(name, target)
            twin = self.registry.create_model_version(
                target.name, source=f"{run.artifact_uri.rstrip('/')}/{tags.ARTIFACT_DIR}",
                run_id=run.run_id, tags=tags.twin_tags(name, version, record, file_name),
                description=_description(name, version, record))
            self.registry.set_terminated(run.run_id, "FINISHED")
            where = f"{target.name}/{twin.version}"
            target.twins.setdefault(version, []).insert(0, twin)
            self._mark_source(name, version, Status.CONVERTED, migrated_to=where)
        return where

    def mark_source(self, name: str, version: str, status: Status, *, migrated_to: str = "",
                    reason: str = "", message: str = "") -> None:
        with self.writes:
            self._mark_source(name, version, status, migrated_to=migrated_to, reason=reason,
                              message=message)

    def close(self, run: OpenRun, status: str) -> None:
        with self.writes, contextlib.suppress(Exception):  # bookkeeping; the next run retries
            self.registry.set_terminated(run.run_id, status)

    def _register(self, name: str, version: str, target: Target, result: ConversionResult,
                  record: ProvenanceRecord, out_dir: Path) -> ModelVersion:
        """Log the file and its provenance in a run; make them a version of the target model."""
        file_name = tags.OUTPUT_FILES[result.format]
        model_file = out_dir / file_name
        result.output.replace(model_file)
        provenance_file = out_dir / (file_name + tags.PROVENANCE_SUFFIX)
        provenance_file.write_bytes(result.provenance)
        self._ensure_target(name, target)
        return self._log(target, [model_file, provenance_file],
                         tags.twin_tags(name, version, record, file_name), name, version,
                         _description(name, version, record))

    def _log(self, target: Target, files: list[Path], lineage: dict[str, str], name: str,
             version: str, description: str) -> ModelVersion:
        """Log ``files`` in a run tagged ``lineage``; make them a version of the target model."""
        run = self.registry.create_run(self._experiment(), tags=lineage,
                                       run_name=f"airlock {name} v{version}")
        run_id = str(run.info.run_id)
        finished = False
        try:
            # Checked as any location is (_artifact_locations): an experiment of this name,
            # made beforehand by anyone who may write the registry, could send the outputs,
            # and MLflow the tracking credentials with them, to a host of theirs, or have them
            # written into a path on this host.
            check_location(str(run.info.artifact_uri), self.registry.tracking_uri)
            for path in files:
                self.registry.log_artifact(run_id, str(path), tags.ARTIFACT_DIR)
            twin = self.registry.create_model_version(
                target.name, source=f"{run.info.artifact_uri}/{tags.ARTIFACT_DIR}",
                run_id=run_id, tags=lineage, description=description)
            finished = True
        finally:
            with contextlib.suppress(Exception):
                self.registry.set_terminated(run_id, "FINISHED" if finished else "FAILED")
        return twin

    def _mark_source(self, name: str, version: str, status: Status, *, migrated_to: str = "",
                     reason: str = "", message: str = "") -> None:
        # The status last: a run killed between these writes leaves the old status with the
        # new details (which the next run rewrites), never a new status without its reason
        # (a transient failure with no reason would count as final).
        set_tag = self.registry.set_model_version_tag
        stale: tuple[str, ...]
        if migrated_to:
            set_tag(name, version, tags.MIGRATED_TO, migrated_to)
            stale = (tags.REASON, tags.MESSAGE)
        else:
            set_tag(name, version, tags.REASON, reason)
            set_tag(name, version, tags.MESSAGE, tags.clip(message))
            stale = (tags.MIGRATED_TO,)  # a twin it named no longer counts
        set_tag(name, version, tags.STATUS, str(status))
        for key in stale:
            with contextlib.suppress(Exception):  # absent tags are fine
                self.registry.delete_model_version_tag(name, version, key)

    def _ensure_target(self, source: str, target: Target) -> None:
        if target.exists:
            return
        self.registry.create_registered_model(
            target.name, tags={tags.ROLE: tags.ROLE_MIGRATED, tags.SOURCE_MODEL: source},
            description=f"{source}, converted by Airlock: each version holds one ONNX or "
                        "safetensors file, or one safetensors model directory, with signed "
                        "provenance.")
        target.exists = True

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self.registry.get_experiment_by_name(self.experiment)
            self._experiment_id = (str(found.experiment_id) if found is not None else
                                   str(self.registry.create_experiment(self.experiment)))
        return self._experiment_id


def _description(name: str, version: str, record: ProvenanceRecord, *,
                 directory: bool = False) -> str:
    if directory:
        return (f"{name} version {version} converted by Airlock to a safetensors model "
                f"directory ({record.assurance}); fetch it with "
                "airlock_client.fetch_verified_directory, never with MLflow's loaders.")
    return (f"{name} version {version} converted by Airlock to {record.output_format} "
            f"({record.assurance}); load it with airlock_client.load_verified, never with "
            "MLflow's loaders.")

"""Migrate an MLflow model registry through Airlock, one version at a time.

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

This module runs the walk; ``_migrate_walk`` selects models and finds targets,
``_migrate_version`` migrates one version, ``_migrate_report`` holds what is reported.
"""

from __future__ import annotations

from collections.abc import Sequence

from airlock_client import _lineage as tags
from airlock_client._errors import AccessDenied, AirlockError, ServiceUnavailable
from airlock_client._lineage import TARGET_SUFFIX
from airlock_client._migrate_report import (
    PROBLEMS,
    Outcome,
    Status,
    counts,
    iter_problems,
)
from airlock_client._migrate_version import (
    EXPERIMENT,
    TRANSIENT_REASONS,
    Convert,
    Fetch,
    Options,
    Progress,
    VersionMigration,
)
from airlock_client._migrate_walk import SelectionError, Target, find_target, select
from airlock_client._registry import Registry, model_versions
from airlock_client._twin import Download
from airlock_client.provenance import PublicKeyLike

__all__ = [
    "EXPERIMENT", "PROBLEMS", "TARGET_SUFFIX", "TRANSIENT_REASONS", "Convert", "Download", "Fetch",
    "Migration", "MigrationAborted", "Options", "Outcome", "Progress", "SelectionError",
    "Status", "counts", "iter_problems",
]


_DEFAULTS = Options()


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
                 download: Download, public_key: PublicKeyLike,
                 options: Options = _DEFAULTS, progress: Progress | None = None) -> None:
        """``download(artifact_uri, dest_dir)`` fetches a twin's files (bytes only) to verify
        them; ``public_key`` is the broker's key, pinned (never one fetched from the broker:
        what is verified with it is written into the registry)."""
        self.registry = registry
        self.options = options
        self.progress = progress or (lambda _line: None)
        self._versions = VersionMigration(registry, fetch=fetch, convert=convert,
                                          download=download, public_key=public_key,
                                          options=options, progress=self.progress)

    def select(self, names: Sequence[str] | None) -> list[str]:
        """The models to migrate: ``names`` (each checked), or every model but Airlock's own."""
        return select(self.registry, names, self.options.page_size, self.options.target_suffix)

    def run(self, names: Sequence[str] | None) -> list[Outcome]:
        """Migrate every version of the selected models; never stops for one version."""
        outcomes: list[Outcome] = []
        try:
            models = self.select(names)
            plan = [(name, model_versions(self.registry, name, self.options.page_size),
                     find_target(self.registry, name, self.options.target_suffix,
                                 self.options.page_size)) for name in models]
            total = sum(len(versions) for _, versions, _ in plan)
            self.progress(f"{total} version(s) in {len(plan)} registered model(s)"
                          f"{' (dry run: nothing will change)' if self.options.dry_run else ''}")
            done = 0
            for name, versions, target in plan:
                for mv in versions:
                    done += 1
                    outcome = self._versions.one(name, mv, target, f"[{done}/{total}]")
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
        self.registry.set_registered_model_alias(target.name, alias, version)
        target.aliases[alias] = version
        self.progress(f"alias {target.name}@{alias} -> {newest.target} "
                      f"(from {newest.model} v{newest.version})")

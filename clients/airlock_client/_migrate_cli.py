"""``airlock migrate``: convert every version of an MLflow registry through Airlock.

Exit codes (scripts and schedulers depend on them):

====  ==========================================================================
0     every selected version is migrated (by this run or an earlier one); with
      ``--dry-run``: the walk succeeded and nothing earlier failed
1     at least one version is rejected or failed (now or in an earlier run that
      ``--retry-failed`` would retry), or is not ready in the registry
2     usage error (bad options, no tracking URI, no pinned public key, an unknown or
      migrated model)
3     the broker or the tracking server became unreachable; the run stopped.
      Run it again to resume: what was done stays done
4     the broker refused the credentials (UNAUTHENTICATED / PERMISSION_DENIED), as
      for every ``airlock`` command; the run stopped
5     nothing to do: the selection holds no model version at all
130   interrupted (Ctrl-C or SIGTERM): the versions in flight finished, no new one
      started. Run it again to resume
====  ==========================================================================

Progress goes to stderr: one line per version as it ends, then how many are done, the rate
(versions per minute) and the time left; with ``--jobs`` above 1 the lines of versions in
flight alternate (each line whole). The summary (a table, or one JSON object with ``--json``)
goes to stdout, in the walk's order whatever order the versions finished in; a run that
stopped early lists the versions it never reached as ``not_started``.

A run keeps its downloads in the command's work directory (``cli.py``, ``_run_dir``), which a
later ``airlock`` command removes if this one is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airlock_client._batch_jobs import (
    FALLBACK_JOBS,
    JOBS_PROFILE,
    MAX_DEFAULT_JOBS,
    default_jobs,
)
from airlock_client._cli_connection import client_options
from airlock_client._cli_exits import (
    EXIT_DENIED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    failed,
    usage_of,
)
from airlock_client._cli_interrupts import batch_interrupts
from airlock_client._client import Client, default_address, default_public_key
from airlock_client._downloads import Downloads
from airlock_client._errors import (
    AccessDenied,
    AirlockError,
    ConversionError,
    FileSkipped,
    ServiceUnavailable,
)
from airlock_client._lineage import clip
from airlock_client._migrate_key import conversion_key
from airlock_client._progress import busy_notice, write_line
from airlock_client._registry import (
    RegistryError,
    check_page_size,
    open_registry,
    page_size_from_env,
)
from airlock_client._terminal import printable
from airlock_client._twin import mlflow_download, mlflow_listing
from airlock_client._types import ConversionResult, LoadingPolicy, PoolStatus
from airlock_client.migrate import (
    PROBLEMS,
    Convert,
    ConvertDirectory,
    Fetch,
    Migration,
    MigrationAborted,
    Options,
    Outcome,
    SelectionError,
    Status,
    counts,
    with_not_started,
)
from airlock_client.mlflow_source import resolve
from airlock_client.provenance import ProvenanceError, PublicKeyLike, load_public_key

if TYPE_CHECKING:
    from airlock_client.model_dir import DirectoryResult

EXIT_NOTHING = 5
#: 128 + SIGINT, as a shell reports a command stopped by Ctrl-C; SIGTERM ends the same way.
EXIT_INTERRUPTED = 130
_DENIED = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})
#: The broker's refusal of an idempotency key it first saw with other bytes or options.
KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
NO_PINNED_KEY = (
    "migrate writes into the registry, so it needs the broker's public key pinned: "
    "--public-key airlock.pub.pem or AIRLOCK_PUBLIC_KEY (make the file with `airlock-broker keys "
    "export` on the broker's host). A key fetched from the broker over the same connection "
    "(trust on first use) is not accepted for anything written into a registry.")


def exit_code(outcomes: Sequence[Outcome]) -> int:
    """The exit code of a run that finished (an aborted run exits EXIT_UNAVAILABLE)."""
    if not outcomes:
        return EXIT_NOTHING
    if any(o.status in PROBLEMS for o in outcomes):
        return EXIT_FAILED
    return EXIT_OK


@dataclass(frozen=True)
class Broker:
    """What migrate asks of the broker: conversions, and its pool status (``--jobs``)."""

    convert: Convert
    close: Callable[[], None]
    pools: Callable[[], Sequence[PoolStatus]]
    #: Jobs the broker runs at once, from its pool status (0: it does not say).
    max_concurrent_jobs: Callable[[], int] = lambda: 0
    #: A version holding a Hugging Face model directory, file by file (``convert DIR``);
    #: None: sent as its bundle, like any other version.
    convert_directory: ConvertDirectory | None = None
    #: The conversions in flight, shared by whole versions and a directory's files.
    lanes: Lanes = field(default_factory=lambda: Lanes())


def run_migrate(args: argparse.Namespace) -> int:
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not tracking_uri:
        return usage_of(args, "no tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    try:
        page_size = (check_page_size(args.page_size) if args.page_size is not None
                     else page_size_from_env())
    except ValueError as exc:
        return usage_of(args, str(exc))
    if args.alias is not None and not args.alias.strip():
        return usage_of(args, "--alias needs a name")
    pinned = args.public_key or default_public_key()
    if pinned is None and not args.dry_run:  # a dry run converts and writes nothing
        return usage_of(args, NO_PINNED_KEY)
    try:
        public_key = None if pinned is None else load_public_key(pinned)
    except ProvenanceError as exc:
        return usage_of(args, exc.message)
    try:
        options = Options(page_size=page_size, dry_run=args.dry_run, alias=args.alias,
                          retry_failed=args.retry_failed, target_suffix=args.target_suffix,
                          jobs=1 if args.jobs is None else args.jobs)
    except ValueError as exc:  # --jobs out of range
        return usage_of(args, f"--jobs: {exc}")
    registry_uri = _registry_uri(args)
    try:
        registry = open_registry(tracking_uri, registry_uri)
    except ImportError:
        return usage_of(args, "MLflow's client is not installed here "
                        "(pip install 'airlock-client[mlflow]')")
    _quiet_mlflow()  # after the import: importing mlflow sets its loggers' levels
    try:
        broker = _converter(args, public_key)
    except ValueError as exc:  # a bad token file
        return usage_of(args, str(exc))
    except ServiceUnavailable as exc:  # a broker socket someone else could have made
        return failed("migrate", exc, as_json=args.json, doing="stopped")
    if args.jobs is None and not args.dry_run:
        options = replace(options, jobs=_default_jobs(broker))
    broker.lanes.size(options.jobs)
    downloads = Downloads()  # processes started as versions need them, stopped at the end

    def abandon() -> None:  # a second Ctrl-C: the conversions and downloads in flight end
        broker.close()
        downloads.close()

    migration = Migration(registry, fetch=_fetch(tracking_uri, downloads),
                          convert=broker.convert, convert_directory=broker.convert_directory,
                          abandon=abandon,
                          download=mlflow_download(tracking_uri, downloads),
                          listing=mlflow_listing(tracking_uri, downloads),
                          public_key=public_key, options=options, progress=_progress)
    try:
        # stdout carries the summary alone (scripts parse --json): MLflow's client prints
        # "View run ..." links there when a run ends, so the run talks to stderr instead.
        with contextlib.redirect_stdout(sys.stderr), \
                batch_interrupts("migrate", "version", sigterm=True):
            outcomes = migration.run(None if args.all else args.model)
    except (SelectionError, RegistryError) as exc:
        return usage_of(args, str(exc))
    except KeyboardInterrupt:
        # Migration let the versions in flight finish before this reached here.
        _summary(args, migration, migration.outcomes, EXIT_INTERRUPTED,
                 error=("INTERRUPTED", "stopped by Ctrl-C or SIGTERM"))
        _progress("stopped: interrupted (run again to resume)")
        return EXIT_INTERRUPTED
    except MigrationAborted as exc:
        code = EXIT_DENIED if exc.reason in _DENIED else EXIT_UNAVAILABLE
        _summary(args, migration, exc.outcomes, code, error=(exc.reason, exc.message))
        _progress(f"stopped: {exc.reason}: {exc.message} (run again to resume)")
        return code
    finally:
        broker.close()
        downloads.close()
    code = exit_code(outcomes)
    _summary(args, migration, outcomes, code)
    return code


def _default_jobs(broker: Broker) -> int:
    """``--jobs`` when not given: what the broker's pool status says it can run now."""
    try:
        pools = broker.pools()
    except AirlockError as exc:  # no admin role, an old broker, or none at all (yet)
        why = "; it needs the observe or admin role" if isinstance(exc, AccessDenied) else ""
        _progress(f"--jobs not given and the broker's pool status cannot be read "
                  f"({exc.reason}{why}): {FALLBACK_JOBS} versions at a time, what a default "
                  "broker runs at once (--jobs N to choose)")
        return FALLBACK_JOBS
    runs = broker.max_concurrent_jobs()
    jobs = default_jobs(pools, runs)
    why = ("what the broker runs at once" if runs and jobs == min(runs, MAX_DEFAULT_JOBS)
           else f"the broker's warm {JOBS_PROFILE} sandboxes (ready or starting)")
    _progress(f"--jobs not given: {jobs}, {why}")
    return jobs


def _fetch(tracking_uri: str, downloads: Downloads) -> Fetch:
    def fetch(uri: str, dest: Path) -> Path:
        return resolve(uri, dest, tracking_uri=tracking_uri, downloads=downloads)

    return fetch


def _registry_uri(args: argparse.Namespace) -> str:
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri


def _converter(args: argparse.Namespace, public_key: PublicKeyLike | None) -> Broker:
    """The broker, through the client (which verifies each output with the pinned key). The
    client's channel is shared by the versions in flight (gRPC channels are thread-safe).

    Each version is converted under a key derived from it (``_migrate_key``), so a run resumed
    after a crash is answered with the broker's stored result of the killed run's conversion
    instead of a second sandbox; so is each file of a transformers version. The broker binds a
    key to the bytes it first saw: a version whose files changed since then is refused as
    IDEMPOTENCY_KEY_REUSED, and converted once more under a fresh key (what it holds now is
    what must be converted)."""
    client = Client(args.server or default_address(), public_key=public_key,
                    **client_options(args))
    lanes = Lanes()
    keyed = KeyedClient(client, _registry_uri(args), lanes)
    policy: LoadingPolicy = args.policy

    def convert(model_dir: Path, output: Path, subject: str) -> ConversionResult:
        return keyed.convert(model_dir, output, target="auto", loading_policy=policy,
                             job_timeout=args.timeout, on_busy=busy_notice("migrate"),
                             subject=subject)

    def convert_dir(model_dir: Path, output: Path, subject: str) -> DirectoryResult:
        from airlock_client.model_dir import convert_directory

        # Up to --jobs files at once, within the run's --jobs conversions in flight (the
        # lanes): a version's shards take the lanes other versions leave free, so the last
        # large model of a run does not convert one file at a time. A many-GiB model takes
        # minutes: a line per weights file says how far it is. A twin must hold every data
        # file (_twin_dir): one refused fails the version before any shard is converted.
        return convert_directory(keyed.for_directory(), model_dir, output, jobs=lanes.count,
                                 subject=subject,
                                 job_timeout=args.timeout, on_busy=busy_notice("migrate"),
                                 all_data_files=True,
                                 progress=lambda p: _progress(f"{subject}: {p.shard} "
                                                              f"{'converted' if p.ok else 'FAILED'}"
                                                              f"; {p.line()}"))

    return Broker(convert, client.close, client.pool_status, client.max_concurrent_jobs,
                  convert_dir, lanes)


class Lanes:
    """The run's conversions in flight, whole versions and the files of a transformers
    version alike: at most ``--jobs``. Sized once (``size``), when the run's jobs are known,
    before its first conversion: a conversion before that is a bug (RuntimeError), not a
    run that silently converts one thing at a time."""

    def __init__(self, count: int | None = None) -> None:
        self.count = 0
        self._free: threading.BoundedSemaphore | None = None
        if count is not None:
            self.size(count)

    def size(self, count: int) -> None:
        if self._free is not None:  # a conversion in flight would give back the wrong one
            raise RuntimeError("a run's lanes are sized once")
        self.count = count
        self._free = threading.BoundedSemaphore(count)

    def __enter__(self) -> None:
        if self._free is None:
            raise RuntimeError("a conversion before the run's --jobs sized its lanes")
        self._free.acquire()

    def __exit__(self, *exc: object) -> None:
        assert self._free is not None
        self._free.release()


class KeyedClient:
    """``Client``, converting each subject under the key ``_migrate_key`` derives from it and
    its options (and again under a fresh key when the broker saw other bytes under that one);
    what ``convert_directory`` asks of a client."""

    def __init__(self, client: Client, registry_uri: str, lanes: Lanes,
                 failed: threading.Event | None = None) -> None:
        self.client = client
        self.registry_uri = registry_uri
        #: Each conversion holds one of the run's lanes while it is in flight.
        self.lanes = lanes
        #: Set when one of this client's conversions failed (``for_directory``).
        self.failed = failed

    def for_directory(self) -> KeyedClient:
        """This client for one directory version's files. Every file's failure fails a
        migrated version (it wants every data file: ``all_data_files``), so once one fails, a
        file that was still waiting for a lane is not converted (``FileSkipped``): its
        conversion, a many-GiB shard's maybe, would be thrown away."""
        return KeyedClient(self.client, self.registry_uri, self.lanes, threading.Event())

    def convert(self, artifact: str | os.PathLike[str], output: str | os.PathLike[str],
                **options: Any) -> ConversionResult:
        subject = str(options.get("subject", ""))
        key = conversion_key(self.registry_uri, subject,
                             policy=str(options.get("loading_policy", "")),
                             target=str(options.get("target", "")),
                             job_timeout=int(options.get("job_timeout", 0)),
                             declared=str(options.get("declared_format") or ""))
        with self.lanes:
            if self.failed is not None and self.failed.is_set():
                raise FileSkipped(f"{clip(subject, 200)}: not converted: another file of "
                                  "its version failed first")
            try:
                return self._convert(artifact, output, key, subject, options)
            except BaseException:
                if self.failed is not None:
                    self.failed.set()  # before the lane is given back to a file waiting
                raise

    def _convert(self, artifact: str | os.PathLike[str], output: str | os.PathLike[str],
                 key: str, subject: str, options: dict[str, Any]) -> ConversionResult:
        try:
            return self.client.convert(artifact, output, idempotency_key=key, **options)
        except ConversionError as exc:
            if exc.reason != KEY_REUSED:
                raise
            _progress(f"{subject}: its files are not the ones converted under its key "
                      "within the broker's idempotency TTL; converting them under a fresh "
                      "key")
            return self.client.convert(artifact, output, **options)

    def attest_index(self, index: bytes, shards: Sequence[tuple[str, bytes]], *,
                     subject: str = "") -> bytes:
        return self.client.attest_index(index, shards, subject=subject)

    def default_jobs(self, profile: str = JOBS_PROFILE) -> int:
        return self.client.default_jobs(profile)

    def close(self) -> None:
        self.client.close()


def _quiet_mlflow() -> None:
    """MLflow's client logs each version's creation and prints a link per run; the progress
    lines already say what happened, once per version."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def _progress(line: str) -> None:
    write_line(f"airlock migrate: {printable(line)}", sys.stderr)


def _summary(args: argparse.Namespace, migration: Migration, outcomes: Sequence[Outcome],
             code: int, error: tuple[str, str] | None = None) -> None:
    rows = with_not_started(migration.planned, outcomes)
    tally = counts(rows)
    if args.json:
        status = {EXIT_OK: "ok", EXIT_FAILED: "failed", EXIT_UNAVAILABLE: "aborted",
                  EXIT_DENIED: "denied", EXIT_NOTHING: "nothing",
                  EXIT_INTERRUPTED: "interrupted"}[code]
        print(json.dumps({
            "status": status, "exit_code": code, "dry_run": args.dry_run,
            "counts": tally, "versions": [asdict(o) for o in rows],
            "error": {"reason": error[0], "message": error[1]} if error else None,
            "jobs": migration.options.jobs,
            "versions_per_minute": round(migration.throughput.versions_per_minute(), 1),
            "conversions_per_minute": round(migration.throughput.per_minute(), 1),
        }))
        return
    print(render_table(rows))
    parts = [f"{n} {status.replace('_', ' ')}" for status, n in tally.items() if n]
    print(f"{len(rows)} version(s): {', '.join(parts) or 'none'}"
          f"{' (dry run)' if args.dry_run else ''}")


def render_table(outcomes: Sequence[Outcome]) -> str:
    """The human summary: one row per version, reasons last (they are the long column)."""
    header = ("MODEL", "VERSION", "STATUS", "TARGET", "FORMAT", "VERDICT", "CODE_RAN",
              "REASON")
    rows = [header] + [tuple(printable(cell) for cell in (
        o.model, o.version, str(o.status), o.target or "-", o.format or "-",
        o.assurance or "-", _code_ran(o), _reason(o))) for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True))
             + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _code_ran(outcome: Outcome) -> str:
    """Whether converting the version ran its own code in the sandbox (allow_code): a
    hostile version converted that way must not look like a clean one."""
    if outcome.executed_artifact_code is None:
        return "-"
    return "yes" if outcome.executed_artifact_code else "no"


def _reason(outcome: Outcome) -> str:
    if not outcome.reason:
        return "-"
    hint = " (--retry-failed)" if outcome.status == Status.FAILED_EARLIER else ""
    return f"{outcome.reason}: {clip(outcome.message, 90)}{hint}"

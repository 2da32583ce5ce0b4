"""A Hugging Face-style PyTorch model directory to a safetensors directory, shard by shard.

Each weights file is one ordinary conversion (``Client.convert(..., target="safetensors")``):
its own single-use sandbox, integrity-checked by the broker, its signed provenance verified
and written beside it. At most ``jobs`` run at once (:func:`airlock_client.batch.run_bounded`).
The output is what ``transformers`` writes: ``model.safetensors``, or shards
``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json`` built from the
converted files' own headers, plus the plain data files, each checked in its sandbox as what
its name says (:mod:`._hf_dir` chooses them by name). Code and pickles other than the weights
are never carried over.

Everything is written into a temporary directory beside the destination and renamed into
place at the end: a shard that fails fails the directory with that shard's reason (the batch
stops starting shards; those in flight finish), and no partial output is left behind.

The index, derived from the shards' headers, gets a signed record of its own: the broker
checks it against the shards' records (``Client.attest_index``: every file named, each
file's tensor names, the total size) before it signs. Each carried data file goes through
the broker too, before the shards, declared as its kind (airlock_sandbox.data_files): its
sandbox checks it, the broker returns it unchanged and signs a record for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from airlock_client import _bundle, _hf_dir, _part_files, _st_header
from airlock_client._batch_jobs import FALLBACK_JOBS, SHARDS_PROFILE
from airlock_client._errors import AccessDenied, AirlockError, FileSkipped, ServiceUnavailable
from airlock_client._hf_dir import DataFile, HfModelDir, Shard, Skipped
from airlock_client._types import (
    Assurance,
    ConversionResult,
    DeclaredFormat,
    LoadingPolicy,
    Target,
)
from airlock_client._umask import umask
from airlock_client.batch import Done, Throughput, format_duration, run_bounded
from airlock_sandbox import data_files
from airlock_sandbox.formats import ArtifactFormat

if TYPE_CHECKING:
    from airlock_client._retry import OnBusy

#: What a default broker runs at once: the shards converted at once when the broker's pool
#: status cannot be read (without ``jobs``, ``convert_directory`` asks the broker).
DEFAULT_JOBS = FALLBACK_JOBS
#: How a directory's shards are loaded unless told: Hugging Face shards are plain state
#: dicts, which torch's ``weights_only`` loader reads without running anything. A shard that
#: needs the artifact's own code to load is not what it claims to be, and fails the directory
#: (``POLICY_VIOLATION``, naming it) instead of running that code for the sake of one shard.
DIRECTORY_POLICY: LoadingPolicy = "safe_only"
#: A data file refused for this is skipped (not what its name says); any other refusal
#: fails the directory (one that grew while it was sent: TOO_LARGE, as a shard).
NOT_ITS_KIND = frozenset({"FORMAT_MISMATCH"})
#: What each kind of data file is declared as (airlock_sandbox.data_files.KINDS).
_DECLARED = cast(dict[ArtifactFormat, DeclaredFormat],
                 {kind: name for name, kind in data_files.KINDS.items()})
#: What a mismatch between a converted shard and the source index is called.
INDEX_MISMATCH = "INDEX_MISMATCH"
#: The destination's filesystem has less free space than the output will take: refused
#: before any shard is sent, not when a late shard of a long run finds the disk full.
NO_SPACE = "NO_SPACE"
#: A data file is not what its name says, and the caller wants every one carried
#: (``all_data_files``: a migrated twin must hold them all): refused before any shard.
DATA_FILE_REFUSED = "DATA_FILE_REFUSED"
#: Weakest first: the directory's assurance is the weakest of its shards'.
_UNITS = ((10**9, "GB"), (10**6, "MB"), (10**3, "kB"))
_STRENGTH = {Assurance.UNSPECIFIED: 0, Assurance.FORMAT_SAFE_ONLY: 1,
             Assurance.INTEGRITY_VERIFIED: 2}


class ModelDirError(AirlockError):
    """The directory was not converted because of one shard: it failed (``reason`` and
    ``kind`` are that shard's conversion's, the original error is ``cause``), or its converted
    tensors disagree with the index (reason ``INDEX_MISMATCH``). ``shard`` names it."""

    def __init__(self, reason: str, message: str, *, shard: str, kind: str = "rejected",
                 cause: AirlockError | None = None) -> None:
        super().__init__(message, reason=reason)
        self.shard = shard
        self.kind = kind
        self.cause = cause


@dataclass(frozen=True)
class ShardResult:
    """One converted weights file."""

    source: str  # its name in the source directory
    output: str  # its name in the output directory
    result: ConversionResult
    tensors: int
    #: Bytes of tensor data in the output (its share of ``total_size``).
    data_bytes: int
    deduplicated: Mapping[str, str]
    provenance: Path


@dataclass(frozen=True)
class DirectoryResult:
    """A converted model directory, renamed into place at ``output``."""

    source: Path
    output: Path
    shards: tuple[ShardResult, ...]
    #: ``model.safetensors.index.json`` (None for a single ``model.safetensors``).
    index: Path | None
    #: Bytes of tensor data over all shards (the index's ``metadata.total_size``).
    total_size: int
    #: The weakest assurance of any shard.
    assurance: Assurance
    #: Which shards are below ``integrity_verified`` and why ("" if none is).
    integrity_note: str
    carried: tuple[str, ...]
    skipped: tuple[Skipped, ...]
    #: Removed name -> kept name over all shards (tied tensors stored once).
    deduplicated: Mapping[str, str]
    duration_seconds: float

    @property
    def integrity_verified(self) -> bool:
        return self.assurance == Assurance.INTEGRITY_VERIFIED

    @property
    def shards_that_ran_code(self) -> tuple[str, ...]:
        """The source shards whose conversion executed artifact code in its sandbox (as the
        sandbox reported it), in output order."""
        return tuple(s.source for s in self.shards if s.result.report.executed_artifact_code)

    @property
    def executed_artifact_code(self) -> bool:
        """Whether any shard's conversion executed artifact code (see
        ``shards_that_ran_code``); only possible under ``allow_code``."""
        return bool(self.shards_that_ran_code)


@dataclass(frozen=True)
class DirectoryProgress:
    """Given to ``progress`` after each shard ends."""

    shard: str
    ok: bool
    shards_done: int
    shards_total: int
    bytes_done: int
    bytes_total: int
    throughput: Throughput = field(repr=False)

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate in bytes so far (None while unknown, or when done):
        shards differ in size (an embedding shard may be twice a layer shard), so counting
        shards would promise the end too early or too late."""
        elapsed = time.monotonic() - self.throughput.began
        if self.bytes_done <= 0 or elapsed <= 0 or self.bytes_done >= self.bytes_total:
            return None
        return (self.bytes_total - self.bytes_done) * elapsed / self.bytes_done

    def line(self) -> str:
        """``shards 2/3 done, 1.5 shards/min; 120.0/180.0 MB, about 40s left``."""
        scale, unit = _unit(self.bytes_total)
        amount = f"{self.bytes_done}/{self.bytes_total}" if scale == 1 else \
            f"{self.bytes_done / scale:.1f}/{self.bytes_total / scale:.1f}"
        failed = self.throughput.failed
        eta = self.eta_seconds()
        return (f"shards {self.shards_done}/{self.shards_total} done"
                + (f" ({failed} failed)" if failed else "")
                + f", {self.throughput.per_minute():.1f} shards/min; {amount} {unit}"
                + ("" if eta is None else f", about {format_duration(eta)} left"))


class ShardClient(Protocol):
    """What a directory's conversion asks of its client: ``Client`` (typed apart: the
    client's module needs grpc, and it offers ``Client.convert_directory`` from here)."""

    def convert(self, artifact: str | os.PathLike[str], output: str | os.PathLike[str], *,
                target: Target = ..., declared_format: DeclaredFormat | None = ...,
                loading_policy: LoadingPolicy = ...,
                job_timeout: int = ..., on_busy: OnBusy | None = ...,
                subject: str = ..., filename: str = ...) -> ConversionResult: ...

    def attest_index(self, index: bytes, shards: Sequence[tuple[str, bytes]], *,
                     subject: str = ...) -> bytes: ...

    def default_jobs(self, profile: str = ...) -> int: ...

    def close(self) -> None: ...


def convert_directory(client: ShardClient, source: str | os.PathLike[str],
                      output: str | os.PathLike[str], *, jobs: int | None = None,
                      progress: Callable[[DirectoryProgress], None] | None = None,
                      overwrite: bool = False,
                      loading_policy: LoadingPolicy = DIRECTORY_POLICY,
                      job_timeout: int = 0, on_busy: OnBusy | None = None,
                      subject: str = "", all_data_files: bool = False) -> DirectoryResult:
    """Convert the model directory ``source`` into the safetensors directory ``output``.

    Raises ``ModelSourceError`` when the directory is refused before anything is sent (see
    :mod:`._hf_dir`), ``ModelDirError`` when a shard fails or disagrees with the index,
    ``FileExistsError`` when ``output`` exists and is not an empty directory (``overwrite``
    replaces one that holds only what such an output holds: shards, index, provenance
    records, carried data files), ``ValueError`` when ``output`` is ``source`` or holds it,
    ``ServiceUnavailable`` when the broker could not be reached before it answered any shard,
    ``AirlockError`` (reason ``NO_SPACE``) when ``output``'s filesystem has less free space
    than the weights and data files take, before any shard is sent.
    ``subject`` is signed into each file's provenance as ``SUBJECT/FILE`` (the index's as
    ``SUBJECT``); by default the source directory's absolute path, as ``airlock convert DIR``
    signs it (``provenance.path_subject``): ``verify DIR`` holds each carried data file to
    it.
    ``loading_policy`` is ``safe_only`` unless told (``DIRECTORY_POLICY``: why, there).
    ``all_data_files``: a data file that is not what its name says fails the directory
    (``DATA_FILE_REFUSED``, before any shard is sent) instead of being left out.
    """
    from airlock_client.provenance import path_subject

    began = time.monotonic()
    subject = subject or path_subject(source)
    model = _hf_dir.inspect(source)
    dest = Path(os.path.abspath(output))
    _check_destination(model.root, dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _check_room(dest.parent,
                model.weight_bytes + sum(d.source.size for d in model.data_files))
    if jobs is None:  # what the broker runs at once; one shard needs no asking
        jobs = 1 if len(model.shards) == 1 else client.default_jobs(SHARDS_PROFILE)
    part = _part_files.new_dir(dest)
    tmp = part.inside  # never its name, which others may point elsewhere (_part_files)
    try:
        refused = _carry_data_files(client, model, tmp, jobs=jobs, job_timeout=job_timeout,
                                    on_busy=on_busy, subject=subject)
        if refused and all_data_files:
            first = refused[min(refused)]
            raise ModelDirError(DATA_FILE_REFUSED, f"{len(refused)} data file(s) are not what "
                                f"their names say, such as {first.name}: {first.why}",
                                shard=first.name)
        shards = _convert_shards(client, model, tmp, jobs=jobs, progress=progress,
                                 loading_policy=loading_policy, job_timeout=job_timeout,
                                 on_busy=on_busy, subject=subject)
        index = _write_outputs(model, shards, tmp)
        if index is not None:  # its record: <index>.provenance.json, beside it
            _attest_index(client, tmp / index, shards, subject)
        _replace(part, dest, overwrite)
    finally:
        part.remove()  # unless it was put in place
        part.release()
    weakest = min((s.result.assurance for s in shards), key=lambda a: _STRENGTH.get(a, 0))
    weak = [s for s in shards if s.result.assurance != Assurance.INTEGRITY_VERIFIED]
    note = "; ".join(f"{s.source}: {s.result.assurance}"
                     + (f" ({s.result.integrity_note})" if s.result.integrity_note else "")
                     for s in weak)
    deduplicated = {k: v for s in shards for k, v in s.deduplicated.items()}
    return DirectoryResult(
        source=model.root, output=dest,
        shards=tuple(_moved(s, tmp, dest) for s in shards),
        index=None if index is None else dest / index,
        total_size=sum(s.data_bytes for s in shards),
        assurance=weakest, integrity_note=note,
        carried=tuple(d.name for d in model.data_files if d.name not in refused),
        skipped=tuple(sorted((*model.skipped, *refused.values()), key=lambda s: s.name)),
        deduplicated=dict(sorted(deduplicated.items())),
        duration_seconds=time.monotonic() - began)


def _check_room(where: Path, needed: int) -> None:
    """Refuse (``NO_SPACE``) when ``where``'s filesystem has less free space than ``needed``:
    the output's size as the inputs' (the weights as safetensors take what they took as
    pickles; a training checkpoint's optimizer state, dropped, makes it an overestimate). An
    output being replaced still counts: it is removed only once the new one is in place."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if st.f_blocks and free < needed:  # one that gives no size (some FUSE) is not judged
        raise AirlockError(
            f"the output needs about {_size(needed)} (the weights' and data files' size) and "
            f"{where} has {_size(free)} free: free space there, or give an output directory "
            "on another filesystem", reason=NO_SPACE)


def _size(n: int) -> str:
    scale, unit = _unit(n)
    return f"{n} bytes" if scale == 1 else f"{n / scale:.1f} {unit}"


def _unit(n: int) -> tuple[int, str]:
    """The unit ``n`` bytes are shown in: the largest of ``_UNITS`` it reaches."""
    return next(((s, u) for s, u in _UNITS if n >= s), (1, "bytes"))


def _carry_data_files(client: ShardClient, model: HfModelDir, tmp: Path, *, jobs: int,
                      job_timeout: int, on_busy: OnBusy | None,
                      subject: str) -> dict[str, Skipped]:
    """Each data file through the broker, as its kind (``json``, ``text``, ``sentencepiece``):
    its sandbox checks it and the broker returns it unchanged, with a signed record written
    beside it. One that is not what its name says (``NOT_ITS_KIND``: the sandbox's check, or
    leading bytes of a model or a pickle) is skipped, and returned with why; any other
    failure fails the directory, and so does one that changed size while it was sent. Sent
    by its descriptor (``_bundle.pinned``), as shards are. First, because they are small:
    before any shard is sent."""
    from airlock_client.provenance import file_subject, write_provenance

    def work(data: DataFile) -> Skipped | None:
        out = tmp / data.name
        try:
            with _bundle.pinned(data.source) as listed:
                result = client.convert(listed, out, declared_format=_DECLARED[data.kind],
                                        loading_policy="safe_only",  # nothing in it is loaded
                                        job_timeout=job_timeout, on_busy=on_busy,
                                        subject=file_subject(subject, data.name),
                                        filename=data.name)
        except AirlockError as exc:
            if getattr(exc, "reason", "") not in NOT_ITS_KIND:
                raise
            return Skipped(data.shown, exc.message)
        if result.input_size != data.source.size:
            raise _bundle.refuse(f"{data.shown} changed while being carried: "
                                 f"{result.input_size} bytes sent, {data.source.size} listed")
        write_provenance(out, result.provenance)
        return None

    refused: dict[str, Skipped] = {}
    for done in run_bounded(model.data_files, work, concurrency=jobs, stop=lambda d: not d.ok,
                            abandon=client.close):
        if isinstance(done.error, FileSkipped):
            continue  # another file failed first (and was yielded first): its failure stands
        if done.result is not None:
            refused[done.item.name] = done.result
        if not done.ok:  # unreachable or denied: the broker's or the caller's, not the file's
            raise _failure(done.item.shown, done.error,
                           isinstance(done.error, (ServiceUnavailable, AccessDenied)))
    return refused


def _convert_shards(client: ShardClient, model: HfModelDir, tmp: Path, *, jobs: int,
                    progress: Callable[[DirectoryProgress], None] | None,
                    loading_policy: LoadingPolicy, job_timeout: int, on_busy: OnBusy | None,
                    subject: str) -> list[ShardResult]:
    from airlock_client.provenance import file_subject, write_provenance

    def work(shard: Shard) -> ShardResult:
        out = tmp / shard.output_name
        # Sent by its descriptor: the file inspected, whatever is put at its name meanwhile.
        with _bundle.pinned(shard.source) as listed:
            result = client.convert(listed, out, target="safetensors",
                                    loading_policy=loading_policy, job_timeout=job_timeout,
                                    on_busy=on_busy,
                                    subject=file_subject(subject, shard.source.name),
                                    filename=shard.source.name)
        if result.input_size != shard.source.size:
            raise _bundle.refuse(f"{shard.source.name} changed while being converted: "
                                 f"{result.input_size} bytes sent, {shard.source.size} listed")
        header = _st_header.read_header(out)
        if shard.names is not None:
            why = _hf_dir.tensor_names_problem(shard.names, dict.fromkeys(header.tensors),
                                               header.deduplicated)
            if why is not None:
                raise ModelDirError(INDEX_MISMATCH, f"shard {shard.source.name}: {why}",
                                    shard=shard.source.name)
        provenance = write_provenance(out, result.provenance)
        return ShardResult(shard.source.name, shard.output_name, result, len(header.tensors),
                           header.data_bytes, header.deduplicated, provenance)

    throughput = Throughput(total=len(model.shards))
    total_bytes = model.weight_bytes
    done_bytes = 0
    results: list[ShardResult] = []
    failed: Done[Shard, ShardResult] | None = None
    answered = False  # has the broker answered any shard, converted or refused?
    broker_failed = False  # did the first failure come before any answer, the broker's?
    # A second Ctrl-C cancels the shards in flight (the client closes its channel); they
    # have all returned before the temporary directory is removed (convert_directory).
    for done in run_bounded(model.shards, work, concurrency=jobs, stop=lambda d: not d.ok,
                            abandon=client.close):
        if isinstance(done.error, FileSkipped):
            continue  # another shard failed first (and was yielded first): its failure stands
        # Unreachable, or the caller denied: about the broker or the caller, not this shard.
        unreached = not answered and isinstance(done.error, (ServiceUnavailable, AccessDenied))
        answered = answered or not unreached
        if done.result is not None:
            results.append(done.result)
        elif failed is None:
            failed, broker_failed = done, unreached
        if unreached:
            continue  # not this shard's doing: no "FAILED" line for it
        throughput.add(done.ok)
        done_bytes += done.item.source.size
        if progress is not None:
            progress(DirectoryProgress(done.item.source.name, done.ok, throughput.done,
                                       len(model.shards), done_bytes, total_bytes, throughput))
    if failed is not None:
        raise _failure(failed.item.source.name, failed.error, broker_failed, what="shard ")
    return sorted(results, key=lambda r: r.output)


def _failure(name: str, error: Exception | None, broker_failed: bool, *,
             what: str = "") -> Exception:
    """What a failed shard or data file (``name``; ``what`` says which in the message) fails
    the directory with: its reason under its name, or, for a broker that could not be reached
    (or denied the caller) before it answered, the broker's own failure (the file was never
    looked at: naming it would send the user to the wrong file)."""
    if broker_failed or isinstance(error, ModelDirError) or not isinstance(error, AirlockError):
        return error or AssertionError(f"{what}{name} failed without an error")
    return ModelDirError(error.reason, f"{what}{name}: {error.message}", shard=name,
                         kind=getattr(error, "kind", "failed"), cause=error)


def _write_outputs(model: HfModelDir, shards: list[ShardResult], tmp: Path) -> str | None:
    """The index, when sharded; returns its name."""
    if not model.sharded:
        return None
    headers = [(s.output, _st_header.read_header(tmp / s.output)) for s in shards]
    _write_new(tmp / _hf_dir.SAFE_WEIGHTS_INDEX, _st_header.index_document(headers))
    return _hf_dir.SAFE_WEIGHTS_INDEX


def _attest_index(client: ShardClient, index: Path, shards: list[ShardResult],
                  subject: str) -> None:
    """The index's signed record, beside it (``<index>.provenance.json``); its subject is
    the directory's."""
    from airlock_client.provenance import write_provenance

    envelope = client.attest_index(
        index.read_bytes(), [(s.output, s.result.provenance) for s in shards], subject=subject)
    write_provenance(index, envelope)


def _write_new(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)


def _check_destination(source: Path, dest: Path, overwrite: bool) -> None:
    real = Path(os.path.realpath(dest))
    if real == source or source.is_relative_to(real):
        raise ValueError(f"the output directory {dest} is the source directory or holds it")
    if not os.path.lexists(dest):
        return
    if os.path.islink(dest) or not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a directory")
    if any(os.scandir(dest)) and not overwrite:
        raise FileExistsError(f"{dest} exists and is not empty (--overwrite, overwrite=True, "
                              "replaces it if it is an earlier output)")
    _check_replaceable(dest)


def _check_replaceable(dest: Path) -> None:
    """Refuse to replace a directory that holds anything an output of ours does not: an
    ``-o`` pointing at the wrong directory must not delete a user's files."""
    foreign = _foreign_entries(dest)
    if foreign:
        raise FileExistsError(
            f"{dest} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} that an "
            f"Airlock model directory output does not (such as {foreign[0]!r}): it is not an "
            "Airlock output, so --overwrite does not replace it; choose another output "
            "directory or empty this one yourself")


def _foreign_entries(dest: Path) -> list[str]:
    """Entries of ``dest`` that ``convert_directory`` never writes, sorted: anything but a
    regular file named as an output shard, the index, a carried data file, or the provenance
    record of one of them; and such a file without its record beside it (every file an
    output holds has one: a ``save_pretrained`` directory uses the same names, and none)."""
    from airlock_client.provenance import SUFFIX

    def ours(name: str) -> bool:
        signed = name.removesuffix(SUFFIX)
        return (signed in (_hf_dir.SAFE_WEIGHTS, _hf_dir.SAFE_WEIGHTS_INDEX,
                           _hf_dir.SAFE_ADAPTER_WEIGHTS)
                or _hf_dir.SAFE_SHARD_NAME.fullmatch(signed) is not None
                or signed in _hf_dir.CARRIED_FILES)

    with os.scandir(dest) as entries:  # read once: both checks judge the same listing
        names = {e.name: ours(e.name) and e.is_file(follow_symlinks=False) for e in entries}
    files = {name for name, mine in names.items() if mine}
    return sorted(name for name in names if name not in files
                  or (not name.endswith(SUFFIX) and name + SUFFIX not in files))


def _replace(part: _part_files.Part, dest: Path, overwrite: bool) -> None:
    """Rename the finished directory into place; an existing one is moved aside first and
    removed only once the new one is in place. The temporary name is checked to be ours
    before the rename, and ``dest`` after it (``Part.placed_as``)."""
    tmp = part.path
    part.set_mode(0o777 & ~umask())  # mkdtemp makes 0700; give it the usual mode
    part.check_named(tmp)
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        part.placed_as(dest)
        return
    if not any(os.scandir(dest)):
        os.rmdir(dest)
        os.rename(tmp, dest)
        part.placed_as(dest)
        return
    if not overwrite:  # something was written there while we converted
        raise FileExistsError(f"{dest} is no longer empty")
    _check_replaceable(dest)  # again: it was checked before the conversion, minutes ago
    # The old output is removed as what it is now, not as whatever its name holds later: in a
    # directory others may write, they could rename a tree of the user's to that name.
    previous = _part_files.identity(dest)
    if _part_files.exchange(tmp, dest):
        # At no moment was there no output; the old one is under the temporary name (or,
        # killed first, the next run removes it: it is unlocked).
        part.placed_as(dest)
        _remove_previous(tmp, previous)
        return
    # Named as a temporary output of ``dest``: killed between the two renames, the old
    # output is what the next run's sweep removes (its new one is at ``tmp``, swept too).
    old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}{_part_files.DIR_SUFFIX}")
    with _signals_held():  # a Ctrl-C between the renames would leave no output at all
        os.rename(dest, old)
        os.rename(tmp, dest)
        part.placed_as(dest)
    _remove_previous(old, previous)


def _remove_previous(name: Path, previous: tuple[int, int]) -> None:
    """The replaced output, if ``name`` still holds it; what cannot be removed is left."""
    with contextlib.suppress(OSError, RecursionError):
        _part_files.remove_tree(name, previous)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back until the block ends, then delivered. Their handlers are
    swapped for ones that only note them: a signal mask would hold them for this thread
    alone, and the kernel hands a process's signal to any thread (a gRPC channel has
    several), whose handler Python then runs in the main thread all the same. Only the main
    thread can set handlers; in another, no signal interrupts the block anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    before = {sig: signal.signal(sig, lambda number, frame: noted.append(number))
              for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for held, handler in before.items():
            signal.signal(held, handler)
        for number in dict.fromkeys(noted):
            signal.raise_signal(number)


def _moved(shard: ShardResult, tmp: Path, dest: Path) -> ShardResult:
    result = ConversionResult(**{**shard.result.__dict__, "output": dest / shard.output})
    return ShardResult(shard.source, shard.output, result, shard.tensors, shard.data_bytes,
                       shard.deduplicated, dest / shard.provenance.relative_to(tmp))


__all__ = ["DEFAULT_JOBS", "DIRECTORY_POLICY", "INDEX_MISMATCH", "DirectoryProgress",
           "DirectoryResult", "ModelDirError", "ShardResult", "convert_directory"]

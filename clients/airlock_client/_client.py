"""The Airlock client: upload an artifact, receive a validated model, write it atomically."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

import grpc

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_client import _batch_jobs, _bundle, _channel, _part_files, _signed_answer, _wire
from airlock_client._channel import ChannelSettings, PathLike, open_channel
from airlock_client._errors import AirlockError, ConversionError, IntegrityError
from airlock_client._local_transfer import LocalTransferUnavailable, convert_local
from airlock_client._regular_files import open_regular
from airlock_client._retry import OnBusy, RetryPolicy, RetrySchedule
from airlock_client._run_dir import scratch_dir
from airlock_client._types import (
    CALL_SECONDS,
    ConversionResult,
    DeclaredFormat,
    LoadingPolicy,
    PoolStatus,
    ProvenanceKey,
    SelfTestCheck,
    SelfTestReport,
    Target,
    TensorSpec,
)
from airlock_client.addresses import is_loopback
from airlock_client.provenance import (
    ProvenanceError,
    PublicKeyLike,
    check_output,
    fingerprint,
    load_public_key,
)
from airlock_sandbox.contract import MAX_SAMPLE_BYTES, check_sample, check_sample_size

if TYPE_CHECKING:
    from airlock_client.batch import Done
    from airlock_client.model_dir import DirectoryProgress, DirectoryResult

log = logging.getLogger("airlock_client")

CHUNK_BYTES = 1024 * 1024
#: The broker refuses a longer idempotency key (BAD_REQUEST).
MAX_IDEMPOTENCY_KEY = 128

Progress = Callable[[int, int], None]


def default_address() -> str:
    """``AIRLOCK_SERVER``, else the broker's Unix socket, else 127.0.0.1:50051 (_channel)."""
    return _channel.default_address()


def default_public_key() -> str | None:
    """``AIRLOCK_PUBLIC_KEY``: a PEM file holding the broker's provenance key, if pinned."""
    return os.environ.get("AIRLOCK_PUBLIC_KEY") or None


def default_local_transfer() -> bool:
    """``AIRLOCK_LOCAL_TRANSFER=0`` turns the same-host fast path off (default: on)."""
    return os.environ.get("AIRLOCK_LOCAL_TRANSFER", "1").lower() not in {"0", "false", "no"}


#: Formats a file's name declares when its caller does not. A skops file is a zip whose first
#: member may be an array, as an ``.npz``'s is, and the broker reads no further than that
#: member's name (it opens no archive): only a declaration tells the two apart. A wrong name
#: costs a refusal (``FORMAT_MISMATCH``), never a conversion of something else.
NAMED_FORMATS: dict[str, DeclaredFormat] = {".skops": "skops"}


def declared_by_name(name: str) -> DeclaredFormat | None:
    """The format ``name``'s suffix declares (``NAMED_FORMATS``), or None."""
    return NAMED_FORMATS.get(Path(name).suffix.lower())


class Client:
    """A connection to an Airlock broker. Use as a context manager, or call ``close``.

    Every output's signed provenance is verified before the output is written. With
    ``public_key`` (or ``AIRLOCK_PUBLIC_KEY``) the signature must be by that pinned key: a
    broker, or anyone between, without the matching private key cannot pass. Without one, the
    client verifies against the key the broker publishes (``provenance_key()``), fetched once
    per client over the same channel: trust on first use, which still binds each output to its
    signed record but cannot detect a broker that is not the one you meant. A result whose
    provenance is missing or fails verification raises ``ProvenanceError`` and nothing is
    written at the destination.

    Credentials, each defaulting to an environment variable (as the address defaults to
    ``AIRLOCK_SERVER``): ``token`` (``AIRLOCK_TOKEN``), a bearer token from ``airlock-broker token
    create``; ``tls_ca`` (``AIRLOCK_TLS_CA``), the CA that signed the broker's certificate,
    which turns TLS on (``tls=True`` / ``AIRLOCK_TLS=1`` uses the system's CAs instead);
    ``client_cert`` and ``client_key`` (``AIRLOCK_CLIENT_CERT`` / ``AIRLOCK_CLIENT_KEY``) for
    mutual TLS. A token is never sent in cleartext beyond loopback (``ValueError``).

    Same-host fast path: when the address is loopback (``127.0.0.1``, ``localhost``, ``[::1]``,
    ``unix:``) and the broker offers it, no artifact or output byte goes through gRPC: the
    client passes its open input file and a fresh temp output file to the broker over the
    broker's Unix socket (see :mod:`airlock_client._local_transfer`). Every check is the same
    as when streaming (signed provenance, atomic rename). If it cannot start (not offered,
    socket missing or untrusted, permission), the client streams instead and logs why at INFO.
    ``local_transfer=False`` (``AIRLOCK_LOCAL_TRANSFER=0``, ``--no-local-transfer``) always
    streams.

    Retries (see :mod:`airlock_client._retry`): a broker that is full (BUSY) is waited for
    until ``timeout``, never sooner than its estimate of the wait; ``wait_when_busy=False``
    raises BUSY at once instead. A broker that is unreachable or cannot run sandboxes
    (UNAVAILABLE) is tried ``retry_attempts`` times in a row within ``retry_max_seconds``.
    """

    def __init__(self, address: str | None = None, *, timeout: float = CALL_SECONDS,
                 retry_attempts: int = 4, retry_max_seconds: float = 60.0,
                 wait_when_busy: bool = True,
                 token: str | None = None, tls: bool | None = None,
                 tls_ca: PathLike | None = None, client_cert: PathLike | None = None,
                 client_key: PathLike | None = None,
                 public_key: PublicKeyLike | None = None,
                 local_transfer: bool | None = None) -> None:
        self._pinned: PublicKeyLike | None = (public_key if public_key is not None
                                              else default_public_key())
        self._key: tuple[Any, str] | None = None
        self.address = address or default_address()
        self.timeout = timeout
        self.retry_attempts = retry_attempts
        self.retry_max_seconds = retry_max_seconds
        self.retry_policy = RetryPolicy(unavailable_attempts=retry_attempts,
                                        unavailable_seconds=retry_max_seconds,
                                        wait_when_busy=wait_when_busy)
        wanted = default_local_transfer() if local_transfer is None else local_transfer
        #: Whether the next conversion tries the fast path (off after the broker said "not
        #: offered", so that is asked once per client).
        self.local_transfer = wanted and is_loopback(self.address)
        #: How the last conversion (or failed attempt) moved its bytes: "local" or "stream".
        self.last_transfer = ""
        settings = ChannelSettings.resolve(token=token, tls=tls, tls_ca=tls_ca,
                                           client_cert=client_cert, client_key=client_key)
        self._closed = threading.Event()
        self._channel, self._metadata = open_channel(self.address, settings, options=[
            ("grpc.max_receive_message_length", 4 * 1024 * 1024)])
        self._stub = pb_grpc.ConversionServiceStub(self._channel)
        self._admin = pb_grpc.AdminServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel: calls in flight (from any thread) end with ``CANCELLED``, and
        a call waiting to retry stops waiting."""
        self._closed.set()
        self._channel.close()

    def _pause(self, seconds: float) -> None:
        """A retry's wait, cut short by ``close``."""
        if self._closed.wait(seconds):
            raise ConversionError("CANCELLED", "the client was closed while the call waited "
                                  "to be retried", kind="failed", code="CANCELLED")

    def convert(self, artifact: str | os.PathLike[str], output: str | os.PathLike[str], *,
                target: Target = "auto", inputs: tuple[TensorSpec, ...] = (),
                declared_format: DeclaredFormat | None = None,
                loading_policy: LoadingPolicy = "allow_code", job_timeout: int = 0,
                progress: Progress | None = None, on_busy: OnBusy | None = None,
                subject: str = "", parity_tolerance: float = 0.0,
                keep_training_state: bool = False,
                sample_input: str | os.PathLike[str] | bytes | None = None,
                idempotency_key: str = "", filename: str = "") -> ConversionResult:
        """Convert ``artifact`` in a sandbox and write the validated model to ``output``.

        Retries only when the service is busy (until the deadline, after the broker's
        estimate of the wait) or unavailable (a bounded number of times), with jitter; the
        same idempotency key is sent on every attempt, so the broker converts at most once.
        ``on_busy`` is called with a ``BusyWait`` (the broker's queue, how long the client
        waits) before each wait for a busy broker; an exception it raises ends the call.
        The client's ``timeout`` (seconds) bounds the whole call, retries included: each
        attempt's gRPC deadline is what is left of it. Raises ``ConversionError``
        when the artifact is rejected or cannot be converted (reason ``BUSY`` when the broker
        stayed full beyond the deadline), ``ServiceUnavailable`` when the
        broker cannot be reached, ``IntegrityError`` when the response is corrupt.

        ``artifact`` may be an MLflow model directory (see :mod:`airlock_client.mlflow_source`
        for ``models:/`` and ``runs:/`` URIs): it is checked (``ModelSourceError`` if it holds
        links, special files or escaping paths), packed into one deterministic zip bundle
        and converted in the sandbox; nothing in it is imported or unpickled here.

        ``subject`` names what the artifact is (``models:/NAME/VERSION``, a path, a URI); the
        broker signs it into the provenance beside the input's sha256 and the caller's
        principal. At most 1024 printable characters (``provenance.escape_subject`` makes any
        name fit), else ``ValueError``.

        ``parity_tolerance`` (``t``): how far the ONNX model's float outputs may differ from
        the original's in the sandbox's parity check, ``|onnx - original| <= t + t *
        |original|``; labels must match exactly. 0 keeps the broker's default (atol 1e-5, rtol
        1e-4); the broker refuses a negative one, NaN or one above 1 (``BAD_REQUEST``). The
        differences measured are in ``result.report.parity`` either way.

        ``keep_training_state``: of a training checkpoint (a Lightning ``.ckpt``,
        ``{"state_dict": ..., "optimizer": ...}``), keep the optimizer state and other
        entries' tensors too, named under the entry's key; by default only the model's state
        dict is converted and the rest is reported in ``result.report.warnings``.

        ``sample_input``: rows of your own for the parity check, instead of the rows the
        sandbox generates: a ``.npy`` file (``numpy.save`` of one numeric array shaped like
        the model's input, e.g. ``[rows, features]``), as a path or its bytes. It is sent as
        bytes and parsed only in the sandbox (``allow_pickle=False``). At most 1 MiB
        (``ValueError`` here, before anything is sent; ``SAMPLE_TOO_LARGE`` from the broker);
        one that does not fit the model's input is refused as ``SAMPLE_INVALID``, with a
        sentence. ``result.report.parity_inputs`` says which rows parity ran on.

        ``idempotency_key``: the key the broker de-duplicates this call by (at most 128
        characters); by default a fresh random one per call. A caller that may repeat the same
        logical conversion from another process (``airlock migrate`` resumed after a crash)
        passes a key derived from what it converts: within the broker's idempotency TTL (600 s
        by default) the repeat is answered with the stored result, ``result.replayed``,
        without a sandbox. The broker refuses the key for other bytes or other options
        (``IDEMPOTENCY_KEY_REUSED``).

        ``filename``: the artifact's name as the broker's audit record shows it; by default
        the last part of ``artifact``'s path (give it when that path names the file by its
        descriptor, ``/proc/self/fd/N``, as ``convert_directory`` does). Without
        ``declared_format``, a name ending in ``.skops`` declares ``skops``
        (:func:`declared_by_name`).
        """
        if len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise ValueError(f"idempotency_key has {len(idempotency_key)} characters; the "
                             f"broker takes at most {MAX_IDEMPOTENCY_KEY}")
        sample = read_sample(sample_input)
        source = Path(artifact)
        if source.is_dir():
            if declared_format not in (None, "mlflow"):
                raise ValueError("a directory can only be declared as an mlflow model")
            model = _bundle.inspect(source)
            with scratch_dir("airlock-bundle") as tmp:
                bundle = tmp / f"{model.root.name or 'model'}.mlflow.zip"
                _bundle.pack(model, bundle)
                return self._convert_file(
                    bundle, output, target=target, inputs=inputs, declared_format="mlflow",
                    loading_policy=loading_policy, job_timeout=job_timeout, progress=progress,
                    filename=model.root.name, on_busy=on_busy, subject=subject,
                    mlflow_flavor=model.flavor_hint,
                    mlflow_serialization=model.serialization_hint,
                    parity_tolerance=parity_tolerance,
                    keep_training_state=keep_training_state, sample_input=sample,
                    idempotency_key=idempotency_key)
        name = filename or source.name
        return self._convert_file(
            source, output, target=target, inputs=inputs,
            declared_format=declared_format or declared_by_name(name),
            loading_policy=loading_policy, job_timeout=job_timeout, progress=progress,
            filename=name, on_busy=on_busy, subject=subject,
            parity_tolerance=parity_tolerance, keep_training_state=keep_training_state,
            sample_input=sample, idempotency_key=idempotency_key)

    def convert_directory(self, source: str | os.PathLike[str],
                          output: str | os.PathLike[str], *, jobs: int | None = None,
                          progress: Callable[[DirectoryProgress], None] | None = None,
                          overwrite: bool = False, loading_policy: LoadingPolicy = "safe_only",
                          job_timeout: int = 0, on_busy: OnBusy | None = None,
                          subject: str = "") -> DirectoryResult:
        """Convert a Hugging Face-style PyTorch model directory (``pytorch_model.bin``, or
        shards named by ``pytorch_model.bin.index.json``) into a safetensors directory: one
        conversion per weights file, ``jobs`` at a time (default: ``default_jobs`` for the
        broker's PyTorch sandboxes), written atomically. ``loading_policy`` is ``safe_only``
        unless told (``model_dir.DIRECTORY_POLICY`` says why). See
        :func:`airlock_client.model_dir.convert_directory` for what is carried over, what is
        refused and what it raises."""
        from airlock_client import model_dir

        return model_dir.convert_directory(
            self, source, output, jobs=jobs,
            progress=progress, overwrite=overwrite,
            loading_policy=loading_policy, job_timeout=job_timeout, on_busy=on_busy,
            subject=subject)

    def convert_many(self, conversions: Iterable[tuple[str | os.PathLike[str],
                                                       str | os.PathLike[str]]], *,
                     jobs: int | None = None,
                     stop: Callable[[Done[tuple[Path, Path], ConversionResult]], bool]
                     | None = None, subject: str | Callable[[Path], str] = "",
                     halt: threading.Event | None = None, **options: Any
                     ) -> Generator[Done[tuple[Path, Path], ConversionResult], None, None]:
        """``convert(artifact, output, **options)`` for each ``(artifact, output)`` pair, at
        most ``jobs`` at once (default: ``default_jobs()``), each in its own sandbox; yields
        each pair's ``batch.Done`` as it finishes, in completion order: its ``result``, or
        the ``error`` its conversion raised (a ``ConversionError`` for one artifact is that
        artifact's outcome, and the others go on). The pairs are taken lazily, so a
        generator of thousands is never listed at once. Ctrl-C (or ``close()`` on the
        generator) starts nothing new and lets the conversions in flight finish, so none is
        left half written; a second Ctrl-C meanwhile closes this client, which cancels
        them (and their broker jobs). A caller that stops iterating early should close it
        (``contextlib.closing``). ``stop``, called with each outcome, ends the batch the same
        way when it returns True (e.g. on ``ServiceUnavailable``: no later artifact would
        fare better); so does ``halt`` once set (a Ctrl-C handler's event), with the outcomes
        of those in flight yielded, and a Ctrl-C after it cancels them at once.
        ``subject``: what each artifact is signed as, one string for all or a function of its
        path. Raises ``ValueError`` for ``jobs`` outside 1..``batch.MAX_CONCURRENCY``.

            with client, contextlib.closing(client.convert_many(pairs)) as batch:
                for done in batch:
                    print(done.item[0], done.result.sha256 if done.ok else done.error)
        """
        from airlock_client.batch import check_concurrency, run_bounded

        def work(pair: tuple[Path, Path]) -> ConversionResult:
            named = subject(pair[0]) if callable(subject) else subject
            return self.convert(pair[0], pair[1], subject=named, **options)

        if jobs is not None:
            check_concurrency(jobs, "jobs")  # now, not on the first next()
        pairs = ((Path(a), Path(o)) for a, o in conversions)
        return run_bounded(pairs, work, concurrency=self.default_jobs() if jobs is None
                           else jobs, stop=stop, halt=halt, abandon=self.close)

    def default_jobs(self, profile: str = _batch_jobs.JOBS_PROFILE) -> int:
        """How many conversions a batch keeps in flight when not told: what the broker runs
        at once, from its pool status (``_batch_jobs.default_jobs``; ``profile``: the pool
        the batch's conversions go to), or ``FALLBACK_JOBS`` when that cannot be read (it
        needs the observe or admin role)."""
        try:
            reply = self._admin_call(self._admin.GetPoolStatus, pb.GetPoolStatusRequest())
        except AirlockError:
            return _batch_jobs.FALLBACK_JOBS
        return _batch_jobs.default_jobs(_pool_statuses(reply), int(reply.max_concurrent_jobs),
                                        profile)

    def _convert_file(self, source: Path, output: str | os.PathLike[str], *, target: Target,
                      inputs: tuple[TensorSpec, ...], declared_format: DeclaredFormat | None,
                      loading_policy: LoadingPolicy, job_timeout: int,
                      progress: Progress | None, filename: str,
                      on_busy: OnBusy | None, subject: str = "",
                      mlflow_flavor: str = "", mlflow_serialization: str = "",
                      parity_tolerance: float = 0.0,
                      keep_training_state: bool = False,
                      sample_input: bytes = b"",
                      idempotency_key: str = "") -> ConversionResult:
        size = source.stat().st_size
        key = idempotency_key or uuid.uuid4().hex
        deadline = time.monotonic() + self.timeout
        schedule = RetrySchedule(self.retry_policy, deadline, on_busy)
        for attempt in schedule.retrying(sleep=self._pause):
            with attempt:
                # No sha256 up front (that would read the file twice): the broker hashes what
                # it receives and the client compares with its own hash of what it sent.
                first = _wire.metadata(
                    size=size, sha256="", target=target, policy=loading_policy,
                    declared=declared_format, inputs=inputs, idempotency_key=key,
                    filename=filename, timeout_seconds=job_timeout, subject=subject,
                    mlflow_flavor=mlflow_flavor, mlflow_serialization=mlflow_serialization,
                    parity_tolerance=parity_tolerance,
                    keep_training_state=keep_training_state,
                    sample_input=sample_input)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConversionError("DEADLINE_EXCEEDED", "the call's deadline passed "
                                          "between retries", kind="failed",
                                          code="DEADLINE_EXCEEDED")
                return self._convert_once(source, Path(output), first, size, progress,
                                          remaining)
        raise AssertionError("unreachable")  # pragma: no cover - tenacity reraises

    def attest_index(self, index: bytes, shards: Sequence[tuple[str, bytes]], *,
                     subject: str = "") -> bytes:
        """The signed provenance of a sharded directory's ``model.safetensors.index.json``:
        ``shards`` are (file name, provenance) for every file it names. The broker checks the
        index against those records; the envelope returned is verified, with the key that
        verifies conversions, to be over exactly ``index`` and to list exactly ``shards``."""
        request = pb.AttestIndexRequest(
            index=index, subject=subject,
            shards=[pb.IndexShard(file_name=n, provenance=p) for n, p in shards])
        reply = self._admin_call(self._stub.AttestIndex, request)
        key, _ = self._verification_key()
        _signed_answer.signed_index(reply.provenance, index, subject, key, shards)
        return bytes(reply.provenance)

    def provenance_key(self) -> ProvenanceKey:
        """The broker's provenance public key, as it publishes it (not a trust anchor)."""
        reply = self._admin_call(self._stub.GetProvenanceKey, pb.GetProvenanceKeyRequest())
        return ProvenanceKey(public_key_pem=reply.public_key_pem, fingerprint=reply.fingerprint,
                             algorithm=reply.algorithm)

    def _verification_key(self) -> tuple[Any, str]:
        """The pinned key (checked before any upload), else the broker's, fetched once."""
        if self._key is None:
            if self._pinned is not None:
                self._key = (load_public_key(self._pinned), "pinned")
            else:
                published = self.provenance_key()
                key = load_public_key(published.public_key_pem.encode())
                if fingerprint(key) != published.fingerprint:
                    raise ProvenanceError("BAD_PUBLIC_KEY",
                                          "the broker's key does not match its own fingerprint")
                self._key = (key, "broker")
        return self._key

    # -- pool operations (operators) --------------------------------------------------------

    def pool_status(self) -> list[PoolStatus]:
        """Warm, busy and starting counts per profile, with failures, image and runtime."""
        return _pool_statuses(self._admin_call(self._admin.GetPoolStatus,
                                               pb.GetPoolStatusRequest()))

    def max_concurrent_jobs(self) -> int:
        """Jobs the broker runs at once, as its pool status says (0: a broker that does not
        say): what a batch of conversions should keep in flight."""
        reply = self._admin_call(self._admin.GetPoolStatus, pb.GetPoolStatusRequest())
        return int(reply.max_concurrent_jobs)

    def restart_pools(self, profile: str | None = None) -> int:
        """Replace every warm container (of one profile); returns how many were replaced."""
        reply = self._admin_call(self._admin.RestartPools,
                                 pb.RestartPoolsRequest(profile=profile or ""))
        return int(reply.replaced)

    def drain_pools(self) -> None:
        """Stop handing out sandboxes: new jobs are refused with UNAVAILABLE until resumed."""
        self._admin_call(self._admin.DrainPools, pb.DrainPoolsRequest())

    def resume_pools(self) -> None:
        self._admin_call(self._admin.ResumePools, pb.ResumePoolsRequest())

    def selftest(self) -> SelfTestReport:
        """Run the broker's isolation probe in a fresh sandbox now and return the checklist."""
        reply = self._admin_call(self._admin.RunSelfTest, pb.RunSelfTestRequest(), timeout=180)
        return SelfTestReport(
            passed=reply.passed, runtime=reply.runtime, image_id=reply.image_id,
            checks=tuple(SelfTestCheck(c.name, c.passed, c.detail, c.source, c.waived)
                         for c in reply.checks))

    def _admin_call(self, method: Any, request: Any, timeout: float = 30) -> Any:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _wire.error_from_rpc(exc) from None

    def _convert_once(self, source: Path, output: Path, first: pb.ConvertRequest, size: int,
                      progress: Progress | None, timeout: float) -> ConversionResult:
        key, key_source = self._verification_key()
        # Opened once, for either way in: a FIFO or device put at the name is refused, never
        # waited on (the name may be in a directory others can write).
        with open_regular(source) as fh:
            if self.local_transfer and os.fstat(fh.fileno()).st_size > 0:
                self.last_transfer = "local"  # also when the job fails: it went the local way
                try:
                    return convert_local(self._stub, self._metadata, fh.fileno(), output,
                                         first, size, progress, timeout, key, key_source)
                except LocalTransferUnavailable as why:
                    if why.not_offered:
                        self.local_transfer = False
                    log.info("same-host fast path not used, streaming instead: %s", why)
            self.last_transfer = "stream"
            sent = hashlib.sha256()
            try:
                responses = self._stub.Convert(_requests(fh, first, size, progress, sent),
                                               timeout=timeout, metadata=self._metadata)
                return _receive(responses, output, first.metadata, sent, key, key_source)
            except grpc.RpcError as exc:
                raise _wire.error_from_rpc(exc) from None


def _pool_statuses(reply: pb.GetPoolStatusResponse) -> list[PoolStatus]:
    return [PoolStatus(
        profile=p.profile, warm=p.warm, busy=p.busy, starting=p.starting,
        failed_starts=p.failed_starts, served_warm=p.served_warm,
        served_cold=p.served_cold, oldest_warm_seconds=p.oldest_warm_seconds,
        image_id=p.image_id, runtime=p.runtime, draining=p.draining,
        unavailable=p.unavailable, importing=p.importing, ready=p.ready)
        for p in reply.pools]


def read_sample(sample: str | os.PathLike[str] | bytes | None) -> bytes:
    """A parity sample's bytes, checked as the broker will check them (size and ``.npy``
    magic, contract.check_sample), or ``ValueError`` with a sentence. Never parsed here."""
    if sample is None:
        return b""
    if isinstance(sample, bytes):
        data = sample
    else:
        try:
            with open_regular(sample) as fh:  # a FIFO is refused, not waited on
                check_sample_size(os.fstat(fh.fileno()).st_size)
                data = fh.read(MAX_SAMPLE_BYTES + 1)  # a file still growing stays bounded
        except OSError as exc:
            raise ValueError(f"cannot read the parity sample {os.fspath(sample)}: "
                             f"{exc.strerror or exc}") from None
    if not data:
        raise ValueError("the parity sample is empty")
    return check_sample(data)


def _requests(fh: BinaryIO, first: pb.ConvertRequest, size: int, progress: Progress | None,
              digest: Any) -> Iterator[pb.ConvertRequest]:
    yield first
    sent = 0
    fh.seek(0)  # from its start, whatever a fast path that was refused did with it
    while block := fh.read(CHUNK_BYTES):
        digest.update(block)
        yield pb.ConvertRequest(chunk=pb.Chunk(data=block, crc32=zlib.crc32(block)))
        sent += len(block)
        if progress is not None:
            progress(sent, size)


def _receive(responses: Iterator[pb.ConvertResponse], output: Path, asked: pb.ConvertMetadata,
             sent: Any, key: Any, key_source: str) -> ConversionResult:
    """Read the result header, then the chunks into a temp file; rename only if all checks pass.

    The result arrives after the whole upload, so ``sent`` (the hash of what this client
    uploaded) is complete by then and must equal the hash of what the broker converted. The
    signed provenance is checked before a byte of output is accepted (it must be of the job
    ``asked`` for, _signed_answer.py), and the received bytes' sha256 (computed while
    receiving) must be the signed one before the rename.
    """
    first = next(responses, None)
    if first is None or first.WhichOneof("payload") != "result":
        raise AirlockError("the broker's response did not start with a result")
    header = first.result
    if header.input_sha256 != sent.hexdigest():
        raise IntegrityError("the broker converted bytes other than the ones sent")
    record = _signed_answer.signed_record(header, asked, key)
    output.parent.mkdir(parents=True, exist_ok=True)
    part = _part_files.new_file(output)
    try:
        digest = hashlib.sha256()
        received = 0
        with os.fdopen(part.fd, "wb") as fh:
            for msg in responses:
                if msg.WhichOneof("payload") != "chunk":
                    raise IntegrityError("unexpected message in the output stream")
                data = msg.chunk.data
                if zlib.crc32(data) != msg.chunk.crc32:
                    raise IntegrityError(f"output chunk at offset {received} fails its CRC-32")
                received += len(data)
                if received > header.output_size:
                    raise IntegrityError("the output stream is longer than announced")
                digest.update(data)
                fh.write(data)
        if received != header.output_size or digest.hexdigest() != header.output_sha256:
            raise IntegrityError("the output does not match the size and sha256 announced")
        check_output(record, sha256=digest.hexdigest(), size=received)
        part.place_file(output)
    finally:
        part.remove()  # unless it was put in place
        part.release()
    return _signed_answer.result(header, record, output, key_source)

"""The client's exception tree: every error this library raises on purpose is an
``AirlockError`` with ``reason`` (a machine-readable code) and ``message`` (a sentence).

::

    AirlockError                 .reason, .message
    ├── ConversionError          the service answered: the artifact was rejected or failed
    │   │ (.kind = "rejected" | "failed" | "denied", .job_id, .code;
    │   │  for BUSY also .retry_after, the broker's estimate of the wait, and .queued)
    │   └── AccessDenied         no valid credentials (UNAUTHENTICATED), or the principal
    │                            lacks the role (PERMISSION_DENIED); kind "denied"
    ├── ServiceUnavailable       the service could not be reached or cannot serve now
    │   └── UntrustedSocket      (_channel.py) the broker's Unix socket could be someone else's
    ├── IntegrityError           the response stream did not match its own checksums
    │   ├── ProvenanceError      (provenance.py) the signed provenance is missing, invalid,
    │   │                        signed by another key, or not for these bytes
    │   └── SafeLoadError        (safe_load.py) a registry version is not a verifiable
    │                            Airlock output
    ├── ModelSourceError         an MLflow model could not be fetched, or its directory (or a
    │                            Hugging Face model directory) was refused before anything
    │                            was sent (links, escapes, caps, a malformed index)
    ├── ModelDirError            (model_dir.py) one shard of a model directory failed
    │                            (.shard, .kind, .cause: that shard's error) or disagrees
    │                            with the index (INDEX_MISMATCH); no output was written
    ├── OutputSwapped            (_part_files.py) a temporary output's name was taken from it
    │                            while it was written (others may write its directory)
    ├── UnsafeTempDir            (_run_dir.py) ``$TMPDIR`` can be written by others and is not
    │                            sticky (UNSAFE_TMPDIR)
    ├── FileSkipped              a directory's file not converted: another failed first
    │                            (``migrate``'s lanes); never the directory's failure
    ├── RegistryError            (_registry.py) the MLflow registry refused a call
    ├── SelectionError           (migrate.py) a named model cannot be migrated
    └── MigrationAborted         (migrate.py) ``migrate`` stopped; ``.outcomes`` so far
"""

from __future__ import annotations


class AirlockError(Exception):
    """Base of every error this library raises on purpose.

    ``reason`` is a code to branch on (each subclass names its default); ``message`` is the
    human sentence. Raised with a reason of its own, the error reads ``"REASON: message"``.
    """

    reason: str = "ERROR"
    message: str

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message if reason is None else f"{reason}: {message}")
        self.message = message
        if reason is not None:
            self.reason = reason


class ConversionError(AirlockError):
    """The broker refused or failed the job; ``reason`` is machine-readable."""

    def __init__(self, reason: str, message: str, *, kind: str, code: str,
                 job_id: str = "", retry_after: float | None = None,
                 queued: int | None = None) -> None:
        super().__init__(message, reason=reason)
        self.kind = kind
        self.code = code
        self.job_id = job_id
        #: Seconds the broker asked to wait before a retry (``google.rpc.RetryInfo``), if any.
        self.retry_after = retry_after
        #: Jobs waiting in the broker when it refused this one (BUSY), if it said.
        self.queued = queued


class AccessDenied(ConversionError):
    """The broker did not accept the credentials, or they lack the role for this call.

    A ``ConversionError`` so existing handlers keep working; never retried.
    """


class ServiceUnavailable(AirlockError):
    """The broker could not be reached, or said it cannot serve right now."""

    reason = "UNAVAILABLE"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)  # reads as the message alone, whatever the reason
        if reason is not None:
            self.reason = reason


class IntegrityError(AirlockError):
    """The output stream contradicted the result header (size, sha256 or chunk CRC)."""

    reason = "INTEGRITY_ERROR"


class ProvenanceError(IntegrityError):
    """Provenance is missing, malformed, not signed by the expected key, not for this file, or
    not from the expected source.

    ``reason`` is one of ``PROVENANCE_MISSING``, ``PROVENANCE_MALFORMED``, ``BAD_PUBLIC_KEY``,
    ``SIGNATURE_INVALID``, ``OUTPUT_MISMATCH``, ``SOURCE_MISMATCH``, ``PRINCIPAL_NOT_ALLOWED``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)


class SafeLoadError(IntegrityError):
    """The version is not a verifiable Airlock output; ``reason`` says which check refused."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)


class FileSkipped(AirlockError):
    """A file of a model directory its client did not convert because another file had
    already failed the directory (``airlock migrate``: a file that waited for one of the
    run's lanes while the other failed). Not a failure of its own: the directory fails with
    the first one's reason, and the skipped file gets no progress line (``model_dir``)."""

    reason = "SKIPPED_AFTER_FAILURE"


#: ``ModelSourceError``'s reason when a ``models:/`` or ``runs:/`` source could not be fetched
#: (the registry's doing, not the model's).
DOWNLOAD_FAILED = "MLFLOW_DOWNLOAD_FAILED"
#: A file larger than it may be: a twin's download past its limit (``ModelSourceError`` from
#: ``_downloads``, ``SafeLoadError`` from ``_twin``).
TOO_LARGE = "TOO_LARGE"
#: A failure on the client's own side (a file it could not read or write), with the
#: operating system's sentence and the file's name.
CLIENT_ERROR = "CLIENT_ERROR"


class ModelSourceError(AirlockError):
    """A model source (an MLflow model, a Hugging Face model directory) was refused or could
    not be fetched; nothing was uploaded.

    ``reason`` is ``UNSAFE_MODEL_DIR`` (a link, special file, escaping path, bad ``MLmodel``
    or a cap exceeded), ``NOT_A_MODEL_DIR``, ``MODEL_INDEX_INVALID`` (a
    ``pytorch_model.bin.index.json`` that is not strict JSON, too large, or names a file that
    is not there) or ``MLFLOW_DOWNLOAD_FAILED``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)

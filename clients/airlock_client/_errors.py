"""The client's exception tree.

::

    AirlockError                 anything this library raises on purpose
    ├── ConversionError          the service answered: the artifact was rejected or failed
    │   │ (.reason, .kind = "rejected" | "failed" | "denied", .message, .job_id, .code;
    │   │  for BUSY also .retry_after, the broker's estimate of the wait, and .queued)
    │   └── AccessDenied         no valid credentials (UNAUTHENTICATED), or the principal
    │                            lacks the role (PERMISSION_DENIED); kind "denied"
    ├── ServiceUnavailable       the service could not be reached or cannot serve now
    ├── IntegrityError           the response stream did not match its own checksums
    │   ├── ProvenanceError      (provenance.py) the signed provenance is missing, invalid,
    │   │                        signed by another key, or not for these bytes (.reason)
    │   └── SafeLoadError        (safe_load.py) a registry version is not a verifiable
    │                            Airlock output (.reason)
    └── ModelSourceError         an MLflow model could not be fetched, or its directory was
        (.reason, .message)      refused before anything was sent (links, escapes, caps)
"""

from __future__ import annotations


class AirlockError(Exception):
    """Base of every error this library raises on purpose."""


class ConversionError(AirlockError):
    """The broker refused or failed the job; ``reason`` is machine-readable."""

    def __init__(self, reason: str, message: str, *, kind: str, code: str,
                 job_id: str = "", retry_after: float | None = None,
                 queued: int | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
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

    def __init__(self, message: str, *, reason: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class IntegrityError(AirlockError):
    """The output stream contradicted the result header (size, sha256 or chunk CRC)."""

    reason = "INTEGRITY_ERROR"


class ModelSourceError(AirlockError):
    """An MLflow model source was refused or could not be fetched; nothing was uploaded.

    ``reason`` is ``UNSAFE_MODEL_DIR`` (a link, special file, escaping path, bad ``MLmodel``
    or a cap exceeded), ``NOT_A_MODEL_DIR`` or ``MLFLOW_DOWNLOAD_FAILED``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

"""Reasons, the broker's one exception tree, and the table that maps them to gRPC status.

::

    AirlockError                      every failure the broker reports to a caller
    ├── Rejected                      the artifact (or its output) was refused by a check
    ├── Failed                        it could not be converted, or the service could not try
    └── Denied                        the caller is not authenticated, or lacks the role

Misbehaving artifacts are *outcomes* (a reason plus a message), never crashes; only broken
infrastructure (Docker down, image missing) and our own bugs surface as UNAVAILABLE / INTERNAL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc


class Reason(enum.StrEnum):
    # The request itself.
    BAD_REQUEST = "BAD_REQUEST"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    TOO_LARGE = "TOO_LARGE"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    EMPTY_ARTIFACT = "EMPTY_ARTIFACT"
    # The caller's parity sample (contract.check_sample; the worker's SAMPLE_INVALID).
    SAMPLE_TOO_LARGE = "SAMPLE_TOO_LARGE"
    SAMPLE_INVALID = "SAMPLE_INVALID"
    # The artifact.
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    FORMAT_MISMATCH = "FORMAT_MISMATCH"
    POLICY_VIOLATION = "POLICY_VIOLATION"
    UNSUPPORTED_MODEL = "UNSUPPORTED_MODEL"
    INPUT_SPEC_REQUIRED = "INPUT_SPEC_REQUIRED"
    CONVERSION_FAILED = "CONVERSION_FAILED"
    PARITY_FAILED = "PARITY_FAILED"
    SANDBOX_TIMEOUT = "SANDBOX_TIMEOUT"
    SANDBOX_OOM = "SANDBOX_OOM"
    OUTPUT_INVALID = "OUTPUT_INVALID"
    OUTPUT_TOO_LARGE = "OUTPUT_TOO_LARGE"
    INTEGRITY_MISMATCH = "INTEGRITY_MISMATCH"
    UNSUPPORTED_FLAVOR = "UNSUPPORTED_FLAVOR"
    UNSAFE_MODEL_DIR = "UNSAFE_MODEL_DIR"
    # A directory's index against its shards' records (index_attestation.py).
    INDEX_MISMATCH = "INDEX_MISMATCH"
    # The service.
    BUSY = "BUSY"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    SANDBOX_UNAVAILABLE = "SANDBOX_UNAVAILABLE"
    SANDBOX_KILLED = "SANDBOX_KILLED"
    INTERNAL = "INTERNAL"
    # The upload (upload_limits.py, spool_space.py).
    UPLOAD_TOO_SLOW = "UPLOAD_TOO_SLOW"
    SPOOL_FULL = "SPOOL_FULL"
    # The same-host fast path (local_transfer.py).
    LOCAL_TRANSFER_DISABLED = "LOCAL_TRANSFER_DISABLED"
    LOCAL_HANDLE_INVALID = "LOCAL_HANDLE_INVALID"
    LOCAL_HANDLE_FOREIGN = "LOCAL_HANDLE_FOREIGN"
    LOCAL_FD_REFUSED = "LOCAL_FD_REFUSED"
    LOCAL_WRITE_FAILED = "LOCAL_WRITE_FAILED"
    # The caller (auth.py).
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


class Kind(enum.Enum):
    """How a client should read a failure (the CLI's ``status`` field)."""

    REJECTED = "rejected"  # a check refused the artifact or its output
    FAILED = "failed"  # conversion or the service failed
    DENIED = "denied"  # the caller has no valid credentials or lacks the role


#: reason -> (gRPC status, kind). A unit test proves every Reason has a row.
STATUS_TABLE: dict[Reason, tuple[grpc.StatusCode, Kind]] = {
    Reason.BAD_REQUEST: (grpc.StatusCode.INVALID_ARGUMENT, Kind.REJECTED),
    Reason.CHECKSUM_MISMATCH: (grpc.StatusCode.DATA_LOSS, Kind.REJECTED),
    Reason.TOO_LARGE: (grpc.StatusCode.INVALID_ARGUMENT, Kind.REJECTED),
    Reason.EMPTY_ARTIFACT: (grpc.StatusCode.INVALID_ARGUMENT, Kind.REJECTED),
    Reason.SAMPLE_TOO_LARGE: (grpc.StatusCode.INVALID_ARGUMENT, Kind.REJECTED),
    # Decided by the sandbox (its exit code), which the artifact may control: a rejection
    # the client never retries, like every exit reason.
    Reason.SAMPLE_INVALID: (grpc.StatusCode.INVALID_ARGUMENT, Kind.REJECTED),
    # The key was first used for another artifact or other options: a client bug, not transient.
    Reason.IDEMPOTENCY_KEY_REUSED: (grpc.StatusCode.INVALID_ARGUMENT, Kind.REJECTED),
    Reason.UNSUPPORTED_FORMAT: (grpc.StatusCode.INVALID_ARGUMENT, Kind.REJECTED),
    Reason.FORMAT_MISMATCH: (grpc.StatusCode.INVALID_ARGUMENT, Kind.REJECTED),
    Reason.POLICY_VIOLATION: (grpc.StatusCode.FAILED_PRECONDITION, Kind.REJECTED),
    Reason.UNSUPPORTED_MODEL: (grpc.StatusCode.FAILED_PRECONDITION, Kind.REJECTED),
    Reason.INPUT_SPEC_REQUIRED: (grpc.StatusCode.INVALID_ARGUMENT, Kind.REJECTED),
    Reason.CONVERSION_FAILED: (grpc.StatusCode.FAILED_PRECONDITION, Kind.FAILED),
    Reason.PARITY_FAILED: (grpc.StatusCode.FAILED_PRECONDITION, Kind.FAILED),
    Reason.SANDBOX_TIMEOUT: (grpc.StatusCode.DEADLINE_EXCEEDED, Kind.FAILED),
    Reason.SANDBOX_OOM: (grpc.StatusCode.FAILED_PRECONDITION, Kind.FAILED),
    Reason.OUTPUT_INVALID: (grpc.StatusCode.FAILED_PRECONDITION, Kind.REJECTED),
    Reason.OUTPUT_TOO_LARGE: (grpc.StatusCode.FAILED_PRECONDITION, Kind.REJECTED),
    Reason.INTEGRITY_MISMATCH: (grpc.StatusCode.FAILED_PRECONDITION, Kind.REJECTED),
    Reason.UNSUPPORTED_FLAVOR: (grpc.StatusCode.FAILED_PRECONDITION, Kind.REJECTED),
    Reason.UNSAFE_MODEL_DIR: (grpc.StatusCode.INVALID_ARGUMENT, Kind.REJECTED),
    Reason.INDEX_MISMATCH: (grpc.StatusCode.INVALID_ARGUMENT, Kind.REJECTED),
    Reason.BUSY: (grpc.StatusCode.RESOURCE_EXHAUSTED, Kind.FAILED),
    Reason.DEADLINE_EXCEEDED: (grpc.StatusCode.DEADLINE_EXCEEDED, Kind.FAILED),
    Reason.CANCELLED: (grpc.StatusCode.CANCELLED, Kind.FAILED),
    Reason.SANDBOX_UNAVAILABLE: (grpc.StatusCode.UNAVAILABLE, Kind.FAILED),
    # Killed by a signal the broker did not send (an operator, the kernel, or the artifact
    # itself): ABORTED, so clients do not retry blindly a job that may kill itself every time.
    Reason.SANDBOX_KILLED: (grpc.StatusCode.ABORTED, Kind.FAILED),
    Reason.INTERNAL: (grpc.StatusCode.INTERNAL, Kind.FAILED),
    # Below the minimum rate after the grace period, or past the upload's total deadline.
    Reason.UPLOAD_TOO_SLOW: (grpc.StatusCode.DEADLINE_EXCEEDED, Kind.FAILED),
    # The spool's filesystem would fall below its free-space reserve. Not retried by the
    # client: space frees up when other jobs end, or only when an operator acts.
    Reason.SPOOL_FULL: (grpc.StatusCode.RESOURCE_EXHAUSTED, Kind.FAILED),
    # The broker does not offer the fast path: the client streams instead.
    Reason.LOCAL_TRANSFER_DISABLED: (grpc.StatusCode.FAILED_PRECONDITION, Kind.FAILED),
    # Unknown, expired, already used, or never given its descriptors.
    Reason.LOCAL_HANDLE_INVALID: (grpc.StatusCode.FAILED_PRECONDITION, Kind.REJECTED),
    # Issued to another principal: never usable by this one.
    Reason.LOCAL_HANDLE_FOREIGN: (grpc.StatusCode.PERMISSION_DENIED, Kind.DENIED),
    # A descriptor (or the message carrying them) is not what the fast path accepts.
    Reason.LOCAL_FD_REFUSED: (grpc.StatusCode.INVALID_ARGUMENT, Kind.REJECTED),
    # Writing the output into the caller's own file failed (its filesystem is full, or the
    # file went read-only): the conversion itself succeeded; the caller's side must change.
    Reason.LOCAL_WRITE_FAILED: (grpc.StatusCode.FAILED_PRECONDITION, Kind.FAILED),
    Reason.UNAUTHENTICATED: (grpc.StatusCode.UNAUTHENTICATED, Kind.DENIED),
    Reason.PERMISSION_DENIED: (grpc.StatusCode.PERMISSION_DENIED, Kind.DENIED),
}

ERROR_DOMAIN = "airlock.v1"


@dataclass(frozen=True)
class RetryAfter:
    """When a refused caller should try again (sent as ``google.rpc.RetryInfo``), and the
    queue the broker saw (so that a client can say what it waits for)."""

    seconds: float
    queued: int


class AirlockError(Exception):
    """A failure with a machine-readable reason and a human message."""

    def __init__(self, reason: Reason, message: str, *,
                 retry_after: RetryAfter | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.retry_after = retry_after

    @property
    def status(self) -> grpc.StatusCode:
        return STATUS_TABLE[self.reason][0]

    @property
    def kind(self) -> Kind:
        return STATUS_TABLE[self.reason][1]


class Rejected(AirlockError):
    """A check refused the artifact or what the sandbox produced from it."""


class Failed(AirlockError):
    """The conversion, or the service, failed."""


class Denied(AirlockError):
    """The caller presented no valid credentials, or its principal lacks the role."""


_CLASSES: dict[Kind, type[AirlockError]] = {
    Kind.REJECTED: Rejected, Kind.FAILED: Failed, Kind.DENIED: Denied}


def error(reason: Reason, message: str, *,
          retry_after: RetryAfter | None = None) -> AirlockError:
    """Build the exception of the right class for ``reason``."""
    return _CLASSES[STATUS_TABLE[reason][1]](reason, message, retry_after=retry_after)

"""Plain, typed values of the client's public API (no protobuf types leak out)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

#: A call's deadline unless the caller gives one (``Client(timeout=...)``): the wait for a
#: place, the upload, the job's sandboxes and the answer together.
CALL_SECONDS = 900.0

if TYPE_CHECKING:  # the record's module needs cryptography; these values do not
    from airlock_client.provenance import ProvenanceRecord

Target = Literal["auto", "onnx", "safetensors"]
LoadingPolicy = Literal["allow_code", "safe_only"]
#: ``json``, ``text`` and ``sentencepiece`` name a model directory's data files
#: (``config.json``, tokenizer files), which are checked and carried unchanged.
DeclaredFormat = Literal["pickle", "cloudpickle", "joblib", "pytorch", "torchscript",
                         "torch_export", "numpy", "onnx", "safetensors", "mlflow",
                         "json", "text", "sentencepiece", "skops"]


class Assurance(enum.StrEnum):
    """What the broker vouches for in a converted file (``ConversionResult.assurance``).

    A ``str``: it compares equal to, and prints as, the value the signed provenance records.
    """

    #: The file is valid and code-free, but the artifact ran code in the sandbox, so its
    #: weights are not proven to be the author's.
    FORMAT_SAFE_ONLY = "format_safe_only"
    #: A second sandbox read the weights without running the artifact's code and found the
    #: same ones: they are the author's.
    INTEGRITY_VERIFIED = "integrity_verified"
    #: The broker named no assurance this client knows (a newer broker).
    UNSPECIFIED = "unspecified"


@dataclass(frozen=True)
class TensorSpec:
    """One model input. ``-1`` in ``shape`` marks a free dimension, e.g. the batch."""

    name: str = ""
    dtype: str = "float32"
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class ParityCheck:
    """One output of the converted model against the original's, in the sandbox: the largest
    absolute and relative differences over ``samples`` rows, and the tolerance they met."""

    output_name: str
    samples: int
    max_abs_diff: float
    tolerance: str
    passed: bool
    #: ``max |onnx - original| / |original|`` where the original is not zero.
    max_rel_diff: float = 0.0


@dataclass(frozen=True)
class ConversionReport:
    """What the sandbox said about its work: informational, never a security verdict."""

    loader: str = ""
    converter: str = ""
    executed_artifact_code: bool = False
    parity: tuple[ParityCheck, ...] = ()
    warnings: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    inputs: tuple[TensorSpec, ...] = ()
    tensor_count: int = 0
    #: Which rows parity ran on: "sample" (the caller's ``sample_input``), or
    #: "input_example" (an MLflow model's) and/or "generated", joined by "+"; "" if none.
    parity_inputs: str = ""


@dataclass(frozen=True)
class ConversionResult:
    """A converted, broker-validated model, written to ``output``."""

    job_id: str
    output: Path
    #: ``data``: a data file, carried unchanged (declared json, text or sentencepiece).
    format: Literal["onnx", "safetensors", "data"]
    sha256: str
    size: int
    input_sha256: str
    input_size: int
    detected_format: str
    #: What the broker vouches for (see ``Assurance``).
    assurance: Assurance
    loading_policy: LoadingPolicy
    duration_seconds: float
    image_id: str
    runtime: str
    report: ConversionReport
    #: Why ``assurance`` is what it is (e.g. why integrity could not be verified).
    integrity_note: str = ""
    #: The signed provenance (a model-signing bundle, JSON) exactly as received; verified.
    provenance: bytes = b""
    #: What the verified provenance says.
    provenance_record: ProvenanceRecord | None = None
    #: "pinned": verified with the key the caller gave; "broker": with the key the broker
    #: published over the same channel (trust on first use).
    provenance_key_source: str = ""
    #: The broker answered a retry with the stored result of the first attempt (same
    #: idempotency key; ``job_id`` is that attempt's job): nothing was converted twice.
    replayed: bool = False
    #: How the bytes travelled: "stream" (gRPC chunks) or "local" (the same-host fast path:
    #: descriptors on the broker's socket).
    transfer: str = ""


@dataclass(frozen=True)
class ProvenanceKey:
    """The broker's provenance public key as it publishes it."""

    public_key_pem: str
    fingerprint: str
    algorithm: str


@dataclass(frozen=True)
class PoolStatus:
    """One warm pool as the broker sees it (counters since the broker started)."""

    profile: str
    warm: int
    busy: int
    starting: int
    failed_starts: int
    served_warm: int
    served_cold: int
    oldest_warm_seconds: float
    image_id: str
    runtime: str
    draining: bool
    #: Why no sandbox can be started now (the engine is unreachable), or "".
    unavailable: str = ""
    #: Of ``warm``: still importing their libraries, and warmed up (waiting for a job), as
    #: the sandboxes say (a hint). A broker older than these counts reports 0 and 0.
    importing: int = 0
    ready: int = 0


@dataclass(frozen=True)
class SelfTestCheck:
    name: str
    passed: bool
    detail: str
    source: str  # "sandbox" (observed inside the probe), "config" (read from the engine), "host"
    waived: str = ""  # why a failed check is accepted on this runtime


@dataclass(frozen=True)
class SelfTestReport:
    passed: bool
    checks: tuple[SelfTestCheck, ...]
    runtime: str
    image_id: str


@dataclass(frozen=True)
class BusyWait:
    """The broker was full: the client waits before trying again (``Client.convert``'s
    ``on_busy`` is given one of these before each wait)."""

    #: Jobs waiting in the broker when it refused this one (None: it did not say).
    queued: int | None
    #: The broker's estimate of the wait, in seconds (None: it gave none).
    retry_after: float | None
    #: How long the client waits now: at least the estimate, never past the call's deadline.
    seconds: float
    #: Attempts made so far.
    attempt: int
    #: The broker's message (untrusted text: escape it before showing it on a terminal).
    message: str

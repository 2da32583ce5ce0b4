"""The contract between the broker and the in-container worker, written once as constants.

The broker mounts a fresh job directory into every container:

* ``IN_DIR`` (read-only bind): the artifact as ``ARTIFACT_NAME``, the caller's parity sample
  as ``SAMPLE_NAME`` when there is one, and the job spec as ``JOB_SPEC_NAME``. A warm
  container waits until the job spec appears (the broker writes it last, atomically by
  rename), so the same layout serves cold and warm starts.
* ``OUT_DIR`` (a size-capped ``noexec,nosuid,nodev`` tmpfs owned by the broker): the worker
  writes exactly one output file named by ``OUTPUT_NAMES`` and, for information only, a
  ``REPORT_NAME`` JSON document.

The broker decides the outcome from the exit code, its own timers and limits, and its own
validation of the output file; the report is never trusted (DESIGN §1.4).
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from airlock_sandbox.formats import ArtifactFormat

IN_DIR = "/airlock/in"
OUT_DIR = "/airlock/out"
ARTIFACT_NAME = "artifact"
JOB_SPEC_NAME = "job.json"
#: The caller's parity sample (``--sample-input``): a ``.npy`` file, bytes the broker never
#: parses beyond ``check_sample`` (its size and magic); the worker reads it with
#: ``numpy.load(allow_pickle=False)``.
SAMPLE_NAME = "sample.npy"
REPORT_NAME = "report.json"
#: Renamed into OUT_DIR, after the report, by a worker that succeeded and now waits to be
#: frozen (``JobSpec.linger_seconds``); the broker removes it before it reads the output.
DONE_NAME = "worker.done"
#: Renamed into OUT_DIR by a worker that has imported its profile and primed it, before it
#: waits for its job spec. A hint for pool status and sizing only (the broker reads that it
#: exists, nothing else, and removes it before it reads the output); a worker that never
#: writes it serves jobs all the same.
READY_NAME = "worker.ready"

#: What a checkpoint's reading reports as a refused global for a tensor that carries
#: attributes: torch.load applies them with this function of its own, which the reading does
#: not model. It sends the reading to the comparison; it names no code of the artifact's.
TENSOR_ATTRIBUTES_GLOBAL = "torch._utils._set_obj_state"

#: The same for an ``OrderedDict`` whose pickle sets attributes on it other than a state
#: dict's ``_metadata``: torch's ``weights_only`` loader puts them in its ``__dict__``, where
#: ``items``, ``keys`` or ``get`` shadow the methods the converter (and every consumer) calls,
#: so torch's dict may list other tensors than the reading's. It names no code either.
DICT_ATTRIBUTES_GLOBAL = "collections.OrderedDict.__dict__"

#: The refused globals above that stand for what torch sets, not for code of the artifact's.
ATTRIBUTE_GLOBALS = frozenset({TENSOR_ATTRIBUTES_GLOBAL, DICT_ATTRIBUTES_GLOBAL})

#: The worker waits this long at most for the job spec of a warm container.
WARM_WAIT_SECONDS = 3600

#: How often a warm worker without a doorbell (below) looks for its job spec. There is no
#: inotify in the sandbox (gVisor does not see the host's changes), so it polls: every
#: ``SPEC_POLL_SECONDS`` for its first ``SPEC_POLL_FAST_SECONDS`` (a burst takes containers as
#: soon as they are ready), then every ``--idle-poll-ms`` (the broker's choice,
#: ``IDLE_POLL_MS``). One look is a failed open: 0.4 % of a core at 5 ms under runc (4 ms of
#: CPU a second, measured from the container's cgroup), but 13 % under runsc, where each is a
#: trip through the sentry (host CPU of an idle container's runsc processes over 10 s; 6 % at
#: 25 ms, 4 % at 50 ms). An idle container's job therefore waits up to the idle interval
#: longer.
SPEC_POLL_SECONDS = 0.005
SPEC_POLL_FAST_SECONDS = 2.0
#: The idle interval per runtime family (milliseconds); the fast one where none is named.
IDLE_POLL_MS = {"runsc": 50}

#: Where the runtime lets a host FIFO through (runc: the bind mount is the host's inode), the
#: broker makes this one in the input directory (0444, its own) and writes a byte to it once
#: the job spec is in place. The worker opens it for reading, without blocking, and sleeps in
#: ``poll`` on it instead of looking for the spec every ``SPEC_POLL_SECONDS``: a waiting
#: container then wakes once a ``DOORBELL_FALLBACK_SECONDS`` rather than 200 times a second
#: (measured under runc on this project's machine: 1 ms of CPU in 10 s against 41 ms; 588
#: wake-ups in 3 s against at most 10, tests/integration/test_doorbell.py), and its job
#: starts when the spec arrives, not up to a poll later. No system call is added to
#: the sandbox's filter (``open`` and ``poll`` are there). Under runsc the gofer does not
#: pass a host FIFO through, so the worker polls as before; so does any worker that finds no
#: bell, or one it cannot open.
DOORBELL_NAME = "job.bell"
DOORBELL_RUNTIME_FAMILIES = frozenset({"runc"})
#: A worker waiting at its bell still looks for the spec this often (a bell that never rang).
DOORBELL_FALLBACK_SECONDS = 1.0

#: Upper bound on the report the broker is willing to read (it is informational only).
MAX_REPORT_BYTES = 256 * 1024
#: What a caller is shown of the report's warnings: at most this many (the worker's last one
#: then says that more were left out), each at most this many characters. The worker keeps
#: to it (airlock_worker/report.py) and the broker cuts to it (api/claims.py).
REPORT_WARNINGS = 16
REPORT_WARNING_CHARS = 300
#: Upper bound on a job spec; the broker writes it, the worker refuses anything larger.
MAX_JOB_SPEC_BYTES = 64 * 1024

#: A caller's parity tolerance (both atol and rtol of ``|onnx - ref| <= atol + rtol*|ref|``)
#: is at most this: beyond 1 a difference as large as the value itself passes, which is no
#: check. 0 means the worker's default (atol 1e-5, rtol 1e-4).
MAX_PARITY_TOLERANCE = 1.0

#: A parity sample is a few thousand rows, not a data set: 1 MiB holds 6,500 rows of 20
#: float64 features, and it travels inside the request's first message (the metadata), so it
#: must stay well under gRPC's 4 MiB message limit beside everything else there.
MAX_SAMPLE_BYTES = 1024 * 1024
#: The first bytes of every ``.npy`` file (numpy.lib.format.MAGIC_PREFIX): a ``.npz`` (a zip)
#: or a pickle is refused before it travels further.
NPY_MAGIC = b"\x93NUMPY"

CONTAINER_UID = 10001
CONTAINER_GID = 10001
#: The image's ``USER`` (sandbox/image/Dockerfile) and the policy's default user: unprivileged,
#: with a group of its own (no host account may have either id, sandbox_ids.py).
CONTAINER_USER = f"{CONTAINER_UID}:{CONTAINER_GID}"
#: The image's ``ENTRYPOINT`` (sandbox/image/Dockerfile): every sandbox runs the worker, and
#: the broker sends only its arguments (``--profile ...``, ``--selftest``). The image build
#: (image_config.py) and the self-test (``worker_entrypoint``) refuse anything else, since an
#: image's entrypoint is what each of its containers runs unless the create request says other.
WORKER_ENTRYPOINT = ("python3", "-m", "airlock_worker")


class OutputFormat(enum.StrEnum):
    ONNX = "onnx"
    SAFETENSORS = "safetensors"
    #: A data file (airlock_sandbox.data_files), checked and written unchanged.
    DATA = "data"


OUTPUT_NAMES: dict[OutputFormat, str] = {
    OutputFormat.ONNX: "model.onnx",
    OutputFormat.SAFETENSORS: "model.safetensors",
    OutputFormat.DATA: "data",
}
#: What a model conversion may leave: a data job's output is never one of them (outputs.py).
MODEL_OUTPUTS = (OutputFormat.ONNX, OutputFormat.SAFETENSORS)


class Target(enum.StrEnum):
    AUTO = "auto"
    ONNX = "onnx"
    SAFETENSORS = "safetensors"
    #: The data file itself, checked (a data file's only target; AUTO means it too).
    DATA = "data"


class LoadingPolicy(enum.StrEnum):
    #: Default: loaders that execute pickled code may run, because they run in the sandbox.
    #: Whether they did is recorded in the result and the audit log.
    ALLOW_CODE = "allow_code"
    #: Only loaders that never execute artifact code (safetensors, ONNX, numpy without
    #: pickle, ``torch.load(weights_only=True)``); anything else is refused.
    SAFE_ONLY = "safe_only"


class JobMode(enum.StrEnum):
    #: Load the artifact (safe loaders first, then as the policy allows) and convert it.
    CONVERT = "convert"
    #: Integrity check for PyTorch zip checkpoints: read the tensors straight from the zip
    #: with a pickle reader that only accepts tensor-rebuild globals and never calls anything
    #: the artifact names; write them as safetensors with the same naming as CONVERT. The
    #: broker compares both outputs byte for byte (DESIGN §5).
    EXTRACT_WEIGHTS = "extract_weights"


class WorkerExit(enum.IntEnum):
    """Exit codes of the worker. 1 (an uncaught Python exception) means conversion failed."""

    OK = 0
    UNCAUGHT = 1
    BAD_JOB_SPEC = 64
    UNSUPPORTED_FORMAT = 65
    FORMAT_MISMATCH = 66
    POLICY_VIOLATION = 67
    UNSUPPORTED_MODEL = 68
    INPUT_SPEC_REQUIRED = 69
    CONVERSION_FAILED = 70
    PARITY_FAILED = 71
    OUTPUT_TOO_LARGE = 72
    #: An MLflow model whose flavor has no converter (an arbitrary PythonModel, an unknown
    #: loader_module): refused without importing or unpickling anything of it.
    UNSUPPORTED_FLAVOR = 73
    #: An MLflow bundle that fails the re-check (traversal, links, duplicates, caps, MLmodel).
    UNSAFE_MODEL_DIR = 74
    #: The caller's parity sample does not fit the model (not a numeric ``.npy``, another
    #: number of features, another kind of number): the caller's doing, said in a sentence.
    SAMPLE_INVALID = 75


def check_parity_tolerance(value: float) -> float:
    """A caller's parity tolerance, or ``ValueError`` with a sentence saying what is allowed."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"the parity tolerance must be a number, not {str(value)[:20]}")
    if not 0.0 <= value <= MAX_PARITY_TOLERANCE:
        raise ValueError(f"the parity tolerance is {value:g}; it must be between 0 (the "
                         f"default, atol 1e-05 and rtol 0.0001) and {MAX_PARITY_TOLERANCE:g}")
    return float(value)


def check_sample(data: bytes) -> bytes:
    """A caller's parity sample as far as anyone but the worker may look: its size and its
    magic. ``ValueError`` with a sentence otherwise (``SampleTooLarge`` for the size)."""
    check_sample_size(len(data))
    if not data.startswith(NPY_MAGIC):
        raise ValueError("the parity sample is not a .npy file (numpy.save of one array); "
                         ".npz archives and pickles are not accepted")
    return data


def check_sample_size(size: int) -> None:
    """``SampleTooLarge`` for a parity sample of ``size`` bytes beyond ``MAX_SAMPLE_BYTES``."""
    if size > MAX_SAMPLE_BYTES:
        raise SampleTooLarge(f"the parity sample is {size} bytes; at most {MAX_SAMPLE_BYTES} "
                             f"bytes ({MAX_SAMPLE_BYTES // 1024} KiB) are allowed: send fewer "
                             "rows")


class SampleTooLarge(ValueError):
    """A parity sample beyond ``MAX_SAMPLE_BYTES``."""


@dataclass(frozen=True)
class TensorSpec:
    """One model input: name, numpy dtype name, shape (``-1`` or ``None`` marks a free dim)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


#: The dtype of an input a caller described without one.
DEFAULT_INPUT_DTYPE = "float32"
#: How many inputs a request may describe, and a result report, and how many dims each.
MAX_INPUTS = 64
MAX_DIMS = 8


def input_name(name: str, index: int, count: int) -> str:
    """The name of input ``index`` of ``count`` a caller described: its own, else ``input``
    (the only one) or ``input_INDEX``. The broker records it so, and a client compares so."""
    return name or ("input" if count == 1 else f"input_{index}")


@dataclass(frozen=True)
class JobSpec:
    """What the broker asks of the worker. Serialised as JSON into ``IN_DIR/JOB_SPEC_NAME``."""

    job_id: str
    #: What the broker decided the artifact is (format_decision, from its leading bytes and
    #: the declaration). The worker checks the bytes agree (``formats.candidates``) and
    #: refuses a job without it; only the self-test probe, which reads no artifact, has none.
    artifact_format: ArtifactFormat | None = None
    target: Target = Target.AUTO
    policy: LoadingPolicy = LoadingPolicy.ALLOW_CODE
    declared_format: str | None = None
    inputs: tuple[TensorSpec, ...] = field(default_factory=tuple)
    max_output_bytes: int = 2 * 1024**3
    mode: JobMode = JobMode.CONVERT
    #: The caller's word on an MLflow bundle's flavor (airlock_sandbox.bundle): it chose the
    #: profile; the worker refuses a bundle whose ``MLmodel`` says otherwise.
    mlflow_flavor: str | None = None
    #: After a successful job, how long the worker waits before it exits: the broker freezes
    #: it in that time instead of waiting for its slow death (broker: sandboxes/freezer.py).
    #: 0: exit at once.
    linger_seconds: float = 0.0
    #: The caller's parity tolerance (check_parity_tolerance); 0: the worker's default.
    parity_tolerance: float = 0.0
    #: A training checkpoint's other entries (optimizer state, ...) are kept, their tensors
    #: named under the entry's key; by default only the model's state dict is converted.
    keep_training_state: bool = False
    #: Whether the broker put the caller's parity sample in ``IN_DIR/SAMPLE_NAME``: parity then
    #: runs on it instead of on generated inputs.
    sample_input: bool = False
    #: For the integrity reading of a checkpoint (``EXTRACT_WEIGHTS``) whose output is on
    #: disk: write the safetensors header with the data section left a hole, and report the
    #: data section's sha256 (``data_sha256`` in the report) instead of its bytes. The broker
    #: compares that digest with the conversion's data section: no second N bytes on disk.
    data_digest_only: bool = False
    #: After writing a safetensors output, map it and compare it with the tensors meant (the
    #: worker's own check of the writer, airlock_worker.st_verify). The broker turns it off for
    #: a conversion whose integrity reading runs beside it: the broker compares the two outputs
    #: (their bytes, or their data's digests), which catches the same writer bugs; the check
    #: cost S3 130 ms of 270. Not a security control: the artifact's code controls this process.
    read_back: bool = True
    #: The integrity reading's safetensors output already exists, empty, made by the broker
    #: and marked append-only (a tmpfs output under runc): write it in place, from its first
    #: byte to its last, never through another name. The broker hashes it as it grows, so the
    #: hash ends with the writing instead of starting after it; bytes once written cannot
    #: change (the kernel refuses rewriting, truncating and mapping an append-only file).
    output_in_place: bool = False

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["inputs"] = [asdict(t) for t in self.inputs]
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> JobSpec:
        if len(raw) > MAX_JOB_SPEC_BYTES:
            raise ValueError("job spec too large")
        doc: dict[str, Any] = json.loads(raw)
        inputs = tuple(
            TensorSpec(name=str(t["name"]), dtype=str(t["dtype"]),
                       shape=tuple(int(d) for d in t["shape"]))
            for t in doc.get("inputs", [])
        )
        declared = doc.get("declared_format")
        flavor = doc.get("mlflow_flavor")
        decided = doc.get("artifact_format")
        return cls(
            job_id=str(doc["job_id"]),
            artifact_format=None if decided is None else ArtifactFormat(decided),
            target=Target(doc.get("target", Target.AUTO)),
            policy=LoadingPolicy(doc.get("policy", LoadingPolicy.ALLOW_CODE)),
            declared_format=None if declared is None else str(declared),
            inputs=inputs,
            max_output_bytes=int(doc.get("max_output_bytes", 2 * 1024**3)),
            mode=JobMode(doc.get("mode", JobMode.CONVERT)),
            mlflow_flavor=None if flavor is None else str(flavor),
            linger_seconds=min(max(float(doc.get("linger_seconds", 0.0)), 0.0), 60.0),
            parity_tolerance=check_parity_tolerance(float(doc.get("parity_tolerance", 0.0))),
            keep_training_state=doc.get("keep_training_state") is True,
            sample_input=doc.get("sample_input") is True,
            data_digest_only=doc.get("data_digest_only") is True,
            read_back=doc.get("read_back") is not False,
            output_in_place=doc.get("output_in_place") is True,
        )

"""One job: the context every converter works in (spec, paths, the policy gate, the report,
the output writers) and the table from detected format to converter."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from airlock_sandbox.contract import (
    ARTIFACT_NAME,
    SAMPLE_NAME,
    JobMode,
    JobSpec,
    LoadingPolicy,
    OutputFormat,
    Target,
    WorkerExit,
)
from airlock_sandbox.formats import ArtifactFormat

from . import output, saved_versions, tensor_tree
from .detect import confirm
from .errors import WorkerError, describe
from .report import Report

#: format -> (module, function). Modules are imported only when their format arrives, so an
#: sklearn job never imports torch and a numpy job never imports sklearn.
HANDLERS: dict[ArtifactFormat, tuple[str, str]] = {
    ArtifactFormat.PICKLE: ("sklearn_convert", "convert"),
    ArtifactFormat.JOBLIB: ("sklearn_convert", "convert"),
    ArtifactFormat.PYTORCH_ZIP: ("torch_convert", "convert_checkpoint"),
    ArtifactFormat.PYTORCH_LEGACY: ("torch_convert", "convert_checkpoint"),
    ArtifactFormat.TORCHSCRIPT: ("torch_convert", "convert_torchscript"),
    ArtifactFormat.TORCH_EXPORT: ("torch_convert", "convert_exported"),
    ArtifactFormat.NUMPY: ("numpy_convert", "convert_npy"),
    ArtifactFormat.NUMPY_NPZ: ("numpy_convert", "convert_npz"),
    ArtifactFormat.ONNX: ("passthrough", "convert_onnx"),
    ArtifactFormat.SAFETENSORS: ("passthrough", "convert_safetensors"),
    ArtifactFormat.MLFLOW: ("mlflow_convert", "convert"),
    ArtifactFormat.XGBOOST_JSON: ("booster_convert", "convert"),
    ArtifactFormat.XGBOOST_UBJ: ("booster_convert", "convert"),
    ArtifactFormat.LIGHTGBM_TEXT: ("booster_convert", "convert"),
    ArtifactFormat.SKOPS: ("sklearn_convert", "convert_skops"),
    ArtifactFormat.DATA_JSON: ("data_copy", "carry"),
    ArtifactFormat.DATA_TEXT: ("data_copy", "carry"),
    ArtifactFormat.DATA_SENTENCEPIECE: ("data_copy", "carry"),
}
#: JobMode.EXTRACT_WEIGHTS, the integrity reading: pickles by the policy loader, anything else
#: by the checkpoint reader (which refuses all but PyTorch checkpoints).
VERIFY_HANDLERS: dict[ArtifactFormat, tuple[str, str]] = {
    ArtifactFormat.PICKLE: ("sklearn_convert", "verify"),
    ArtifactFormat.JOBLIB: ("sklearn_convert", "verify"),
    ArtifactFormat.MLFLOW: ("mlflow_convert", "convert"),  # its pickled estimator, as above
}
EXTRACT_HANDLER = ("extract", "extract_weights")
#: parity.SAMPLE, without importing numpy for jobs that have no parity.
SAMPLE_SOURCE = "sample"


@dataclass
class Job:
    spec: JobSpec
    #: A path, or (an MLflow bundle's model) a bounded read-only view of one member of it.
    artifact: str | IO[bytes]
    out_dir: str
    fmt: ArtifactFormat
    report: Report = field(default_factory=Report)
    #: The model's own example inputs (an MLflow ``input_example``), parity's first batch.
    parity_example: dict[str | None, Any] | None = None
    #: ``spec.inputs`` are an MLflow signature's, not the caller's: a converter may try the
    #: model's own inputs when they fail (sklearn_convert.py).
    inputs_from_signature: bool = False
    #: The caller's parity sample (sample_input.read): parity's only rows when given.
    sample: Any | None = None

    # -- the artifact ------------------------------------------------------------------

    @contextlib.contextmanager
    def open_artifact(self) -> Iterator[IO[bytes]]:
        """The artifact's bytes from the start, whether it is a path or a member view."""
        if isinstance(self.artifact, str):
            with open(self.artifact, "rb") as fh:
                yield fh
        else:
            self.artifact.seek(0)
            yield self.artifact

    def artifact_path(self) -> str:
        """For readers that need a real file (mmap): only top-level artifacts have one."""
        if not isinstance(self.artifact, str):
            raise WorkerError(WorkerExit.UNSUPPORTED_MODEL,
                              "this reader needs the artifact as a file of its own")
        return self.artifact

    # -- the policy gate (DESIGN §1.6): called *before* a code-executing loader runs ------

    def loaded_safely(self, loader: str) -> None:
        self.report.loader = loader
        self.report.executed_artifact_code = False

    def allow_code(self, loader: str, why: str) -> None:
        """Refuse under SAFE_ONLY; otherwise record that artifact code is about to run."""
        if self.spec.policy is LoadingPolicy.SAFE_ONLY:
            raise WorkerError(
                WorkerExit.POLICY_VIOLATION,
                f"{why}: loading needs {loader}, which executes artifact code; policy is safe_only",
            )
        self.report.loader = loader
        self.report.executed_artifact_code = True

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Map a loader's failure: a missing module or class means the sandbox cannot host
        this model (UNSUPPORTED_MODEL); anything else is a failed load. A model saved by
        another scikit-learn version is reported (saved_versions.py)."""
        versions = saved_versions.Versions()
        try:
            with saved_versions.noted(self.report, versions):
                yield
        except WorkerError:
            raise
        except (ImportError, AttributeError) as exc:  # "Can't get attribute 'Net' on __main__"
            raise WorkerError(
                WorkerExit.UNSUPPORTED_MODEL,
                f"needs code the sandbox lacks: {describe(exc)}{versions.clause()}",
            ) from None
        except Exception as exc:
            raise WorkerError(
                WorkerExit.CONVERSION_FAILED, f"loading failed: {describe(exc)}{versions.clause()}"
            ) from None

    # -- what the request asks for -----------------------------------------------------

    def refuse_target(self, fmt: OutputFormat, why: str) -> None:
        if self.spec.target is Target(fmt.value):
            raise WorkerError(WorkerExit.UNSUPPORTED_MODEL, f"cannot produce {fmt.value}: {why}")

    def flatten(self, obj: Any, is_tensor: Callable[[Any], bool],
                expand: Callable[[Any], Mapping[str, Any] | None] | None = None,
                ) -> tensor_tree.Flattened:
        """:func:`tensor_tree.flatten` as the request asks: a training checkpoint's other
        entries kept when the caller asked for its training state."""
        return tensor_tree.flatten(obj, is_tensor, expand or (lambda _: None),
                                   keep_rest=self.spec.keep_training_state)

    def note_flattened(self, flat: tensor_tree.Flattened) -> None:
        """Warn about what :func:`tensor_tree.flatten` left out; refuse names a safetensors
        file cannot hold: two tensors under one name (keeping either would lose the other
        without a trace an index could catch), or the name its header reserves."""
        if flat.collisions:
            shown = ", ".join(repr(name[:80]) for name in flat.collisions[:5])
            raise WorkerError(WorkerExit.UNSUPPORTED_MODEL,
                              f"{len(flat.collisions)} tensor name(s) would be given twice "
                              f"once nested keys are joined with '.': {shown} (e.g. the keys "
                              "0 and '0', or {'a': {'b': ...}} beside 'a.b'); a safetensors "
                              "file holds one tensor per name: rename the keys")
        if tensor_tree.METADATA_KEY in flat.tensors:
            raise WorkerError(WorkerExit.UNSUPPORTED_MODEL,
                              f"a tensor is named {tensor_tree.METADATA_KEY!r}, which safetensors "
                              "reserves for the file's metadata: rename it")
        for sentence in tensor_tree.left_out_sentences(flat):
            self.report.warn(sentence)
        if flat.skipped:
            self.report.warn(f"skipped {len(flat.skipped)} non-tensor value(s): "
                             + ", ".join(flat.skipped[:10]))

    # -- output writers ----------------------------------------------------------------

    def write_onnx(self, model: Any, converter: str, reference: Any | None,
                   sampler: Any | None = None, finished: bytes | None = None) -> None:
        """Finish, parity-check (if a reference is given: on the model's example, then on
        inputs from ``sampler``, parity.random_feeds by default), then write the ONNX file.
        ``finished``: ``onnx_out.finish(model)``, when the converter has already run it."""
        from . import onnx_out, parity

        self.report.converter = converter
        data = finished if finished is not None else onnx_out.finish(model)
        output.check_size(len(data), self.spec.max_output_bytes)
        self.report.inputs = onnx_out.graph_inputs(model)
        self.report.tensor_count = len(model.graph.initializer)
        tolerance = parity.Tolerance.of(self.spec.parity_tolerance)
        if reference is not None and self.sample is not None:
            from . import sample_input

            feeds = sample_input.feeds(self.sample, self.report.inputs, self.report.warn)
            parity.check(data, self.report.inputs, reference, self.report, tolerance=tolerance,
                         examples=[feeds], source=parity.SAMPLE, generate=False)
        elif reference is not None:
            parity.check(data, self.report.inputs, reference, self.report, tolerance=tolerance,
                         sampler=sampler or parity.random_feeds,
                         examples=self._example_feeds())
        output.write_bytes(self.out_dir, OutputFormat.ONNX, data, self.spec.max_output_bytes)
        self.report.output_format = OutputFormat.ONNX.value

    def _example_feeds(self) -> list[dict[str, Any]]:
        if not self.parity_example:
            return []
        from .parity_inputs import example_feeds

        try:
            return [example_feeds(self.parity_example, self.report.inputs)]
        except ValueError as exc:
            self.report.warn(f"the model's input example was not used for parity: {exc}")
            return []

    def write_torch_tensors(self, tensors: dict[str, Any], converter: str) -> None:
        from . import st_torch

        self.report.converter = converter
        ready, metadata = st_torch.prepare(tensors, self.report.warn)
        if len(metadata) > 1:
            self.report.warn(f"{len(metadata) - 1} tied tensor name(s) deduplicated "
                             "(removed -> kept in __metadata__)")
        with output.staged(self.out_dir, OutputFormat.SAFETENSORS,
                           self.spec.max_output_bytes) as tmp:
            self.report.tensor_count = st_torch.write_verified(
                ready, metadata, tmp, self.spec.max_output_bytes, read_back=self.spec.read_back)
        self.report.output_format = OutputFormat.SAFETENSORS.value

    def write_numpy_arrays(self, arrays: dict[str, Any], converter: str) -> None:
        from . import st_numpy

        self.report.converter = converter
        ready = st_numpy.prepare(arrays, self.report.warn)
        with output.staged(self.out_dir, OutputFormat.SAFETENSORS,
                           self.spec.max_output_bytes) as tmp:
            self.report.tensor_count = st_numpy.write_verified(
                ready, tmp, self.spec.max_output_bytes, metadata={"format": "np"},
                read_back=self.spec.read_back)
        self.report.output_format = OutputFormat.SAFETENSORS.value


def run(spec: JobSpec, in_dir: str, out_dir: str, report: Report) -> None:
    """Confirm the broker's format, convert, write, filling ``report`` as it goes (so a
    failure report says how far the job got). Raises :class:`WorkerError` for every known
    outcome."""
    artifact = os.path.join(in_dir, ARTIFACT_NAME)
    try:
        fmt = confirm(artifact, spec.artifact_format, spec.declared_format)
    except FileNotFoundError:
        raise WorkerError(WorkerExit.BAD_JOB_SPEC, "no artifact in the input directory") from None
    report.detected_format = fmt.value
    job = Job(spec=spec, artifact=artifact, out_dir=out_dir, fmt=fmt, report=report)
    if spec.sample_input:  # read before the artifact is: a sample that cannot serve is refused
        from . import sample_input

        job.sample = sample_input.read(os.path.join(in_dir, SAMPLE_NAME))
    if spec.mode is JobMode.EXTRACT_WEIGHTS:
        module, function = VERIFY_HANDLERS.get(fmt, EXTRACT_HANDLER)
    else:
        module, function = HANDLERS[fmt]
    try:
        getattr(importlib.import_module(f"{__package__}.{module}"), function)(job)
    except WorkerError:
        raise
    except MemoryError:
        raise WorkerError(WorkerExit.CONVERSION_FAILED, "out of memory") from None
    except Exception as exc:  # a library failing on this model is a failed conversion
        raise WorkerError(WorkerExit.CONVERSION_FAILED, describe(exc)) from exc
    if job.sample is not None and report.parity_inputs != SAMPLE_SOURCE:
        report.warn("the parity sample was not used: this conversion has no parity check "
                    f"(output {report.output_format or 'none'}, converter "
                    f"{report.converter or 'none'})")

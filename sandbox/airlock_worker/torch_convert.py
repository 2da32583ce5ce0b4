"""PyTorch artifacts. Checkpoints (zip or legacy) go through ``torch.load(weights_only=True)``
first; only if that refuses the file (a full ``nn.Module`` pickle) and the policy allows, the
code-executing ``weights_only=False`` runs. TorchScript and ``.pt2`` archives have no safe
loader at all. Weights become safetensors; a module with example input shapes becomes ONNX."""

from __future__ import annotations

import importlib.util
import io
import pickle
import zipfile
from dataclasses import asdict
from typing import IO, Any

import numpy as np
import torch

from airlock_sandbox.contract import OutputFormat, Target, WorkerExit
from airlock_sandbox.formats import ArtifactFormat

from . import st_torch
from .errors import WorkerError
from .job import Job
from .parity import Expected, Reference, random_feeds
from .spec_types import EXPORT_ROWS, free_axes

#: Both exporters support it and it is within what the broker's ONNX Runtime runs.
EXPORT_OPSET = 18
LEGACY_EXPORTER = "torch.onnx.export(dynamo=False)"
DYNAMO_EXPORTER = "torch.onnx.export(dynamo=True)"
WEIGHTS_ONLY = "no input shapes given: exported weights only"


def convert_checkpoint(job: Job) -> None:
    obj = _load_checkpoint(job)
    if isinstance(obj, torch.nn.Module):
        _module_out(job, obj, "full nn.Module")
    else:
        _tensors_out(job, obj)


def _load_checkpoint(job: Job) -> Any:
    with job.loading():
        try:
            # mmap: a 400 MB zip checkpoint is paged in from the read-only input, not copied.
            # Only for stored records: torch's mmap path returns garbage for deflated ones.
            obj = torch.load(_rewound(job.artifact), map_location="cpu", weights_only=True,
                             mmap=isinstance(job.artifact, str)
                             and job.fmt is ArtifactFormat.PYTORCH_ZIP
                             and _all_records_stored(job.artifact))
        except pickle.UnpicklingError as exc:
            if "Weights only load failed" not in str(exc):
                raise
        else:
            job.loaded_safely("torch.load(weights_only=True)")
            return obj
        # Never a silent fallback (DESIGN §1.6): the gate refuses under safe_only.
        job.allow_code("torch.load(weights_only=False)",
                       "the checkpoint holds more than tensors (e.g. a pickled nn.Module)")
        return torch.load(_rewound(job.artifact), map_location="cpu", weights_only=False)


def _rewound(artifact: str | IO[bytes]) -> str | IO[bytes]:
    """A member view is read from its start by every loader that gets it."""
    if not isinstance(artifact, str):
        artifact.seek(0)
    return artifact


def _all_records_stored(path: str) -> bool:
    with zipfile.ZipFile(path) as zf:
        return all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())


def convert_torchscript(job: Job) -> None:
    job.allow_code("torch.jit.load", "TorchScript has no safe loading mode")
    with job.loading():
        module = torch.jit.load(_rewound(job.artifact), map_location="cpu")  # type: ignore[no-untyped-call]
    _module_out(job, module, "TorchScript module")


def convert_exported(job: Job) -> None:
    exporter_present = importlib.util.find_spec("onnxscript") is not None
    if job.spec.target is Target.ONNX and not exporter_present:  # refuse before loading
        raise WorkerError(WorkerExit.CONVERSION_FAILED, _NO_ONNXSCRIPT + "; ask for safetensors")
    job.allow_code("torch.export.load", "a .pt2 archive is loaded without weights_only")
    with job.loading():
        program = torch.export.load(_rewound(job.artifact))
    examples = _exported_examples(job, program)
    if job.spec.target is Target.ONNX:
        if examples is None:
            raise WorkerError(WorkerExit.INPUT_SPEC_REQUIRED,
                              "the .pt2 archive has no example inputs; give the input shapes")
        _export_dynamo(job, program, examples)
    elif job.spec.target is Target.AUTO and examples is not None and exporter_present:
        _export_dynamo(job, program, examples)
    else:
        if job.spec.target is Target.AUTO:
            job.report.warn(_NO_ONNXSCRIPT + ": exported weights only" if examples is not None
                            else WEIGHTS_ONLY)
        job.write_torch_tensors(dict(program.state_dict), "safetensors.torch")


_NO_ONNXSCRIPT = ("exporting a .pt2 program to ONNX needs the dynamo exporter, which needs "
                  "onnxscript, and the sandbox image does not include it")


# -- weights -------------------------------------------------------------------------------


def _tensors_out(job: Job, obj: Any) -> None:
    flat = job.flatten(obj, st_torch.is_tensor, st_torch.module_state)
    if not flat.tensors:
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL,
                          f"the checkpoint holds no tensors (a {type(obj).__name__})")
    job.refuse_target(OutputFormat.ONNX, "a state dict holds weights only, no model code")
    job.note_flattened(flat)
    job.write_torch_tensors(flat.tensors, "safetensors.torch")


# -- modules -> ONNX -----------------------------------------------------------------------


def _module_out(job: Job, module: Any, kind: str) -> None:
    module.eval()
    if job.spec.target is Target.SAFETENSORS or (
            job.spec.target is Target.AUTO and not job.spec.inputs):
        if job.spec.target is Target.AUTO:
            job.report.warn(WEIGHTS_ONLY)
        job.write_torch_tensors(dict(module.state_dict()), "safetensors.torch")
        return
    if not job.spec.inputs:
        raise WorkerError(WorkerExit.INPUT_SPEC_REQUIRED,
                          f"exporting a {kind} to ONNX needs the input shapes")
    _export_legacy(job, module)


def _spec_examples(job: Job, rows: int) -> tuple[torch.Tensor, ...]:
    if any(np.dtype(spec.dtype).kind not in "fiub" for spec in job.spec.inputs):
        raise WorkerError(WorkerExit.BAD_JOB_SPEC, "torch model inputs must be numeric tensors")
    feeds = random_feeds([asdict(s) for s in job.spec.inputs], rows, seed=7)
    return tuple(torch.from_numpy(v) for v in feeds.values())


def _export_legacy(job: Job, module: Any) -> None:
    """The TorchScript-based exporter: the only one that takes ScriptModules, and it needs no
    onnxscript. It traces, so data-dependent branches are baked in; parity on fresh inputs
    is what catches that, sometimes."""
    example = _spec_examples(job, EXPORT_ROWS)
    output_names = _output_names(module, example)
    dynamic_axes: dict[str, dict[int, str]] = {
        s.name: free_axes(s) for s in job.spec.inputs if free_axes(s)}
    if any(s.shape and s.shape[0] < 0 for s in job.spec.inputs):
        dynamic_axes.update({name: {0: "batch"} for name in output_names})
    buf = io.BytesIO()  # in memory: nothing may land beside the output, no .data sidecar
    # The legacy exporter writes to any binary file object, whatever its annotation says.
    torch.onnx.export(
        module, example, buf,  # type: ignore[arg-type]
        dynamo=False, opset_version=EXPORT_OPSET,
        input_names=[s.name for s in job.spec.inputs], output_names=output_names,
        dynamic_axes=dynamic_axes or None,
    )
    import onnx

    job.write_onnx(onnx.load_from_string(buf.getvalue()), LEGACY_EXPORTER, _reference(module))


def _exported_examples(job: Job, program: Any) -> tuple[torch.Tensor, ...] | None:
    if job.spec.inputs:
        return _spec_examples(job, EXPORT_ROWS)
    recorded = getattr(program, "example_inputs", None)
    if recorded is None:
        return None
    args, kwargs = recorded
    if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
        return None
    return tuple(args)


def _export_dynamo(job: Job, program: Any, examples: tuple[torch.Tensor, ...]) -> None:
    names = [s.name for s in job.spec.inputs] or None
    onnx_program = torch.onnx.export(
        program, examples, None, dynamo=True, external_data=False,
        opset_version=EXPORT_OPSET, input_names=names,
        output_names=_output_names(program.module(), examples), optimize=True, verify=False,
    )
    assert onnx_program is not None  # dynamo=True always returns the program
    job.write_onnx(onnx_program.model_proto, DYNAMO_EXPORTER, _reference(program.module()))


def _output_names(module: Any, example: tuple[torch.Tensor, ...]) -> list[str]:
    """``output`` or ``output_0..n``: one forward pass tells how many there are."""
    with torch.no_grad():
        count = len(_output_tensors(module(*example)))
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _output_tensors(out: Any) -> list[torch.Tensor]:
    """Outputs in the order the exporters flatten them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _output_tensors(item)]
    return []


def _reference(module: Any) -> Reference:
    def reference(feeds: dict[str, Any]) -> list[Expected | None]:
        args = [torch.from_numpy(v) for v in feeds.values()]
        with torch.no_grad():
            return [Expected(t.detach().numpy()) for t in _output_tensors(module(*args))]

    return reference

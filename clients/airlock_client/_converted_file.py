"""One file's conversion as ``airlock convert`` places and reports it, whether it was given
alone or with others (_convert_cli.py, _convert_many_cli.py): the policy unless told, the
output's name, the ``--json`` object."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from airlock_client._types import ConversionResult, LoadingPolicy

_SUFFIX = {"onnx": ".onnx", "safetensors": ".safetensors"}
#: ``reason`` of a file that converted but could not be renamed into place (or have its
#: provenance written beside it): the converted file is kept under its temporary name.
OUTPUT_NOT_PLACED = "OUTPUT_NOT_PLACED"
#: ``--policy`` unless given, for one file or an MLflow model: a pickled estimator or module
#: often needs its own classes to load. A model directory's is ``model_dir.DIRECTORY_POLICY``.
FILE_POLICY: LoadingPolicy = "allow_code"


def default_output(source: Path) -> Path:
    """A temporary name beside the input; renamed once the output format is known."""
    return source.with_name(f".{source.name}.airlock-out")


def final_name(source: Path, fmt: str) -> Path:
    target = source.with_suffix(_SUFFIX[fmt])
    return target.with_name(f"{source.stem}.converted{_SUFFIX[fmt]}") if target == source \
        else target


def placed(result: ConversionResult, temporary: Path, base: Path) -> ConversionResult:
    """A conversion written to ``temporary`` (``default_output``), renamed to its final name
    after ``base`` now that its format is known (``final_name``)."""
    final = final_name(base, result.format)
    temporary.replace(final)
    return ConversionResult(**{**result.__dict__, "output": final})


def result_document(result: ConversionResult, provenance: Path) -> dict[str, Any]:
    """The ``--json`` object for one converted file."""
    return {
        "ok": True, "status": "ok", "reason": None, "message": "converted",
        "output": str(result.output), "format": result.format, "sha256": result.sha256,
        "size": result.size, "job_id": result.job_id,
        "detected_format": result.detected_format, "assurance": result.assurance,
        "integrity_note": result.integrity_note,
        "loading_policy": result.loading_policy, "input_sha256": result.input_sha256,
        "executed_artifact_code": result.report.executed_artifact_code,
        "parity": [asdict(p) for p in result.report.parity],
        "parity_inputs": result.report.parity_inputs,
        "warnings": list(result.report.warnings),
        "duration_seconds": round(result.duration_seconds, 3),
        "provenance": str(provenance),
        "provenance_key": (result.provenance_record.key_fingerprint
                           if result.provenance_record else None),
        "provenance_key_source": result.provenance_key_source,
        "transfer": result.transfer,
    }


def failure_document(status: str, reason: str | None, message: str, job_id: str = ""
                     ) -> dict[str, Any]:
    """The ``--json`` object for one file that was not converted (a file of several adds its
    ``input``): the keys of :func:`result_document` a script checks first, with no output."""
    return {"ok": False, "status": status, "reason": reason, "message": message,
            "output": None, "format": None, "sha256": None, "job_id": job_id or None}

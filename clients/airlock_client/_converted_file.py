"""One file's conversion as ``airlock convert`` places and reports it, whether it was given
alone or with others (_convert_cli.py, _convert_many_cli.py): the policy unless told, the
output's name, the ``--json`` object."""

from __future__ import annotations

import math
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from airlock_client._part_files import OutputSwapped
from airlock_client._types import ConversionResult, LoadingPolicy, ParityCheck
from airlock_client.provenance import provenance_path

_SUFFIX = {"onnx": ".onnx", "safetensors": ".safetensors"}
#: ``reason`` of a file that converted but could not be renamed into place (or have its
#: provenance written beside it): the converted file is kept under its temporary name.
OUTPUT_NOT_PLACED = "OUTPUT_NOT_PLACED"
#: ``--policy`` unless given, for one file or an MLflow model: a pickled estimator or module
#: often needs its own classes to load. A model directory's is ``model_dir.DIRECTORY_POLICY``.
FILE_POLICY: LoadingPolicy = "allow_code"


#: This process's part of every temporary name (``default_output``): two runs on one input
#: never share one (a fixed name let each take the other's output and report its own).
_RUN = secrets.token_hex(4)


def default_output(base: Path) -> Path:
    """The temporary name beside where the output goes, ``.NAME.<run>.airlock-out``: the
    client writes the conversion there (through a part file of its own, renamed: nothing is
    at this name unless a conversion finished), and it is renamed to its final name once the
    format is known (``placed``). Not a name a sweep removes (``_part_files``): a conversion
    kept under it (OUTPUT_NOT_PLACED) stays where the message says."""
    base = _named(base)
    return base.with_name(f".{base.name}.{_RUN}.airlock-out")


def _named(base: Path) -> Path:
    """``base``, or its absolute path where it has no name of its own ("." or "..")."""
    return base if base.name not in ("", ".", "..") else Path(os.path.abspath(base))


def placement_problem(items: Sequence[tuple[str, Path]], *, overwrite: bool) -> str | None:
    """Why the outputs of these inputs cannot all be put in place, found before anything is
    sent, or None. ``items``: each input as given, and the base its output is named after
    (``final_name``). Every name an output may take is checked (its format is the broker's
    answer), compared by real path (``m.onnx`` and ``/abs/m.onnx`` are one file):

    - an input is given twice (as two paths to one file);
    - two outputs would take one name;
    - an output would replace one of the inputs;
    - an output would replace a file of the user's, one with no provenance record beside it
      (an earlier conversion's output has one), unless ``overwrite``. A directory there is
      left to the placing, which keeps the conversion (OUTPUT_NOT_PLACED)."""
    inputs: dict[str, str] = {}
    for text, _ in items:
        real = os.path.realpath(text)
        if real in inputs:
            return f"{inputs[real]} and {text} are the same file: give it once"
        inputs[real] = text
    finals: dict[str, str] = {}
    names = [(text, final_name(_named(base), fmt)) for text, base in items
             for fmt in ("onnx", "safetensors")]
    for text, final in names:
        key = os.path.join(os.path.realpath(final.parent), final.name)
        if finals.get(key, text) != text:
            return (f"{finals[key]} and {text} would both be written as {final}: "
                    "convert them apart, or rename one")
        finals[key] = text
        if key in inputs:
            return (f"{text}'s output would be written as {final}, which is the input "
                    f"{inputs[key]}: convert them apart, or rename one")
    for _, final in names if not overwrite else ():
        if _users_file(final):
            return (f"{final} exists and is not an earlier conversion's output (it has no "
                    f"{provenance_path(final).name} beside it): move it, or pass "
                    "--overwrite to replace it")
    return None


def _users_file(path: Path) -> bool:
    """Whether ``path`` is something of the user's a placed output would replace: there (a
    link counts, whatever it points to), not a directory, with no provenance record."""
    return os.path.lexists(path) and not os.path.isdir(path) \
        and not os.path.lexists(provenance_path(path))


def final_name(source: Path, fmt: str) -> Path:
    target = source.with_suffix(_SUFFIX[fmt])
    return target.with_name(f"{source.stem}.converted{_SUFFIX[fmt]}") if target == source \
        else target


def placed(result: ConversionResult, temporary: Path, base: Path) -> ConversionResult:
    """A conversion written to ``temporary`` (``default_output``), renamed to its final name
    after ``base`` now that its format is known (``final_name``). What is renamed must be a
    regular file of the output's size, and the final name that same file after the rename
    (``OutputSwapped`` otherwise: in a directory others may write, the name may have been
    pointed elsewhere since the conversion put the file there)."""
    final = final_name(_named(base), result.format)
    before = os.lstat(temporary)
    if not stat.S_ISREG(before.st_mode) or before.st_size != result.size:
        raise OutputSwapped(temporary)
    temporary.replace(final)
    after = os.lstat(final)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        raise OutputSwapped(final)
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
        "parity": [_json_parity(p) for p in result.report.parity],
        "parity_inputs": result.report.parity_inputs,
        "warnings": list(result.report.warnings),
        "duration_seconds": round(result.duration_seconds, 3),
        "provenance": str(provenance),
        "provenance_key": (result.provenance_record.key_fingerprint
                           if result.provenance_record else None),
        "provenance_key_source": result.provenance_key_source,
        "transfer": result.transfer,
    }


def _json_parity(check: ParityCheck) -> dict[str, Any]:
    """A parity entry as JSON has it: a difference that is no number (NaN in
    ``ParityCheck``, null in the record) is null; ``NaN`` is no JSON (jq, JSON.parse)."""
    return {name: None if isinstance(value, float) and not math.isfinite(value) else value
            for name, value in asdict(check).items()}


def failure_document(status: str, reason: str | None, message: str, job_id: str = ""
                     ) -> dict[str, Any]:
    """The ``--json`` object for one file that was not converted (a file of several adds its
    ``input``): the keys of :func:`result_document` a script checks first, with no output."""
    return {"ok": False, "status": status, "reason": reason, "message": message,
            "output": None, "format": None, "sha256": None, "job_id": job_id or None}

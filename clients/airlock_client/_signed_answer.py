"""The broker's answer must be the job this client asked for, as the broker signed it.

The result header travels beside the signed record, unsigned, and so did the request before
it: whoever sits on the channel (cleartext, or a proxy that ends TLS) can rewrite both. A
valid signature says only that the broker made the output. A request rewritten on its way
(``allow_code`` for ``safe_only``, another subject, or a declared ``text`` that has the
broker check a protocol-0 pickle as text and carry it back unchanged) is a job the broker
really did and really signed. So the record must say the job is the one this client asked
for (``REQUEST_MISMATCH``), and what the header says of the output and the job must be the
record's (``RESULT_MISMATCH``), before a byte of the output is put in place; the result the
client reports is then built from the record wherever the record says (:func:`result`).
The header's own words are left only where the record has nothing: ``replayed`` and the
duration (and, from a broker whose records are older than version 5, the sandbox's warnings,
the output's input specs and its tensor count). Both the streaming and the same-host paths go
through :func:`signed_record` and :func:`result`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from airlock.v1 import airlock_pb2 as pb
from airlock_client import _wire
from airlock_client._errors import ProvenanceError
from airlock_client._types import ConversionResult, ParityCheck, TensorSpec
from airlock_client._wire import DECLARED, OUTPUTS, POLICY_NAMES, TARGETS, assurance
from airlock_client.provenance import (
    DATA_FORMAT,
    ProvenanceRecord,
    PublicKeyLike,
    check_kind,
    check_output,
    verify_envelope,
)
from airlock_sandbox.contract import DEFAULT_INPUT_DTYPE, input_name
from airlock_sandbox.formats import declared_data

_TARGET_NAMES = {v: k for k, v in TARGETS.items()}
_DECLARED_NAMES = {v: k for k, v in DECLARED.items()}


def signed_record(header: pb.ConvertResult, asked: pb.ConvertMetadata,
                  key: PublicKeyLike) -> ProvenanceRecord:
    """``header``'s provenance, verified with ``key``, once it describes the header's output
    and input, the job ``asked`` for, and everything the header says besides; else raise
    ``ProvenanceError``."""
    record = verify_envelope(header.provenance, key)
    if record.input_sha256 != header.input_sha256:
        raise ProvenanceError("OUTPUT_MISMATCH", "the provenance is for another input")
    check_output(record, sha256=header.output_sha256, size=header.output_size)
    _check_asked(record, asked)
    _check_header(record, header)
    return record


def result(header: pb.ConvertResult, record: ProvenanceRecord, output: Path,
           key_source: str) -> ConversionResult:
    """The result to report for ``header`` once :func:`signed_record` took it: what the
    signed ``record`` says, wherever it says it."""
    reported = _wire.result(header, output)
    claims = record.conversion
    executed = record.executed_artifact_code
    report = replace(
        reported.report,
        loader=_text(claims.get("loader")), converter=_text(claims.get("converter")),
        executed_artifact_code=(reported.report.executed_artifact_code if executed is None
                                else executed),  # before version 4, the header's
        parity=_signed_parity(record),
        versions={str(k): _text(v) for k, v in _mapping(claims.get("versions")).items()},
        parity_inputs=_text(claims.get("parity_inputs")))
    if record.record_version >= 5:  # before, the record had none of these
        report = replace(report, warnings=_signed_warnings(record),
                         inputs=_signed_inputs(record),
                         tensor_count=_int(claims.get("tensor_count")))
    return replace(reported, report=report, provenance=bytes(header.provenance),
                   provenance_record=record, provenance_key_source=key_source)


def signed_index(provenance: bytes, index: bytes, subject: str, key: PublicKeyLike,
                 shards: Sequence[tuple[str, bytes]] = ()) -> ProvenanceRecord:
    """The record AttestIndex answered, verified with ``key``, once it is an index's record
    of exactly ``index`` under ``subject``, listing exactly ``shards`` (file name and
    record, as sent: each shard's output sha256 and job id); else raise
    ``ProvenanceError``. One index's bytes are often another's (a fine-tuned model's are
    its base model's): a record the broker signed for them over other shards, answered by
    whoever sits on the channel, would be written as this directory's."""
    record = verify_envelope(provenance, key)
    check_output(record, sha256=hashlib.sha256(index).hexdigest(), size=len(index))
    check_kind(record, index=True)
    if record.subject != subject:
        raise ProvenanceError("REQUEST_MISMATCH",
                              f"the broker signed the index under the subject "
                              f"{_shown(record.subject)}, but this client asked for "
                              f"{_shown(subject)}: the request was changed on its way")
    sent = {}
    for name, shard in shards:
        shard_record = verify_envelope(shard, key)
        sent[name] = (shard_record.output_sha256, shard_record.job_id)
    listed = {str(s.get("file_name")): (s.get("sha256"), s.get("job_id"))
              for s in record.shards}
    if shards and (listed != sent or len(record.shards) != len(sent)):
        raise ProvenanceError("REQUEST_MISMATCH",
                              "the broker's record of the index lists other shards than this "
                              "client sent (another conversion's record of the same index "
                              "bytes): the answer was changed on its way")
    return record


def _check_asked(record: ProvenanceRecord, asked: pb.ConvertMetadata) -> None:
    declared = _DECLARED_NAMES.get(asked.declared_format, "")
    data_file = declared_data(declared or None) is not None
    target = _TARGET_NAMES.get(asked.target, "?")
    if data_file and target == "auto":  # a data file's one target, as the broker records it
        target = DATA_FORMAT
    expected: dict[str, tuple[object, object]] = {
        "declared format": (declared, record.declared_format),
        "loading policy": (POLICY_NAMES.get(asked.loading_policy, "?"), record.loading_policy),
        "target": (target, record.target),
    }
    if record.record_version >= 2:
        expected["subject"] = (asked.subject, record.subject)
    if record.record_version >= 3:
        sample = hashlib.sha256(asked.sample_input).hexdigest() if asked.sample_input else ""
        expected["parity tolerance"] = (asked.parity_tolerance, record.parity_tolerance)
        expected["parity sample"] = (sample, record.sample_sha256)
    if target != "auto":
        expected["output format"] = (target, record.output_format)
    request = _signed_part(record, "request")
    if "inputs" in request or asked.inputs:
        count = len(asked.inputs)
        expected["input specs"] = (
            [(input_name(t.name, i, count), t.dtype or DEFAULT_INPUT_DTYPE, list(t.shape))
             for i, t in enumerate(asked.inputs)],
            [(d.get("name"), d.get("dtype"), d.get("shape"))
             for d in request.get("inputs") or () if isinstance(d, Mapping)])
    if "keep_training_state" in request or asked.keep_training_state:
        expected["training state kept"] = (asked.keep_training_state,
                                           request.get("keep_training_state"))
    if (differs := _first_difference(expected)) is not None:
        what, mine, signed = differs
        raise ProvenanceError("REQUEST_MISMATCH",
                              f"the broker signed a job whose {what} is {signed}, but this "
                              f"client asked for {mine}: the request was changed on its way "
                              "(or the broker is not Airlock's)")
    check_kind(record, data_file=data_file)


def _check_header(record: ProvenanceRecord, header: pb.ConvertResult) -> None:
    report = header.report
    said: dict[str, tuple[object, object]] = {
        "job id": (header.job_id, record.job_id),
        "output format": (OUTPUTS.get(header.output_format, "?"), record.output_format),
        "assurance": (assurance(header.assurance), record.assurance),
        "loading policy": (POLICY_NAMES.get(header.loading_policy, "?"),
                           record.loading_policy),
        "input size": (header.input_size, record.input_size),
        "integrity note": (header.integrity_note, record.integrity_note),
        "runtime": (header.runtime, record.runtime),
        "image": (header.image_id, record.image_id),
        "parity": ([(p.output_name, p.passed) for p in report.parity],
                   [(p.output_name, p.passed) for p in _signed_parity(record)]),
    }
    # The host's detection, or the sandbox's refinement of a zip or a bundle (jobs.py).
    refined = _signed_part(record, "input").get("refined_format")
    if header.detected_format not in (record.detected_format, refined):
        said["detected format"] = (header.detected_format, record.detected_format)
    if record.executed_artifact_code is not None:  # the broker's verdict (version 4 on)
        said["whether artifact code ran"] = (report.executed_artifact_code,
                                             record.executed_artifact_code)
    if record.record_version >= 5:
        said["warnings"] = (list(report.warnings), list(_signed_warnings(record)))
        said["output's input specs"] = (
            [TensorSpec(t.name, t.dtype, tuple(t.shape)) for t in report.inputs],
            list(_signed_inputs(record)))
        said["tensor count"] = (report.tensor_count,
                                _int(record.conversion.get("tensor_count")))
    if (differs := _first_difference(said)) is not None:
        what, header_says, signed = differs
        raise ProvenanceError("RESULT_MISMATCH",
                              f"the result says the {what} is {header_says}, but the signed "
                              f"record says {signed}: the answer was changed on its way (or "
                              "the broker is not Airlock's)")


def _signed_part(record: ProvenanceRecord, name: str) -> Mapping[str, Any]:
    """The object ``name`` of the signed Airlock record (``request``, ``input``), as signed;
    empty where the record has none."""
    return _mapping(_mapping(_mapping(record.statement.get("predicate")).get("airlock"))
                    .get(name))


def _signed_parity(record: ProvenanceRecord) -> tuple[ParityCheck, ...]:
    """The parity entries of the sandbox's signed claims, as the client reports them."""
    return tuple(_parity(p) for p in record.conversion.get("parity", ())
                 if isinstance(p, Mapping))


def _signed_warnings(record: ProvenanceRecord) -> tuple[str, ...]:
    """The sandbox's warnings as signed (version 5 on)."""
    warnings = record.conversion.get("warnings")
    return tuple(_text(w) for w in warnings) if isinstance(warnings, list) else ()


def _signed_inputs(record: ProvenanceRecord) -> tuple[TensorSpec, ...]:
    """The output's input specs as signed (version 5 on)."""
    specs = record.conversion.get("inputs")
    return tuple(TensorSpec(_text(s.get("name")), _text(s.get("dtype")),
                            tuple(_int(d, signed=True) for d in _list(s.get("shape"))))
                 for s in (specs if isinstance(specs, list) else ())
                 if isinstance(s, Mapping))


def _parity(entry: Mapping[str, Any]) -> ParityCheck:
    """A signed parity entry as the client reports one (a difference the broker could not
    record as a number, being infinite or NaN, is NaN; one a record before version 3 did not
    hold, the relative difference, is 0)."""
    return ParityCheck(output_name=_text(entry.get("output_name")),
                       samples=_int(entry.get("samples")),
                       max_abs_diff=_number(entry.get("max_abs_diff")),
                       tolerance=_text(entry.get("tolerance")),
                       passed=entry.get("passed") is True,
                       max_rel_diff=(_number(entry["max_rel_diff"])
                                     if "max_rel_diff" in entry else 0.0))


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _int(value: Any, *, signed: bool = False) -> int:
    """An int of the record, or 0; a negative one only where ``signed`` (a free dim)."""
    if not isinstance(value, int) or isinstance(value, bool) or (value < 0 and not signed):
        return 0
    return value


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _first_difference(pairs: dict[str, tuple[object, object]]) -> tuple[str, str, str] | None:
    """The first entry whose sides differ, as (what, one side, the other), shown."""
    for what, (ours, signed) in pairs.items():
        if ours != signed:
            return what, _shown(ours), _shown(signed)
    return None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

"""The broker's answer must be the job this client asked for, as the broker signed it.

The result header travels beside the signed record, unsigned, and so did the request before
it: whoever sits on the channel (cleartext, or a proxy that ends TLS) can rewrite both. A
valid signature says only that the broker made the output. A request rewritten on its way
(``allow_code`` for ``safe_only``, another subject, or a declared ``text`` that has the
broker check a protocol-0 pickle as text and carry it back unchanged) is a job the broker
really did and really signed. So the record must say the job is the one this client asked
for (``REQUEST_MISMATCH``), and every field the client reports from the header must be the
record's (``RESULT_MISMATCH``), before a byte of the output is put in place. Both the
streaming and the same-host paths go through :func:`signed_record`.
"""

from __future__ import annotations

import hashlib

from airlock.v1 import airlock_pb2 as pb
from airlock_client._errors import ProvenanceError
from airlock_client._wire import DECLARED, OUTPUTS, POLICY_NAMES, TARGETS, assurance
from airlock_client.provenance import (
    DATA_FORMAT,
    ProvenanceRecord,
    PublicKeyLike,
    check_kind,
    check_output,
    verify_envelope,
)
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


def signed_index(provenance: bytes, index: bytes, subject: str,
                 key: PublicKeyLike) -> ProvenanceRecord:
    """The record AttestIndex answered, verified with ``key``, once it is an index's record
    of exactly ``index`` under ``subject``; else raise ``ProvenanceError``."""
    record = verify_envelope(provenance, key)
    check_output(record, sha256=hashlib.sha256(index).hexdigest(), size=len(index))
    check_kind(record, index=True)
    if record.subject != subject:
        raise ProvenanceError("REQUEST_MISMATCH",
                              f"the broker signed the index under the subject "
                              f"{_shown(record.subject)}, but this client asked for "
                              f"{_shown(subject)}: the request was changed on its way")
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
                   [(p.get("output_name"), p.get("passed"))
                    for p in record.conversion.get("parity", ()) if isinstance(p, dict)]),
    }
    if record.executed_artifact_code is not None:  # the broker's verdict (version 4 on)
        said["whether artifact code ran"] = (report.executed_artifact_code,
                                             record.executed_artifact_code)
    if (differs := _first_difference(said)) is not None:
        what, header_says, signed = differs
        raise ProvenanceError("RESULT_MISMATCH",
                              f"the result says the {what} is {header_says}, but the signed "
                              f"record says {signed}: the answer was changed on its way (or "
                              "the broker is not Airlock's)")


def _first_difference(pairs: dict[str, tuple[object, object]]) -> tuple[str, str, str] | None:
    """The first entry whose sides differ, as (what, one side, the other), shown."""
    for what, (ours, signed) in pairs.items():
        if ours != signed:
            return what, _shown(ours), _shown(signed)
    return None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

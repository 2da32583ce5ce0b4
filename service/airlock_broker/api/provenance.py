"""Signed provenance for every output, in the OpenSSF model-signing format.

Each output gets a Sigstore bundle (v0.3, key-signed, no transparency log) holding a DSSE
envelope around an in-toto Statement v1 with model-signing's predicate
(``https://model_signing/signature/v1.0``): the output file as the one resource, with its
sha256. Airlock's record of how the output was made rides in the same signed predicate
under ``airlock`` (model-signing v1.0 verifiers ignore fields they do not know). So the file
``airlock convert`` writes beside an output is also a model-signing signature of it::

    model_signing verify key --signature model.onnx.provenance.json \
        --public_key airlock.pub.pem model.onnx

Why not call the ``model-signing`` library itself: its public API signs what it hashes
itself, which on a 400 MB output costs another full read on the hot path (measured 2.5 s
here, against 4.8 s for the whole S3 job), while the broker already holds the output's
sha256 from validation; feeding it a digest needs its private ``_signing`` modules; and it
would bring sigstore, pyOpenSSL and ~25 other packages into the broker and the client. The
envelope is a few lines of standard data signed with ``cryptography``'s ECDSA P-256; a unit
test checks that model-signing 1.1.1 verifies it.

Everything in the record that came from the sandbox (loader, converter, versions, parity,
warnings, the output's input specs and tensor count) is the worker's claim, capped and made
printable exactly as the result header carries it (claims.py), and sits under ``conversion``;
the rest is what the broker observed or decided itself. Version 4 records had no warnings,
input specs or tensor count: those were the header's word alone.

Which model an output is (record version 2): ``input.subject`` is the caller's name for the
artifact (``models:/NAME/VERSION`` from ``airlock migrate``, a path or URI from ``airlock
convert``), checked printable and bounded but not believed; ``input.sha256`` is what the broker
hashed; ``principal`` is who asked, as authentication established it (``method`` "none" when
authentication is off: then the name says nothing). A verifier binds an output to its source
by comparing both with what it expects (``airlock_client.provenance.check_source``): the subject
alone is the caller's word, the sha256 is not. Version 1 records had neither subject nor
principal.

How closely the output was checked against the original (record version 3):
``request.parity_tolerance`` is the tolerance the caller asked for (0: the worker's default,
atol 1e-5 and rtol 1e-4), ``request.sample_input`` the sha256 and size of the caller's parity
sample (null: none); under ``conversion`` (the worker's claims), each ``parity`` entry carries
the tolerance applied, the largest absolute and relative differences measured and the rows
compared, and ``parity_inputs`` says which rows those were ("sample", "input_example",
"generated", joined by "+"). Version 2 records had only each output's ``max_abs_diff``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import time
from importlib import metadata
from typing import Any

from airlock_broker.api.auth import Principal
from airlock_broker.api.claims import claims
from airlock_broker.conversion.jobs import JobRequest, JobResult
from airlock_broker.conversion.outputs import ValidatedOutput
from airlock_broker.security.keys import SigningKey
from airlock_broker.timestamps import utc_second
from airlock_sandbox.contract import OUTPUT_NAMES
from airlock_sandbox.policy import SandboxPolicy

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
#: model-signing's predicate: one resource per file, with its digest.
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
#: Where Airlock's record sits in the predicate.
RECORD_FIELD = "airlock"
#: 2: subject and principal; 3: the parity asked for; 4: the broker's verdict on whether
#: artifact code ran (``verdicts.executed_artifact_code``; the sandbox's word stays under
#: "conversion", and a sandbox whose artifact ran code can make it say no); 5: the sandbox's
#: warnings, the output's input specs and tensor count under "conversion" (claims.py), which
#: the result header had alone.
RECORD_VERSION = 5


@functools.cache
def broker_version() -> str:
    """The installed distribution's version, looked up once: ``importlib.metadata`` scans
    ``sys.path`` on every call (3.5 ms of every job's answer, measured with bench.profile)."""
    for distribution in ("airlock-broker", "airlock"):  # installed alone; the developer install
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"  # a bare checkout


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def created_at(created: float | None = None) -> str:
    """A record's ``created``: UTC, to the second; now when ``created`` is None."""
    return utc_second(created or time.time())


def statement(result: JobResult, request: JobRequest, policy: SandboxPolicy, *,
              principal: Principal, created: float | None = None,
              version: str | None = None) -> dict[str, Any]:
    """The in-toto Statement for one successful job, asked for by ``principal``."""
    output = result.output
    report = result.report
    record = {
        "record_version": RECORD_VERSION,
        "broker": {"name": "airlock", "version": version or broker_version()},
        "job_id": result.job_id,
        "created": created_at(created),
        "principal": {"name": principal.name, "method": principal.method},
        "input": {
            # The caller's word for what this is; bound to the bytes by "sha256" below.
            "subject": request.subject,
            "sha256": result.input_sha256,
            "size": result.input_size,
            "declared_format": request.declared_format or "",
            "detected_format": result.detected_format.value,
            # The worker's refinement (which zip layout, which MLflow flavour) where the broker
            # took it (jobs.refined_format), as the result header says it; never the bare claim,
            # which a client would take for the header's word (a pickle "safetensors").
            "refined_format": result.reported_format,
        },
        "output": _output(output),
        "request": {
            "target": request.target.value,
            "loading_policy": request.policy.value,
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                       for t in request.inputs],
            # What the caller asked parity to hold to, and on which rows (checked, not claims).
            "parity_tolerance": request.parity_tolerance,
            "sample_input": request.sample_record(),
            "keep_training_state": request.keep_training_state,
        },
        "sandbox": {
            "image_id": result.outcome.image_id,
            "runtime": result.outcome.runtime,
            "limits": {"memory_bytes": policy.memory_bytes, "nano_cpus": policy.nano_cpus,
                       "pids": policy.pids_limit, "output_bytes": policy.output_bytes,
                       "deadline_seconds": request.deadline_seconds},
            "weakened": sorted(policy.weakened),
        },
        "verdicts": {
            # The output passed the broker's own validators (it is never signed otherwise).
            "validation": "passed",
            "assurance": result.assurance,
            "integrity_note": result.integrity_note,
            # The broker's judgement (jobs.executed_artifact_code), as the result header says.
            "executed_artifact_code": result.executed_artifact_code,
        },
        "conversion": claims(report),
    }
    return single_file_statement(OUTPUT_NAMES[output.format], output.sha256, record)


def single_file_statement(name: str, sha256: str, record: dict[str, Any]) -> dict[str, Any]:
    """model-signing's view of a single file: one resource named "." (the path relative to
    itself, so any file name verifies), and a subject digest over the resources' digests;
    ``record`` rides in the predicate."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name,
                     "digest": {"sha256": hashlib.sha256(bytes.fromhex(sha256)).hexdigest()}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256",
                              "allow_symlinks": False, "ignore_paths": []},
            "resources": [{"name": ".", "algorithm": "sha256", "digest": sha256}],
            RECORD_FIELD: record,
        },
    }


def _output(output: ValidatedOutput) -> dict[str, Any]:
    """What the broker validated: for safetensors, also which tensors (by the digest of their
    names) and how many bytes of data, so that an index can be checked against the files
    (index_attestation.py)."""
    doc: dict[str, Any] = {"name": OUTPUT_NAMES[output.format], "sha256": output.sha256,
                           "size": output.size, "format": output.format.value}
    info = output.safetensors
    if info is not None:
        doc["tensors"] = {"count": info.tensor_count, "data_bytes": info.data_bytes,
                          "names_sha256": info.names_sha256}
    return doc


def sign(doc: dict[str, Any], key: SigningKey) -> bytes:
    """A Sigstore bundle (JSON) with a DSSE envelope over ``doc``, signed with ``key``."""
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                         allow_nan=False).encode()
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        # Key-signed: the verifier brings the public key; the hint only names it.
        "verificationMaterial": {"publicKey": {"hint": key.fingerprint}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode("ascii"),
                            "keyid": key.fingerprint}],
        },
    }
    return json.dumps(bundle, separators=(",", ":")).encode()

"""Signed provenance for every output: an in-toto Statement in a DSSE envelope.

Why not OpenSSF ``model-signing``: it signs what it hashes itself, so signing a 400 MB output
would read it once more on the hot path (the broker already has the output's sha256 from
validation), its only way around that is its private ``_signing`` API, its predicate has no
room for how the output was made, and it would pull sigstore and pyOpenSSL into the client.
Its bundle is a DSSE envelope around an in-toto Statement signed with ECDSA P-256 anyway; this
module writes that same standard pair (DSSE v1 + in-toto Statement v1) directly with
``cryptography``, with the output as the subject and Airlock's record as the predicate.

Everything in the record that came from the sandbox (loader, converter, versions, parity) is
the worker's claim, capped and made printable; the broker's own observations (hashes, sizes,
formats, image, runtime, limits, verdicts) are marked as such by where they sit.
"""

from __future__ import annotations

import base64
import json
import math
import time
from importlib import metadata
from typing import Any

from airlock_broker.jobs import JobRequest, JobResult, sanitize
from airlock_broker.keys import SigningKey
from airlock_sandbox.contract import OUTPUT_NAMES
from airlock_sandbox.policy import SandboxPolicy

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://github.com/airlock/airlock/provenance/v1"
RECORD_VERSION = 1


def broker_version() -> str:
    try:
        return metadata.version("airlock")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def statement(result: JobResult, request: JobRequest, policy: SandboxPolicy, *,
              created: float | None = None, version: str | None = None) -> dict[str, Any]:
    """The in-toto Statement for one successful job."""
    output = result.output
    report = result.report
    predicate = {
        "record_version": RECORD_VERSION,
        "broker": {"name": "airlock", "version": version or broker_version()},
        "job_id": result.job_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created or time.time())),
        "input": {
            "sha256": result.input_sha256,
            "size": result.input_size,
            "declared_format": request.declared_format or "",
            "detected_format": result.detected_format.value,
            # The worker's refinement (e.g. which zip layout); a claim, like all of "conversion".
            "refined_format": sanitize(report.get("detected_format", ""), 32),
        },
        "output": {
            "name": OUTPUT_NAMES[output.format],
            "sha256": output.sha256,
            "size": output.size,
            "format": output.format.value,
        },
        "request": {
            "target": request.target.value,
            "loading_policy": request.policy.value,
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                       for t in request.inputs],
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
        },
        "conversion": _claims(report),
    }
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": OUTPUT_NAMES[output.format], "digest": {"sha256": output.sha256}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def _claims(report: dict[str, Any]) -> dict[str, Any]:
    """What the worker said about its work: untrusted, so typed, capped and printable."""
    versions = report.get("versions")
    parity = report.get("parity")
    return {
        "loader": sanitize(report.get("loader", ""), 80),
        "converter": sanitize(report.get("converter", ""), 80),
        "executed_artifact_code": report.get("executed_artifact_code") is True,
        "versions": ({sanitize(k, 40): sanitize(v, 40) for k, v in list(versions.items())[:32]}
                     if isinstance(versions, dict) else {}),
        "parity": [{"output_name": sanitize(p.get("output_name", ""), 80),
                    "max_abs_diff": _finite(p.get("max_abs_diff")),
                    "passed": p.get("passed") is True}
                   for p in (parity if isinstance(parity, list) else [])[:16]
                   if isinstance(p, dict)],
    }


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def sign(doc: dict[str, Any], key: SigningKey) -> bytes:
    """A DSSE envelope (compact JSON) over ``doc``, signed with ``key``."""
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                         allow_nan=False).encode()
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": key.fingerprint,
                        "sig": base64.b64encode(signature).decode("ascii")}],
    }
    return json.dumps(envelope, separators=(",", ":")).encode()

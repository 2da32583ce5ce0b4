"""Signed results and a fake sandbox for the migration and safe-load unit tests.

The provenance is real: envelopes are made by the broker's own signer with a fresh key, so the
client's verifier checks them exactly as it checks the broker's.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.api.auth import Principal
from airlock_broker.api.provenance import sign, statement
from airlock_broker.api.wire import result_message
from airlock_broker.conversion.jobs import JobRequest, JobResult
from airlock_broker.conversion.outputs import ValidatedOutput
from airlock_broker.sandboxes.sandbox import Outcome as SandboxOutcome
from airlock_broker.security.keys import SigningKey
from airlock_client import ConversionError, ConversionReport, ConversionResult, provenance
from airlock_client import _wire as client_wire
from airlock_client._twin import bundle_sha256
from airlock_sandbox.contract import LoadingPolicy, OutputFormat, Target
from airlock_sandbox.formats import ArtifactFormat
from airlock_sandbox.policy import SandboxPolicy


def tiny_onnx(bias: float = 1.0) -> bytes:
    """y = x + bias over float32[N, 2]: a real model onnxruntime can run."""
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("Add", ["x", "b"], ["y"])
    graph = helper.make_graph(
        [node], "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(np.full(2, bias, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def tiny_safetensors() -> bytes:
    from safetensors.numpy import save

    return bytes(save({"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                       "b": np.ones(3, dtype=np.float64)}))


def envelope(key: SigningKey, output: bytes, fmt: str, source: bytes = b"source bytes",
             assurance: str = "format_safe_only", *, subject: str = "",
             source_sha256: str | None = None, principal: str = "migrator",
             record_version: int = 3, executed: bool = False) -> bytes:
    """A broker-signed provenance for ``output``: converted from ``source`` (or from bytes
    whose sha256 is ``source_sha256``), asked for by ``principal`` with ``subject``.
    ``record_version=1`` signs the record as Airlock did before subjects."""
    result = _result(output, fmt, source, assurance, source_sha256, executed)
    doc = statement(result, _request(subject), SandboxPolicy(), version="test",
                    principal=Principal(principal, "token", frozenset()))
    if record_version == 1:
        record = doc["predicate"]["airlock"]
        record["record_version"] = 1
        del record["principal"], record["input"]["subject"]
    return sign(doc, key)


def answer(key: SigningKey, output: bytes, fmt: str, source: bytes = b"source bytes", *,
           subject: str = "") -> tuple[pb.ConvertResult, pb.ConvertMetadata]:
    """The broker's answer to a conversion of ``source`` into ``output`` (its result header,
    made by the broker's own wire code, with the signed provenance) and the request the client
    sent for it."""
    result = _result(output, fmt, source)
    signed = sign(statement(result, _request(subject), SandboxPolicy(), version="test",
                            principal=Principal("migrator", "token", frozenset())), key)
    header = result_message(result, signed).result
    asked = client_wire.metadata(size=len(source), sha256="", target="auto",
                                 policy="allow_code", declared=None, inputs=(),
                                 idempotency_key="", filename="model", timeout_seconds=60,
                                 subject=subject).metadata
    return header, asked


def _result(output: bytes, fmt: str, source: bytes, assurance: str = "format_safe_only",
            source_sha256: str | None = None, executed: bool = False) -> JobResult:
    out_format = OutputFormat.ONNX if fmt == "onnx" else OutputFormat.SAFETENSORS
    validated = ValidatedOutput(format=out_format, size=len(output),
                                sha256=hashlib.sha256(output).hexdigest(),
                                path=Path("/nonexistent"),
                                write_into=lambda fd: os.ftruncate(fd, os.pwrite(fd, output, 0)))
    return JobResult(
        job_id="job-1", detected_format=ArtifactFormat.PICKLE,
        input_sha256=source_sha256 or hashlib.sha256(source).hexdigest(),
        input_size=len(source),
        output=validated, outcome=SandboxOutcome(
            exit_code=0, oom_killed=False, timed_out=False, duration_seconds=0.1,
            image_id="sha256:" + "ab" * 32, runtime="runc"),
        policy=LoadingPolicy.ALLOW_CODE,
        report={"loader": "fake", "executed_artifact_code": executed}, assurance=assurance,
        executed_artifact_code=executed)


def _request(subject: str) -> JobRequest:
    return JobRequest(job_id="job-1", declared_format="", target=Target.AUTO, subject=subject)


def source_dir(dest: Path, uri: str) -> Path:
    """What ``fetch`` downloads for a source version: a small MLflow model directory whose
    bytes (hence bundle sha256) differ per version."""
    dest.mkdir(parents=True)
    (dest / "MLmodel").write_text("flavors:\n  python_function: {}\n")
    (dest / "model.pkl").write_text(uri)
    return dest


@dataclass
class FakeSandbox:
    """``fetch`` and ``convert`` for ``Migration``: behaviour chosen per source version.

    ``plan[(name, version)]`` is "onnx" / "safetensors" (converted), a ``ConversionError``,
    or ``ServiceUnavailable`` to raise. Unlisted versions convert to ONNX. The provenance is
    what the broker signs: the sha256 of the bundle the client would send, and the subject.
    """

    key: SigningKey
    plan: dict[tuple[str, str], Any] = field(default_factory=dict)
    fetched: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    #: (name, version) whose conversion ran the artifact's code in the sandbox (allow_code)
    executed: set[tuple[str, str]] = field(default_factory=set)

    def fetch(self, uri: str, dest: Path) -> Path:
        self.fetched.append(uri)
        return source_dir(dest, uri)

    def convert(self, model_dir: Path, output: Path, subject: str) -> ConversionResult:
        uri = (model_dir / "model.pkl").read_text()
        self.converted.append(uri)
        self.subjects.append(subject)
        name, _, version = uri.removeprefix("models:/").rpartition("/")
        action = self.plan.get((name, version), "onnx")
        if isinstance(action, Exception):
            raise action
        data = tiny_onnx(float(version)) if action == "onnx" else tiny_safetensors()
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(data)
        signed = envelope(self.key, data, action, subject=subject,
                          source_sha256=bundle_sha256(model_dir, output.parent),
                          executed=(name, version) in self.executed)
        record = provenance.verify(data, signed, self.key.public_pem.encode())
        return ConversionResult(
            job_id="job-1", output=output, format=action, sha256=record.output_sha256,
            size=len(data), input_sha256=record.input_sha256, input_size=record.input_size,
            detected_format="pickle", assurance="format_safe_only", loading_policy="allow_code",
            duration_seconds=0.1, image_id="sha256:ab", runtime="runc",
            report=ConversionReport(executed_artifact_code=(name, version) in self.executed),
            provenance=signed, provenance_record=record)


def rejected(reason: str = "POLICY_VIOLATION", message: str = "refused") -> ConversionError:
    return ConversionError(reason, message, kind="rejected", code="FAILED_PRECONDITION")


def failed(reason: str = "SANDBOX_TIMEOUT", message: str = "too slow") -> ConversionError:
    return ConversionError(reason, message, kind="failed", code="DEADLINE_EXCEEDED")


def plant_twin(registry: Any, key: SigningKey, source: str, version: str, data: bytes,
               signed: bytes, target_suffix: str = "-airlock") -> Any:
    """What an attacker with write access to the registry does: register ``data`` and its
    provenance (validly signed by ``key``: the broker signs whatever anyone sends it) as a new
    version of ``<source>-airlock``, with every tag a real twin of ``source``/``version``
    carries, all consistent with the signed record."""
    from airlock_client import _lineage as tags
    from tests.unit.fake_registry import FakeVersion

    record = provenance.verify(data, signed, key.public_pem.encode())
    target = f"{source}{target_suffix}"
    if target not in registry.models:
        registry.create_registered_model(target, tags={tags.ROLE: tags.ROLE_MIGRATED,
                                                       tags.SOURCE_MODEL: source})
    run_id = f"forged{len(registry.runs) + 1}"
    name = tags.OUTPUT_FILES[record.output_format]
    registry.runs[run_id] = {"tags": {}, "status": "FINISHED", "artifacts": {
        f"model/{name}": data, f"model/{name}{tags.PROVENANCE_SUFFIX}": signed}}
    mv = FakeVersion(target, str(len(registry.versions[target]) + 1), {
        tags.SOURCE_MODEL: source, tags.SOURCE_VERSION: version,
        tags.SOURCE_SHA256: record.input_sha256, tags.OUTPUT_SHA256: record.output_sha256,
        tags.OUTPUT_FORMAT: record.output_format, tags.OUTPUT_FILE: name,
        tags.PROVENANCE_FILE: f"{name}{tags.PROVENANCE_SUFFIX}",
        tags.VERDICT: record.assurance, tags.VALIDATION: record.validation,
        tags.JOB_ID: record.job_id, tags.PROVENANCE_KEY: record.key_fingerprint},
        run_id=run_id, source=f"fake-artifacts:/{run_id}/model")
    registry.versions[target].append(mv)
    return mv


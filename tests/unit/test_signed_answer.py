"""The client takes the broker's answer only as the job it asked for, as the broker signed it
(airlock_client/_signed_answer.py): a request or a result header rewritten on the channel
(cleartext, or a proxy that ends TLS) writes nothing, on the streaming path and on the
same-host one. An index's record verifies as an index only, and the record says whether
artifact code ran as the broker judged it, not as the sandbox said."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.api import index_attestation
from airlock_broker.api.auth import Principal
from airlock_broker.api.provenance import sign, single_file_statement, statement
from airlock_broker.api.wire import result_message
from airlock_broker.conversion.jobs import JobRequest, JobResult, refined_format
from airlock_broker.conversion.outputs import ValidatedOutput
from airlock_broker.sandboxes.sandbox import Outcome
from airlock_broker.security.keys import SigningKey, create_key
from airlock_broker.validation.safetensors_canonical import names_digest
from airlock_client import ProvenanceError, _client, _local_transfer, _wire, provenance
from airlock_client._converted_file import result_document
from airlock_sandbox.contract import LoadingPolicy, OutputFormat, Target, TensorSpec
from airlock_sandbox.formats import ArtifactFormat
from airlock_sandbox.policy import SandboxPolicy
from tests.conftest import run_cli

#: A protocol-0 pickle: printable text, so a sandbox checking it as text passes it.
PICKLE = b"cos\nsystem\n(S'echo pwned'\ntR."
ONNX = b"\x08\x07" + b"pretend this is a validated ONNX model" * 10
CALLER = Principal("alice", "token", frozenset())


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return create_key(tmp_path_factory.mktemp("state") / "key.pem")


def _asked(**overrides: Any) -> pb.ConvertMetadata:
    """What the client sends for a pickle, asking for safe_only ONNX with a subject."""
    options: dict[str, Any] = dict(size=len(PICKLE), sha256="", target="auto",
                                   policy="safe_only", declared=None, inputs=(),
                                   idempotency_key="", filename="model.pkl",
                                   timeout_seconds=60, subject="/home/alice/model.pkl")
    options.update(overrides)
    return _wire.metadata(**options).metadata


def _job(output: bytes = ONNX, *, fmt: OutputFormat = OutputFormat.ONNX,
         detected: ArtifactFormat = ArtifactFormat.PICKLE, declared: str | None = None,
         target: Target = Target.AUTO, policy: LoadingPolicy = LoadingPolicy.SAFE_ONLY,
         subject: str = "/home/alice/model.pkl", parity_tolerance: float = 0.0,
         executed: bool = False, said_executed: bool | None = None,
         passed: bool = True, inputs: tuple[TensorSpec, ...] = (),
         keep_training_state: bool = False) -> tuple[JobResult, JobRequest]:
    """A job the broker did: its result and the request it was for."""
    validated = ValidatedOutput(format=fmt, size=len(output),
                                sha256=hashlib.sha256(output).hexdigest(),
                                path=Path("/nonexistent"),
                                write_into=lambda fd: os.ftruncate(fd, os.pwrite(fd, output, 0)))
    outcome = Outcome(exit_code=0, oom_killed=False, timed_out=False, duration_seconds=0.1,
                      image_id="sha256:" + "ab" * 32, runtime="runc")
    report = {"loader": "skops", "converter": "skl2onnx",
              "executed_artifact_code": executed if said_executed is None else said_executed,
              "parity": [{"output_name": "label", "max_abs_diff": 0.0, "passed": passed}],
              "warnings": ["parity ran on generated rows only: pass --sample-input"],
              "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 4]}],
              "tensor_count": 3}
    result = JobResult(job_id="job-1", detected_format=detected,
                       input_sha256=hashlib.sha256(PICKLE).hexdigest(), input_size=len(PICKLE),
                       output=validated, outcome=outcome, policy=policy, report=report,
                       executed_artifact_code=executed)
    request = JobRequest(job_id="job-1", declared_format=declared, target=target, policy=policy,
                         subject=subject, parity_tolerance=parity_tolerance, inputs=inputs,
                         keep_training_state=keep_training_state)
    return result, request


def _answer(key: SigningKey, result: JobResult, request: JobRequest) -> pb.ConvertResult:
    """The broker's result header for the job, with its signed record (the broker's code)."""
    signed = sign(statement(result, request, SandboxPolicy(), principal=CALLER), key)
    header: pb.ConvertResult = result_message(result, signed).result
    return header


def _stream(tmp_path: Path, key: SigningKey, header: pb.ConvertResult, output: bytes,
            asked: pb.ConvertMetadata) -> Path:
    """The streaming path's receiving end, given the answer; returns where it writes."""
    target = tmp_path / "model.onnx"
    responses: Iterator[pb.ConvertResponse] = iter([
        pb.ConvertResponse(result=header),
        pb.ConvertResponse(chunk=pb.Chunk(data=output, crc32=zlib.crc32(output)))])
    _client._receive(responses, target, asked, hashlib.sha256(PICKLE), key.public_pem, "pinned")
    return target


def _local(tmp_path: Path, key: SigningKey, header: pb.ConvertResult, output: bytes,
           asked: pb.ConvertMetadata, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The same-host path's end, given the answer: the broker wrote ``output`` into the
    descriptor the client handed over."""
    target = tmp_path / "model.onnx"
    header.transfer = "local"

    def hand_over(socket: Path, ticket: str, in_fd: int, out_fd: int, **_: Any) -> None:
        os.pwrite(out_fd, output, 0)

    class Stub:
        def Convert(self, requests: Iterator[pb.ConvertRequest],
                    **_: Any) -> Iterator[pb.ConvertResponse]:
            return iter([pb.ConvertResponse(result=header)])

    monkeypatch.setattr(_local_transfer, "open_ticket", lambda *_: pb.OpenLocalTransferResponse(
        ticket="t", socket_path=str(tmp_path / "transfer.sock")))
    monkeypatch.setattr(_local_transfer, "hand_over", hand_over)
    source = tmp_path / "model.pkl"
    source.write_bytes(PICKLE)
    with source.open("rb") as fh:
        _local_transfer.convert_local(Stub(), (), fh.fileno(), target,
                                      pb.ConvertRequest(metadata=asked), len(PICKLE), None, 60,
                                      key.public_pem, "pinned")
    return target


PATHS: dict[str, Callable[..., Path]] = {
    "stream": lambda tmp, key, header, output, asked, mp: _stream(tmp, key, header, output,
                                                                  asked),
    "local": _local}


@pytest.mark.parametrize("path", PATHS)
def test_an_answer_to_the_job_asked_for_is_taken(
        path: str, key: SigningKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = _answer(key, *_job())
    written = PATHS[path](tmp_path, key, header, ONNX, _asked(), monkeypatch)
    assert written.read_bytes() == ONNX


#: What an on-path attacker changed in the request, and what the client was sent back for it.
REWRITTEN = {
    # allow_code for safe_only: the broker ran the pickle's code, and signed that it did.
    "policy": (dict(policy=LoadingPolicy.ALLOW_CODE, executed=True), "loading policy"),
    "subject": (dict(subject="models:/fraud/3"), "subject"),
    "parity_tolerance": (dict(parity_tolerance=0.5), "parity tolerance"),
    "target": (dict(target=Target.SAFETENSORS, fmt=OutputFormat.SAFETENSORS), "target"),
    # What the output is made of: its inputs' types and shapes, a checkpoint's training state.
    "inputs": (dict(inputs=(TensorSpec("input", "float64", (1, 3)),)), "input specs"),
    "keep_training_state": (dict(keep_training_state=True), "training state kept"),
    # declared text: the sandbox checked the pickle as text and the broker carried it back
    # unchanged, signed as a data file; the header says it is the ONNX asked for.
    "declared_text": (dict(output=PICKLE, fmt=OutputFormat.DATA, detected=ArtifactFormat.DATA_TEXT,
                           declared="text", target=Target.DATA), "declared format"),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rewrite", REWRITTEN)
def test_an_answer_to_a_request_rewritten_on_its_way_writes_nothing(
        path: str, rewrite: str, key: SigningKey, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    changed, what = REWRITTEN[rewrite]
    output = changed.get("output", ONNX)
    header = _answer(key, *_job(**changed))
    # The attacker also makes the header say what the client expects.
    header.output_format = pb.TARGET_FORMAT_ONNX
    header.loading_policy = pb.LOADING_POLICY_SAFE_ONLY
    header.assurance = pb.ASSURANCE_INTEGRITY_VERIFIED
    header.report.executed_artifact_code = False
    with pytest.raises(ProvenanceError) as caught:
        PATHS[path](tmp_path, key, header, output, _asked(), monkeypatch)
    assert caught.value.reason == "REQUEST_MISMATCH", caught.value
    assert f"whose {what} is" in caught.value.message
    assert os.listdir(tmp_path) in ([], ["model.pkl"])  # nothing written, no leftover


#: A field of the header changed on its way back, the record left as the broker signed it.
HEADER_LIES = {
    "assurance": lambda h: setattr(h, "assurance", pb.ASSURANCE_INTEGRITY_VERIFIED),
    "executed": lambda h: setattr(h.report, "executed_artifact_code", False),
    "policy": lambda h: setattr(h, "loading_policy", pb.LOADING_POLICY_SAFE_ONLY),
    "parity": lambda h: setattr(h.report.parity[0], "passed", True),
    "runtime": lambda h: setattr(h, "runtime", "runsc"),
    # What the header alone said before record version 5: a warning taken out, the output's
    # inputs or tensor count changed (the model served with other types than it has).
    "warnings": lambda h: h.report.ClearField("warnings"),
    "inputs": lambda h: setattr(h.report.inputs[0], "dtype", "float64"),
    "tensor_count": lambda h: setattr(h.report, "tensor_count", 4),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lie", HEADER_LIES)
def test_a_result_header_that_is_not_its_record_writes_nothing(
        path: str, lie: str, key: SigningKey, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # An allow_code job that ran the artifact's code and failed parity, which the client
    # asked for as such: only the header is changed.
    header = _answer(key, *_job(policy=LoadingPolicy.ALLOW_CODE, executed=True, passed=False))
    HEADER_LIES[lie](header)
    with pytest.raises(ProvenanceError) as caught:
        PATHS[path](tmp_path, key, header, ONNX, _asked(policy="allow_code"), monkeypatch)
    assert caught.value.reason == "RESULT_MISMATCH", caught.value
    assert os.listdir(tmp_path) in ([], ["model.pkl"])


def test_what_the_result_reports_is_the_records_where_the_record_says(
        key: SigningKey, tmp_path: Path) -> None:
    header = _answer(key, *_job(policy=LoadingPolicy.ALLOW_CODE, executed=True))
    header.report.loader = "numpy.load"  # an on-path rewrite of the sandbox's words
    header.report.parity[0].max_abs_diff = 0.0
    header.report.parity[0].tolerance = "atol 1e-9"
    header.report.versions["skl2onnx"] = "9.9"
    header.report.warnings.append("an on-path word")  # also held to the record (version 5)
    header.report.ClearField("warnings")
    header.report.warnings.append("parity ran on generated rows only: pass --sample-input")
    responses = iter([pb.ConvertResponse(result=header),
                      pb.ConvertResponse(chunk=pb.Chunk(data=ONNX, crc32=zlib.crc32(ONNX)))])
    got = _client._receive(responses, tmp_path / "model.onnx", _asked(policy="allow_code"),
                           hashlib.sha256(PICKLE), key.public_pem, "pinned")
    assert got.report.loader == "skops" and got.report.versions == {}
    assert [(p.output_name, p.tolerance, p.passed) for p in got.report.parity] == [
        ("label", "", True)]
    assert got.report.executed_artifact_code is True and got.format == "onnx"
    assert got.report.warnings == ("parity ran on generated rows only: pass --sample-input",)
    assert [(t.name, t.dtype, t.shape) for t in got.report.inputs] == [
        ("input", "float32", (-1, 4))]
    assert got.report.tensor_count == 3


def test_the_header_and_the_record_repeat_a_hostile_report_alike(key: SigningKey) -> None:
    # Whatever a subverted sandbox reports, the broker says it the same way in both places,
    # so that an honest answer is never taken for a rewritten one.
    result, request = _job()
    result.report.update({
        "warnings": ["\x1b[2Jcleared", "x" * 1000, 7, None, *(f"w{i}" for i in range(40))],
        "inputs": [{"name": "in\n1", "dtype": 5, "shape": [None, True, 2**70, -(2**70), "3"]},
                   "not a spec", *({"name": f"i{i}", "shape": [1] * 20} for i in range(99))],
        "tensor_count": -5,
        "parity": [{"output_name": "y", "max_abs_diff": float("nan"), "max_rel_diff": "1",
                    "samples": 2**40, "passed": 1}]})
    header = _answer(key, result, request)
    record = provenance.verify(ONNX, bytes(header.provenance), key.public_pem)
    claims = record.conversion
    assert list(header.report.warnings) == claims["warnings"] and len(claims["warnings"]) == 16
    assert claims["warnings"][0] == "?[2Jcleared" and claims["warnings"][1].endswith("...")
    assert [(t.name, t.dtype, list(t.shape)) for t in header.report.inputs] == [
        (c["name"], c["dtype"], c["shape"]) for c in claims["inputs"]]
    assert len(claims["inputs"]) == 63  # of the first 64, one was not a spec
    assert claims["inputs"][0]["shape"] == [0, 0, 2**31 - 1, -(2**62), 0]
    assert len(claims["inputs"][1]["shape"]) == 8
    assert header.report.tensor_count == claims["tensor_count"] == 0
    assert header.report.parity[0].samples == claims["parity"][0]["samples"] == 2**31 - 1
    assert claims["parity"][0]["max_abs_diff"] is None  # NaN in the header: not JSON
    assert not header.report.parity[0].passed and not claims["parity"][0]["passed"]


@pytest.mark.parametrize("path", PATHS)
def test_a_detected_format_the_record_does_not_name_writes_nothing(
        path: str, key: SigningKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = _answer(key, *_job())
    header.detected_format = "safetensors"  # a pickle, made to look like weights
    with pytest.raises(ProvenanceError) as caught:
        PATHS[path](tmp_path, key, header, ONNX, _asked(), monkeypatch)
    assert caught.value.reason == "RESULT_MISMATCH" and "detected format" in str(caught.value)


@pytest.mark.parametrize("path", PATHS)
def test_a_refinement_the_broker_refused_is_no_detected_format_the_header_may_say(
        path: str, key: SigningKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A subverted sandbox says the pickle was safetensors; the broker refuses the rename
    # (jobs.refined_format) and says "pickle". The record named the claim, and a header
    # rewritten to it was taken: a pickle reported as weights.
    result, request = _job()
    result.report["detected_format"] = "safetensors"
    result = replace(result, reported_format=refined_format(result.detected_format,
                                                             result.report))
    header = _answer(key, result, request)
    assert header.detected_format == "pickle"
    header.detected_format = "safetensors"
    with pytest.raises(ProvenanceError) as caught:
        PATHS[path](tmp_path, key, header, ONNX, _asked(), monkeypatch)
    assert caught.value.reason == "RESULT_MISMATCH" and "detected format" in str(caught.value)
    assert os.listdir(tmp_path) in ([], ["model.pkl"])


@pytest.mark.parametrize(("detected", "claimed"), [(ArtifactFormat.ZIP, "pytorch_zip"),
                                                   (ArtifactFormat.MLFLOW, "mlflow:sklearn")])
def test_a_refinement_the_broker_took_is_the_detected_format_reported(
        detected: ArtifactFormat, claimed: str, key: SigningKey, tmp_path: Path) -> None:
    result, request = _job(detected=detected)
    result.report["detected_format"] = claimed
    result = replace(result, reported_format=refined_format(detected, result.report))
    got = _client._receive(
        iter([pb.ConvertResponse(result=_answer(key, result, request)),
              pb.ConvertResponse(chunk=pb.Chunk(data=ONNX, crc32=zlib.crc32(ONNX)))]),
        tmp_path / "model.onnx", _asked(), hashlib.sha256(PICKLE), key.public_pem, "pinned")
    assert got.detected_format == claimed


def test_a_difference_that_is_no_number_or_a_proxys_duration_leaves_convert_json_json(
        key: SigningKey, tmp_path: Path) -> None:
    # A sandbox's parity difference that is NaN (the record: null; the client: NaN), and a
    # duration an on-path rewrite made infinite (the header's word alone): `airlock convert
    # --json` printed NaN and Infinity, which strict JSON readers (jq, JSON.parse) refuse.
    result, request = _job()
    result.report["parity"] = [{"output_name": "label", "max_abs_diff": float("nan"),
                                "max_rel_diff": float("inf"), "passed": False}]
    header = _answer(key, result, request)
    header.duration_seconds = float("inf")
    got = _client._receive(
        iter([pb.ConvertResponse(result=header),
              pb.ConvertResponse(chunk=pb.Chunk(data=ONNX, crc32=zlib.crc32(ONNX)))]),
        tmp_path / "model.onnx", _asked(), hashlib.sha256(PICKLE), key.public_pem, "pinned")

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    doc = json.loads(json.dumps(result_document(got, tmp_path / "p.json")),
                     parse_constant=refuse)
    assert doc["parity"][0]["max_abs_diff"] is None and doc["parity"][0]["max_rel_diff"] is None
    assert doc["parity"][0]["passed"] is False and doc["duration_seconds"] == 0.0


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_an_older_brokers_answer_is_still_taken(version: int, key: SigningKey,
                                                tmp_path: Path) -> None:
    result, request = _job()
    doc = statement(result, request, SandboxPolicy(), principal=CALLER)
    record = doc["predicate"]["airlock"]
    record["record_version"] = version
    for claim in ("warnings", "inputs", "tensor_count"):  # the header's word alone then
        del record["conversion"][claim]
    if version < 4:
        del record["verdicts"]["executed_artifact_code"]
        del record["request"]["keep_training_state"]
    if version < 3:
        del record["request"]["parity_tolerance"], record["request"]["sample_input"]
    if version < 2:
        del record["principal"], record["input"]["subject"]
    header: pb.ConvertResult = result_message(result, sign(doc, key)).result
    written = _stream(tmp_path, key, header, ONNX, _asked())
    assert written.read_bytes() == ONNX
    header.report.tensor_count = 9  # unsigned before version 5: the header's word is taken
    assert _stream(tmp_path, key, header, ONNX, _asked()).read_bytes() == ONNX


def test_the_record_says_code_ran_when_the_broker_judged_so_whatever_the_sandbox_said(
        key: SigningKey, tmp_path: Path) -> None:
    # Under allow_code a pickle's code always runs: a subverted sandbox still says it did not.
    result, request = _job(policy=LoadingPolicy.ALLOW_CODE, executed=True, said_executed=False)
    signed = sign(statement(result, request, SandboxPolicy(), principal=CALLER), key)
    record = provenance.verify(ONNX, signed, key.public_pem)
    assert record.record_version >= 4
    assert record.executed_artifact_code is True
    assert record.conversion["executed_artifact_code"] is False  # the sandbox's word, kept
    out, pub = tmp_path / "model.onnx", tmp_path / "pub.pem"
    out.write_bytes(ONNX)
    provenance.write_provenance(out, signed)
    pub.write_text(key.public_pem)
    shown = _cli("verify", str(out), "--public-key", str(pub))
    assert shown.returncode == 0, shown.stderr
    assert "artifact code executed in sandbox: yes" in shown.stdout
    assert "  warning    parity ran on generated rows only: pass --sample-input\n" in shown.stdout


def test_an_older_record_says_whose_word_the_executed_flag_is(
        key: SigningKey, tmp_path: Path) -> None:
    result, request = _job(policy=LoadingPolicy.ALLOW_CODE, executed=True, said_executed=False)
    doc = statement(result, request, SandboxPolicy(), principal=CALLER)
    record_doc = doc["predicate"]["airlock"]
    record_doc["record_version"] = 3
    del record_doc["verdicts"]["executed_artifact_code"]
    signed = sign(doc, key)
    assert provenance.verify(ONNX, signed, key.public_pem).executed_artifact_code is None
    out, pub = tmp_path / "model.onnx", tmp_path / "pub.pem"
    out.write_bytes(ONNX)
    provenance.write_provenance(out, signed)
    pub.write_text(key.public_pem)
    shown = _cli("verify", str(out), "--public-key", str(pub))
    assert "executed in sandbox: no (the sandbox's word, record version 3)" in shown.stdout


def test_a_version_4_record_without_the_verdict_is_malformed(key: SigningKey) -> None:
    doc = statement(*_job(), SandboxPolicy(), principal=CALLER)
    del doc["predicate"]["airlock"]["verdicts"]["executed_artifact_code"]
    with pytest.raises(ProvenanceError) as caught:
        provenance.verify(ONNX, sign(doc, key), key.public_pem)
    assert caught.value.reason == "PROVENANCE_MALFORMED"


# -- an index's record is an index's only ------------------------------------------------------

def _index(key: SigningKey) -> tuple[bytes, bytes]:
    """A sharded directory's index JSON and the record AttestIndex signs for it."""
    names = ["w"]
    sha = hashlib.sha256(b"shard").hexdigest()
    shard = {"record_version": 4, "job_id": "job-1",
             "output": {"name": "model.safetensors", "sha256": sha, "size": 1000,
                        "format": "safetensors",
                        "tensors": {"count": 1, "data_bytes": 8,
                                    "names_sha256": names_digest(names)}},
             "verdicts": {"validation": "passed", "assurance": "integrity_verified"}}
    index = json.dumps({"metadata": {"total_size": 8, "note": "any text the caller wrote"},
                        "weight_map": {"w": "model-00001-of-00001.safetensors"}}).encode()
    signed = index_attestation.attest(
        index, [("model-00001-of-00001.safetensors",
                 sign(single_file_statement("model.safetensors", sha, shard), key))],
        "models:/fraud/3", key=key, principal=Principal("mallory", "token", frozenset()))
    return index, signed


def test_an_index_record_does_not_verify_a_model_file(key: SigningKey, tmp_path: Path) -> None:
    index, signed = _index(key)
    with pytest.raises(ProvenanceError) as caught:
        provenance.verify(index, signed, key.public_pem)
    assert caught.value.reason == "OUTPUT_KIND"
    record = provenance.verify(index, signed, key.public_pem, index=True)
    assert record.kind == provenance.INDEX_KIND
    with pytest.raises(ProvenanceError) as caught:
        provenance.verify(ONNX, sign(statement(*_job(), SandboxPolicy(), principal=CALLER),
                                     key), key.public_pem, index=True)
    assert caught.value.reason == "OUTPUT_KIND"
    # An index names no input: an expected source sha256 is never met by its record.
    with pytest.raises(ProvenanceError) as caught:
        provenance.check_source(record, sha256="")
    assert caught.value.reason == "SOURCE_MISMATCH"

    # The command: an index verifies under its own name, not as model.onnx.
    pub = tmp_path / "pub.pem"
    pub.write_text(key.public_pem)
    for name, code in (("model.onnx", 1), ("model.safetensors.index.json", 0)):
        path = tmp_path / name
        path.write_bytes(index)
        provenance.write_provenance(path, signed)
        shown = _cli("verify", str(path), "--public-key", str(pub))
        assert shown.returncode == code, shown.stdout + shown.stderr
    assert "OUTPUT_KIND" in _cli("verify", str(tmp_path / "model.onnx"), "--public-key",
                                 str(pub)).stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``airlock ARGS`` as a user runs it (verify with a pinned key asks no broker)."""
    return run_cli(*args, server="127.0.0.1:9")


def test_the_request_this_client_sent_is_what_is_compared(key: SigningKey) -> None:
    # The names the client sends are the names the broker records (one vocabulary).
    asked = _asked(declared="pickle", target="onnx", parity_tolerance=0.01)
    result, request = _job(declared="pickle", target=Target.ONNX, parity_tolerance=0.01)
    from airlock_client._signed_answer import signed_record

    record = signed_record(_answer(key, result, request), asked, key.public_pem)
    assert (record.declared_format, record.target, record.loading_policy) == (
        "pickle", "onnx", "safe_only")
    assert record.parity_tolerance == 0.01 and record.subject == asked.subject

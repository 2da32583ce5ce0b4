"""Signed provenance: the broker's signing (keys.py, provenance.py) against the client's
verification (airlock_client.provenance), and the client refusing a result it cannot verify."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from airlock_broker.api.auth import Principal
from airlock_broker.api.provenance import sign, statement
from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.jobs import JobRequest, JobResult
from airlock_broker.conversion.outputs import ValidatedOutput
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.sandboxes.sandbox import Outcome
from airlock_broker.security.keys import (
    SigningKey,
    SigningKeyError,
    create_key,
    load_key,
    load_or_create,
)
from airlock_client import Client, ProvenanceError, provenance
from airlock_sandbox.contract import LoadingPolicy, OutputFormat, Target
from airlock_sandbox.formats import ArtifactFormat
from airlock_sandbox.policy import SandboxPolicy
from tests.unit.fakes import FakeSandbox, running_broker
from tests.unit.test_broker import PICKLE, write_safetensors

OUTPUT = b"\x08\x07" + b"pretend this is a canonical ONNX model" * 10
INPUT = b"\x80\x04" + b"a pickle" * 20


def _result(output: bytes = OUTPUT, report: dict[str, Any] | None = None) -> JobResult:
    validated = ValidatedOutput(format=OutputFormat.ONNX, size=len(output),
                                sha256=hashlib.sha256(output).hexdigest(),
                                path=Path("/nonexistent"),
                                write_into=lambda fd: os.ftruncate(fd, os.pwrite(fd, output, 0)))
    outcome = Outcome(exit_code=0, oom_killed=False, timed_out=False, duration_seconds=0.1,
                      image_id="sha256:" + "ab" * 32, runtime="runc")
    return JobResult(job_id="job-1", detected_format=ArtifactFormat.PICKLE,
                     input_sha256=hashlib.sha256(INPUT).hexdigest(), input_size=len(INPUT),
                     output=validated, outcome=outcome, policy=LoadingPolicy.ALLOW_CODE,
                     report=report if report is not None else {
                         "loader": "joblib.load", "converter": "skl2onnx",
                         "executed_artifact_code": True,
                         "versions": {"skl2onnx": "1.20.0", "onnx": "1.23.2"},
                         "parity": [{"output_name": "label", "max_abs_diff": 0.0,
                                     "passed": True}]})


def _request(subject: str = "models:/fraud/3") -> JobRequest:
    return JobRequest(job_id="job-1", declared_format="pickle", target=Target.ONNX,
                      subject=subject)


CALLER = Principal("training-pipeline", "token", frozenset())


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return create_key(tmp_path / "state" / "key.pem")


def _public_pem(key: SigningKey) -> bytes:
    return key.public_pem.encode()


def _envelope(key: SigningKey, output: bytes = OUTPUT, **report: Any) -> bytes:
    return sign(statement(_result(output, report or None), _request(), SandboxPolicy(),
                          created=1_800_000_000, version="0.1.0", principal=CALLER), key)


def _reason(exc: pytest.ExceptionInfo[ProvenanceError]) -> str:
    return exc.value.reason


# -- round trip ------------------------------------------------------------------------------

def test_round_trip_bytes_and_file(key: SigningKey, tmp_path: Path) -> None:
    envelope = _envelope(key)
    record = provenance.verify(OUTPUT, envelope, _public_pem(key))
    assert record.output_sha256 == hashlib.sha256(OUTPUT).hexdigest()
    assert record.output_size == len(OUTPUT) and record.output_format == "onnx"
    assert record.input_sha256 == hashlib.sha256(INPUT).hexdigest()
    assert record.input_size == len(INPUT)
    assert (record.declared_format, record.detected_format) == ("pickle", "pickle")
    assert record.loading_policy == "allow_code" and record.target == "onnx"
    assert record.runtime == "runc" and record.image_id.startswith("sha256:abab")
    assert record.validation == "passed" and record.assurance == "format_safe_only"
    assert record.broker_version == "0.1.0" and record.job_id == "job-1"
    assert record.created == "2027-01-15T08:00:00Z"
    assert record.conversion["versions"] == {"skl2onnx": "1.20.0", "onnx": "1.23.2"}
    assert record.key_fingerprint == key.fingerprint == provenance.fingerprint(_public_pem(key))
    path = tmp_path / "model.onnx"
    path.write_bytes(OUTPUT)
    pub = tmp_path / "pub.pem"
    pub.write_text(key.public_pem)
    assert provenance.verify(path, envelope, pub) == record
    assert provenance.verify(str(path), envelope, key.public_pem) == record


def test_bundle_is_model_signing_format_over_the_known_digest(key: SigningKey) -> None:
    bundle = json.loads(_envelope(key))
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["verificationMaterial"] == {"publicKey": {"hint": key.fingerprint},
                                              "tlogEntries": []}
    envelope = bundle["dsseEnvelope"]
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    doc = json.loads(base64.b64decode(envelope["payload"]))
    assert doc["_type"] == "https://in-toto.io/Statement/v1"
    assert doc["predicateType"] == "https://model_signing/signature/v1.0"
    digest = hashlib.sha256(OUTPUT).hexdigest()
    assert doc["predicate"]["resources"] == [{"name": ".", "algorithm": "sha256",
                                              "digest": digest}]
    assert doc["subject"][0]["digest"]["sha256"] == \
        hashlib.sha256(bytes.fromhex(digest)).hexdigest()
    assert doc["predicate"]["airlock"]["output"]["sha256"] == digest


def test_model_signing_verifies_airlock_provenance(key: SigningKey, tmp_path: Path) -> None:
    """Interoperability: the OpenSSF library accepts the bundle for the file, and only it."""
    from model_signing import verifying

    model = tmp_path / "renamed-model.onnx"
    model.write_bytes(OUTPUT)
    sig = tmp_path / "model.onnx.provenance.json"
    sig.write_bytes(_envelope(key))
    pub = tmp_path / "pub.pem"
    pub.write_text(key.public_pem)
    verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(model, sig)
    model.write_bytes(OUTPUT[:-1] + bytes([OUTPUT[-1] ^ 1]))
    with pytest.raises(ValueError, match="mismatch"):
        verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(model, sig)


def test_plain_model_signing_signature_is_not_airlock_provenance(key: SigningKey,
                                                                 tmp_path: Path) -> None:
    from model_signing import hashing, signing

    model = tmp_path / "model.onnx"
    model.write_bytes(OUTPUT)
    sig = tmp_path / "model.sig"
    (signing.Config().use_elliptic_key_signer(private_key=key.path)
     .set_hashing_config(hashing.Config().use_file_serialization(hashing_algorithm="sha256"))
     .sign(model, sig))
    with pytest.raises(ProvenanceError) as exc:
        provenance.verify(model, sig.read_bytes(), _public_pem(key))
    assert _reason(exc) == "PROVENANCE_MALFORMED" and "Airlock" in exc.value.message


def test_hostile_worker_claims_are_capped_and_printable(key: SigningKey) -> None:
    envelope = _envelope(key, loader="\x1b[31m" + "x" * 5000, versions={"a\n": "b" * 900},
                         parity=[{"max_abs_diff": float("nan"), "output_name": 3}])
    record = provenance.verify(OUTPUT, envelope, _public_pem(key))
    assert len(record.conversion["loader"]) <= 83 and "\x1b" not in record.conversion["loader"]
    assert record.conversion["versions"] == {"a?": "b" * 40 + "..."}
    assert record.conversion["parity"][0]["max_abs_diff"] is None


# -- refusals --------------------------------------------------------------------------------

def _tamper_payload(envelope: bytes, change: Any) -> bytes:
    doc = json.loads(envelope)
    payload = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    change(payload)
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(doc).encode()


def test_tampered_record_is_refused(key: SigningKey) -> None:
    def lie(payload: dict[str, Any]) -> None:
        payload["predicate"]["airlock"]["verdicts"]["assurance"] = "integrity_verified"

    with pytest.raises(ProvenanceError) as exc:
        provenance.verify(OUTPUT, _tamper_payload(_envelope(key), lie), _public_pem(key))
    assert _reason(exc) == "SIGNATURE_INVALID"


def test_tampered_file_is_refused(key: SigningKey, tmp_path: Path) -> None:
    flipped = bytearray(OUTPUT)
    flipped[10] ^= 0x01
    with pytest.raises(ProvenanceError) as exc:
        provenance.verify(bytes(flipped), _envelope(key), _public_pem(key))
    assert _reason(exc) == "OUTPUT_MISMATCH" and "sha256" in exc.value.message
    path = tmp_path / "m.onnx"
    path.write_bytes(OUTPUT + b"\x00")
    with pytest.raises(ProvenanceError) as exc:
        provenance.verify(path, _envelope(key), _public_pem(key))
    assert _reason(exc) == "OUTPUT_MISMATCH"


def test_wrong_key_is_refused_and_named(key: SigningKey, tmp_path: Path) -> None:
    other = create_key(tmp_path / "other.pem")
    with pytest.raises(ProvenanceError) as exc:
        provenance.verify(OUTPUT, _envelope(key), _public_pem(other))
    assert _reason(exc) == "SIGNATURE_INVALID"
    assert key.fingerprint[:16] in exc.value.message


def test_signature_moved_to_another_keyid_does_not_help(key: SigningKey,
                                                        tmp_path: Path) -> None:
    other = create_key(tmp_path / "other.pem")
    doc = json.loads(_envelope(key))
    doc["dsseEnvelope"]["signatures"][0]["keyid"] = other.fingerprint
    doc["verificationMaterial"]["publicKey"]["hint"] = other.fingerprint
    with pytest.raises(ProvenanceError) as exc:
        provenance.verify(OUTPUT, json.dumps(doc).encode(), _public_pem(other))
    assert _reason(exc) == "SIGNATURE_INVALID"


@pytest.mark.parametrize(("mangle", "reason"), [
    (lambda e: b"", "PROVENANCE_MISSING"),
    (lambda e: e[: len(e) // 2], "PROVENANCE_MALFORMED"),
    (lambda e: os.urandom(300), "PROVENANCE_MALFORMED"),
    (lambda e: b"[1, 2, 3]", "PROVENANCE_MALFORMED"),
    (lambda e: b" " * (provenance.MAX_PROVENANCE_BYTES + 1), "PROVENANCE_MALFORMED"),
    (lambda e: e.replace(b'"payloadType"', b'"payloadType":"x","payloadType"'),
     "PROVENANCE_MALFORMED"),
    (lambda e: e.replace(b"application/vnd.in-toto+json", b"text/plain"),
     "PROVENANCE_MALFORMED"),
    (lambda e: e.replace(b"bundle.v0.3+json", b"bundle.v9+json"), "PROVENANCE_MALFORMED"),
    (lambda e: e.replace(b'"signatures":[', b'"signatures":[],"x":['), "PROVENANCE_MALFORMED"),
    (lambda e: e.replace(b'"sig":"', b'"sig":"!!'), "PROVENANCE_MALFORMED"),
])
def test_truncated_or_garbage_provenance_is_refused(key: SigningKey, mangle: Any,
                                                    reason: str) -> None:
    with pytest.raises(ProvenanceError) as exc:
        provenance.verify(OUTPUT, mangle(_envelope(key)), _public_pem(key))
    assert _reason(exc) == reason


def test_validly_signed_statement_of_another_kind_is_refused(key: SigningKey) -> None:
    doc = statement(_result(), _request(), SandboxPolicy(), principal=CALLER)
    doc["predicateType"] = "https://slsa.dev/provenance/v1"
    with pytest.raises(ProvenanceError) as exc:
        provenance.verify(OUTPUT, sign(doc, key), _public_pem(key))
    assert _reason(exc) == "PROVENANCE_MALFORMED"
    for path, value in ((("subject", 0, "digest", "sha256"), "0" * 64),
                        (("predicate", "resources", 0, "digest"), "0" * 64),
                        (("predicate", "resources", 0, "name"), "other.onnx"),
                        (("predicate", "airlock", "output", "sha256"), "0" * 64)):
        doc = statement(_result(), _request(), SandboxPolicy(), principal=CALLER)
        target: Any = doc
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        with pytest.raises(ProvenanceError) as exc:
            provenance.verify(OUTPUT, sign(doc, key), _public_pem(key))
        assert _reason(exc) == "PROVENANCE_MALFORMED", path


def test_public_keys_that_are_not_p256_are_refused(key: SigningKey, tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for bad in (p384, b"not a key", tmp_path / "missing.pem"):
        with pytest.raises(ProvenanceError) as exc:
            provenance.verify(OUTPUT, _envelope(key), bad)
        assert _reason(exc) == "BAD_PUBLIC_KEY"


# -- key management --------------------------------------------------------------------------

def test_generated_key_is_private_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "state" / "sub" / "key.pem"
    created, fresh = load_or_create(path)
    assert fresh
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["key.pem"]  # no temp file left
    again, fresh_again = load_or_create(path)
    assert not fresh_again and again.fingerprint == created.fingerprint


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    create_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        load_key(path)


def test_key_symlink_and_wrong_curve_are_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.pem"
    create_key(real)
    link = tmp_path / "link.pem"
    link.symlink_to(real)
    with pytest.raises(SigningKeyError):
        load_key(link)
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(p384, 0o600)
    with pytest.raises(SigningKeyError, match="P-256"):
        load_key(p384)


def test_a_hard_linked_key_is_refused(tmp_path: Path) -> None:
    # Another name for the key file may sit where its owner can swap what it points at.
    path = tmp_path / "key.pem"
    create_key(path)
    os.link(path, tmp_path / "other-name.pem")
    with pytest.raises(SigningKeyError, match=r"KEY_HARD_LINKED.*2 hard links"):
        load_key(path)


def test_create_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    first = create_key(path)
    with pytest.raises(FileExistsError):
        create_key(path)
    assert load_key(path).fingerprint == first.fingerprint


def test_key_location_defaults_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRLOCK_PROVENANCE_KEY", raising=False)
    monkeypatch.setenv("AIRLOCK_STATE_DIR", str(tmp_path / "st"))
    assert BrokerConfig().provenance_key_path == tmp_path / "st" / "provenance-signing-key.pem"
    monkeypatch.setenv("AIRLOCK_PROVENANCE_KEY", str(tmp_path / "k.pem"))
    assert BrokerConfig().provenance_key_path == tmp_path / "k.pem"
    toml = tmp_path / "airlock.toml"
    toml.write_text('[provenance]\nkey_path = "/srv/airlock/key.pem"\n')
    assert BrokerConfig.load(toml).provenance_key_path == Path("/srv/airlock/key.pem")
    toml.write_text('[provenance]\nkey = "x"\n')
    with pytest.raises(ValueError, match="provenance"):
        BrokerConfig.load(toml)


# -- the client, against a broker with a fake sandbox ----------------------------------------

def _broker_config(tmp_path: Path) -> BrokerConfig:
    # Integrity's second sandbox is not this file's subject (test_format_decision).
    return BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "spool",
                        pools=PoolSettings(min_warm=0), selftest_on_start=False,
                        provenance_key=tmp_path / "keys" / "broker.pem", verify_integrity=False)


def test_client_verifies_with_pinned_key_and_audit_names_it(tmp_path: Path) -> None:
    config = _broker_config(tmp_path)
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    with running_broker(config, FakeSandbox(config.spool_root, write_safetensors)) as broker:
        pub = tmp_path / "broker.pub.pem"
        pub.write_text(broker.signing_key.public_pem)
        with Client(f"127.0.0.1:{broker.port}", public_key=pub) as client:
            assert client.provenance_key().fingerprint == broker.signing_key.fingerprint
            result = client.convert(src, tmp_path / "out" / "m.safetensors")
    assert result.provenance_key_source == "pinned"
    assert result.provenance_record is not None
    assert result.provenance_record.output_sha256 == result.sha256
    record = provenance.verify(result.output, result.provenance, pub)
    assert record == result.provenance_record
    audit = json.loads((config.spool_root / "audit.jsonl").read_text().splitlines()[-1])
    assert audit["provenance_key"] == broker.signing_key.fingerprint
    assert audit["provenance_sha256"] == hashlib.sha256(result.provenance).hexdigest()


def test_client_pinned_to_another_key_writes_nothing(tmp_path: Path) -> None:
    config = _broker_config(tmp_path)
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    other = create_key(tmp_path / "other.pem")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with running_broker(config, FakeSandbox(config.spool_root, write_safetensors)) as broker, \
            Client(f"127.0.0.1:{broker.port}", public_key=other.public_pem) as client, \
            pytest.raises(ProvenanceError) as exc:
        client.convert(src, out_dir / "m.safetensors")
    assert exc.value.reason == "SIGNATURE_INVALID"
    assert list(out_dir.iterdir()) == []


# -- which model an output is: subject, source sha256, principal -----------------------------

def test_the_record_names_the_caller_the_subject_and_the_source_bytes(key: SigningKey) -> None:
    record = provenance.verify(OUTPUT, _envelope(key), _public_pem(key))
    assert record.record_version == 5
    assert record.subject == "models:/fraud/3"
    assert (record.principal, record.principal_method) == ("training-pipeline", "token")
    assert record.input_sha256 == hashlib.sha256(INPUT).hexdigest()
    signed = record.statement["predicate"]["airlock"]
    assert signed["principal"] == {"name": "training-pipeline", "method": "token"}
    assert signed["input"]["subject"] == "models:/fraud/3"


def test_check_source_binds_an_output_to_its_source(key: SigningKey) -> None:
    record = provenance.verify(OUTPUT, _envelope(key), _public_pem(key))
    source = hashlib.sha256(INPUT).hexdigest()
    provenance.check_source(record, subject="models:/fraud/3", sha256=source.upper(),
                            principals={"training-pipeline", "other"})
    refusals = [
        ({"subject": "models:/fraud/4"}, "SOURCE_MISMATCH"),
        ({"subject": "models:/fraud/3", "sha256": "0" * 64}, "SOURCE_MISMATCH"),
        ({"sha256": source, "principals": {"someone-else"}}, "PRINCIPAL_NOT_ALLOWED"),
        ({"principals": set()}, "PRINCIPAL_NOT_ALLOWED"),
    ]
    for expected, reason in refusals:
        with pytest.raises(ProvenanceError) as exc:
            provenance.check_source(record, **expected)
        assert _reason(exc) == reason, expected
    with pytest.raises(ValueError):
        provenance.check_source(record)


def test_an_unauthenticated_principal_is_never_an_allowed_one(key: SigningKey) -> None:
    doc = statement(_result(), _request(), SandboxPolicy(),
                    principal=Principal("anonymous", "none", frozenset()))
    record = provenance.verify(OUTPUT, sign(doc, key), _public_pem(key))
    assert (record.principal, record.principal_method) == ("anonymous", "none")
    with pytest.raises(ProvenanceError) as exc:
        provenance.check_source(record, principals={"anonymous"})
    assert _reason(exc) == "PRINCIPAL_NOT_ALLOWED"


def test_one_principal_given_as_a_string_is_a_name_not_its_letters(key: SigningKey) -> None:
    """``principals="training-pipeline-2"`` once matched "training-pipeline" as a substring."""
    record = provenance.verify(OUTPUT, _envelope(key), _public_pem(key))
    assert record.principal == "training-pipeline"
    provenance.check_source(record, principals="training-pipeline")
    with pytest.raises(ProvenanceError) as exc:
        provenance.check_source(record, principals="training-pipeline-2")
    assert _reason(exc) == "PRINCIPAL_NOT_ALLOWED"


def _version_1(doc: dict[str, Any]) -> dict[str, Any]:
    """The statement as Airlock signed it before subjects and principals (record version 1)."""
    record = doc["predicate"]["airlock"]
    record["record_version"] = 1
    del record["principal"], record["input"]["subject"]
    return doc


def test_records_of_version_1_still_verify_and_bind_by_sha256_only(key: SigningKey) -> None:
    doc = _version_1(statement(_result(), _request(), SandboxPolicy(), principal=CALLER))
    record = provenance.verify(OUTPUT, sign(doc, key), _public_pem(key))
    assert (record.record_version, record.subject, record.principal) == (1, "", "")
    source = hashlib.sha256(INPUT).hexdigest()
    provenance.check_source(record, sha256=source)
    provenance.check_source(record, subject="models:/fraud/3", sha256=source)
    for expected, reason in (({"subject": "models:/fraud/3"}, "SOURCE_MISMATCH"),
                             ({"sha256": source, "principals": {"x"}},
                              "PRINCIPAL_NOT_ALLOWED")):
        with pytest.raises(ProvenanceError) as exc:
            provenance.check_source(record, **expected)
        assert _reason(exc) == reason


# -- how closely it was checked: the parity tolerance, the sample, the differences measured ----

SAMPLE = b"\x93NUMPY" + b"rows of the caller's own" * 4


def test_the_record_carries_the_tolerance_the_sample_and_each_measured_difference(
        key: SigningKey) -> None:
    request = JobRequest(job_id="job-1", declared_format="pickle", target=Target.ONNX,
                         subject="models:/fraud/3", parity_tolerance=1e-4, sample_input=SAMPLE)
    report = {"parity_inputs": "sample", "parity": [
        {"output_name": "label", "samples": 20, "max_abs_diff": 0.0, "max_rel_diff": 0.0,
         "tolerance": "exact", "passed": True},
        {"output_name": "probabilities", "samples": 20, "max_abs_diff": 3.1e-7,
         "max_rel_diff": 2.5e-6, "tolerance": "atol=0.0001 rtol=0.0001", "passed": True}]}
    doc = statement(_result(report=report), request, SandboxPolicy(), principal=CALLER)
    record = provenance.verify(OUTPUT, sign(doc, key), _public_pem(key))
    assert record.record_version == 5
    assert record.parity_tolerance == 1e-4
    assert record.sample_sha256 == hashlib.sha256(SAMPLE).hexdigest()
    signed = record.statement["predicate"]["airlock"]
    assert signed["request"]["sample_input"] == {"sha256": record.sample_sha256,
                                                 "size": len(SAMPLE)}
    assert record.conversion["parity_inputs"] == "sample"
    probabilities = record.conversion["parity"][1]
    assert probabilities == {"output_name": "probabilities", "samples": 20,
                             "max_abs_diff": 3.1e-7, "max_rel_diff": 2.5e-6,
                             "tolerance": "atol=0.0001 rtol=0.0001", "passed": True}


def test_airlock_verify_prints_the_tolerance_the_rows_and_each_difference(
        key: SigningKey, capsys: pytest.CaptureFixture[str]) -> None:
    from airlock_client._provenance_cli import _print_record

    request = JobRequest(job_id="job-1", target=Target.ONNX, parity_tolerance=1e-4,
                         sample_input=SAMPLE)
    report = {"parity_inputs": "sample", "parity": [
        {"output_name": "probabilities", "samples": 20, "max_abs_diff": 3e-7,
         "max_rel_diff": 2e-6, "tolerance": "atol=0.0001 rtol=0.0001", "passed": True}]}
    doc = statement(_result(report=report), request, SandboxPolicy(), principal=CALLER)
    _print_record(Path("model.onnx"), provenance.verify(OUTPUT, sign(doc, key),
                                                        _public_pem(key)), "pinned")
    out = capsys.readouterr().out
    sha = hashlib.sha256(SAMPLE).hexdigest()[:16]
    assert f"  parity     tolerance asked 0.0001; rows sample; sample sha256 {sha}..." in out
    assert ("             probabilities: max |diff| 3e-07, relative 2e-06 "
            "(atol=0.0001 rtol=0.0001) ok") in out


def test_without_a_tolerance_or_sample_the_record_says_the_default_and_none(
        key: SigningKey) -> None:
    record = provenance.verify(OUTPUT, _envelope(key), _public_pem(key))
    assert (record.parity_tolerance, record.sample_sha256) == (0.0, "")
    assert record.statement["predicate"]["airlock"]["request"]["sample_input"] is None
    assert record.conversion["parity"][0]["max_rel_diff"] is None  # the worker did not say


def test_a_hostile_workers_parity_claims_are_typed_and_capped(key: SigningKey) -> None:
    record = provenance.verify(OUTPUT, _envelope(key, parity=[{
        "output_name": "x", "max_rel_diff": "NaN", "tolerance": "\x1b[2J" + "t" * 500,
        "samples": -3, "passed": "yes"}], parity_inputs=["sample"]), _public_pem(key))
    (entry,) = record.conversion["parity"]
    assert entry["max_rel_diff"] is None and entry["samples"] == 0
    assert entry["passed"] is False and len(entry["tolerance"]) <= 60 + len("...")
    assert entry["tolerance"].isprintable()
    assert record.conversion["parity_inputs"] == "['sample']"


def test_a_version_2_record_has_no_tolerance_and_still_verifies(key: SigningKey) -> None:
    doc = statement(_result(), _request(), SandboxPolicy(), principal=CALLER)
    signed = doc["predicate"]["airlock"]
    signed["record_version"] = 2
    del signed["request"]["parity_tolerance"], signed["request"]["sample_input"]
    record = provenance.verify(OUTPUT, sign(doc, key), _public_pem(key))
    assert (record.record_version, record.parity_tolerance, record.sample_sha256) == (
        2, None, "")


@pytest.mark.parametrize("strip", [
    # version 2 on: who asked, and the caller's subject
    lambda r: r.pop("principal"),
    lambda r: r["input"].pop("subject"),
    lambda r: r.update(principal={"name": 7, "method": "token"}),
    lambda r: r.update(record_version="2"),
    # version 3 on: the parity tolerance asked for, and the sample
    lambda r: r["request"].pop("parity_tolerance"),
    lambda r: r["request"].update(parity_tolerance="1e-4"),
    lambda r: r["request"].update(parity_tolerance=7.0),
    lambda r: r["request"].update(sample_input="abc"),
    lambda r: r["request"].update(sample_input={"size": 3}),
])
def test_a_record_without_what_its_version_requires_is_malformed(key: SigningKey,
                                                                  strip: Any) -> None:
    doc = statement(_result(), _request(), SandboxPolicy(), principal=CALLER)
    strip(doc["predicate"]["airlock"])
    with pytest.raises(ProvenanceError) as exc:
        provenance.verify(OUTPUT, sign(doc, key), _public_pem(key))
    assert _reason(exc) == "PROVENANCE_MALFORMED"


def test_escape_subject_is_printable_and_one_to_one() -> None:
    names = ["models:/fraud/3", "a\\x0ab", "a\nb", "a\\nb", "é/漢字", "\u202egnp.exe",
             "\udcff", "\x1b[31m", "tab\there"]
    escaped = [provenance.escape_subject(n) for n in names]
    assert len(set(escaped)) == len(names)
    assert all(e.isprintable() and e.encode("utf-8") for e in escaped)
    assert escaped[0] == "models:/fraud/3" and escaped[4] == "é/漢字"
    assert escaped[2] == "a\\x0ab" and escaped[1] == "a\\\\x0ab"
    with pytest.raises(ValueError):
        provenance.escape_subject("x" * (provenance.MAX_SUBJECT + 1))


def test_client_and_broker_agree_on_the_subject_limit() -> None:
    from airlock_broker.api import wire

    assert provenance.MAX_SUBJECT == wire.MAX_SUBJECT


def test_the_client_sends_the_subject_and_refuses_one_the_broker_would(tmp_path: Path) -> None:
    config = _broker_config(tmp_path)
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    backend = FakeSandbox(config.spool_root, write_safetensors)
    with running_broker(config, backend) as broker, \
            Client(f"127.0.0.1:{broker.port}", public_key=broker.signing_key.public_pem) \
            as client:
        result = client.convert(src, tmp_path / "out" / "m.safetensors",
                                subject="models:/fraud/3")
        for bad in ("a\nb", "x" * 1025):
            with pytest.raises(ValueError, match="subject"):
                client.convert(src, tmp_path / "out" / "n.safetensors", subject=bad)
    assert backend.prepared == 1  # the refused subjects never reached a sandbox
    record = result.provenance_record
    assert record is not None and record.subject == "models:/fraud/3"
    assert (record.principal, record.principal_method) == ("anonymous", "none")
    audit = json.loads((config.spool_root / "audit.jsonl").read_text().splitlines()[-1])
    assert audit["subject"] == "models:/fraud/3"


def test_a_replayed_result_is_never_signed_for_another_subject(tmp_path: Path) -> None:
    """The idempotency key binds the subject like every other option: a retry that names
    another subject gets no stored result signed with the first one."""
    import zlib

    import grpc

    from airlock.v1 import airlock_pb2 as pb
    from airlock.v1 import airlock_pb2_grpc as pb_grpc

    def call(address: str, subject: str) -> pb.ConvertResult:
        meta = pb.ConvertMetadata(size_bytes=len(PICKLE), idempotency_key="k", subject=subject)
        requests = [pb.ConvertRequest(metadata=meta),
                    pb.ConvertRequest(chunk=pb.Chunk(data=PICKLE, crc32=zlib.crc32(PICKLE)))]
        with grpc.insecure_channel(address) as channel:
            messages = list(pb_grpc.ConversionServiceStub(channel).Convert(
                iter(requests), timeout=30))  # all of it: the result is kept once answered
        return messages[0].result

    config = _broker_config(tmp_path)
    with running_broker(config, FakeSandbox(config.spool_root, write_safetensors)) as broker:
        address = f"127.0.0.1:{broker.port}"
        first = call(address, "models:/a/1")
        assert call(address, "models:/a/1").replayed
        with pytest.raises(grpc.RpcError) as info:
            call(address, "models:/b/1")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    record = provenance.verify_envelope(first.provenance, broker.signing_key.public_pem)
    assert record.subject == "models:/a/1"


def test_airlock_convert_names_its_input_by_default(tmp_path: Path) -> None:
    from airlock_client._cli_source import default_subject

    assert default_subject("models:/fraud@champion") == "models:/fraud@champion"
    assert default_subject("m.pkl") == os.path.abspath("m.pkl")
    odd = default_subject(str(tmp_path / "a\x1b[2Jb.pkl"))
    assert odd.endswith("a\\x1b[2Jb.pkl") and odd.isprintable()
    deep = default_subject("/" + "d/" * 600 + "model.pkl")
    assert len(deep) == provenance.MAX_SUBJECT and deep.startswith("…")
    assert deep.endswith("d/model.pkl")


def test_a_public_key_written_to_a_path_replaces_what_was_there_never_writes_through_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by review: ``keys export -o``/``keys fetch -o`` wrote with ``write_text``, through
    a link and into a file another user had put at that name (which keeps its owner, who could
    later put their own key there for others to pin)."""
    from airlock_client.provenance import emit_public_key

    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not a key")
    link = tmp_path / "linked.pem"
    link.symlink_to(elsewhere)
    planted = tmp_path / "planted.pem"
    planted.write_text("theirs")
    os.chown(planted, 65534, 65534)
    before = planted.stat().st_ino
    pem = "-----BEGIN PUBLIC KEY-----\nMFk=\n-----END PUBLIC KEY-----\n"
    for output in (link, planted):
        emit_public_key(pem, "ab" * 32, output, as_json=False)
        assert not output.is_symlink() and output.read_text() == pem
        assert output.stat().st_uid == os.geteuid()
    assert elsewhere.read_text() == "not a key"
    assert planted.stat().st_ino != before
    assert "wrote" in capsys.readouterr().out

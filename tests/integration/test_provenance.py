"""Signed provenance end to end, through the ``airlock`` command and the real engine: a
converted output comes with a provenance file that ``airlock verify`` accepts for that file
and that key only, and a client pinned to another key refuses the result and writes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from airlock_client import provenance
from tests.conftest import AIRLOCK, BrokerProcess, run_broker_cli, run_cli
from tests.fixtures import models

pytestmark = pytest.mark.integration


def _airlock(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AIRLOCK, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, check=False)


@pytest.fixture(scope="module")
def converted(broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An sklearn pickle converted by `airlock convert`, with its provenance beside it."""
    tmp = tmp_path_factory.mktemp("provenance")
    artifact, _ = models.make_sklearn_pickle(tmp)
    done = run_cli("convert", str(artifact), "--json", server=broker.address)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    out = Path(doc["output"])
    assert Path(doc["provenance"]) == out.with_name(out.name + ".provenance.json")
    assert doc["provenance_key_source"] == "broker"
    return out


@pytest.fixture(scope="module")
def public_key(broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The broker's key as published over the API, checked against the key file on disk."""
    pub = tmp_path_factory.mktemp("keys") / "broker.pub.pem"
    fetched = run_cli("keys", "fetch", "-o", str(pub), "--json", server=broker.address)
    assert fetched.returncode == 0, fetched.stderr
    assert "trust on first use" in fetched.stderr
    # The broker keeps its key in its state root; `keys export` on that root reads that file.
    exported = run_broker_cli("keys", "export", "--json",
                              env={"AIRLOCK_STATE_DIR": str(broker.state)})
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["fingerprint"] == json.loads(fetched.stdout)["fingerprint"]
    assert json.loads(exported.stdout)["public_key_pem"] == pub.read_text()
    return pub


def test_convert_writes_output_and_provenance_that_verify_accepts(
        converted: Path, public_key: Path, broker: BrokerProcess) -> None:
    prov = converted.with_name(converted.name + ".provenance.json")
    record = provenance.verify(converted, prov.read_bytes(), public_key)
    assert record.output_sha256 == hashlib.sha256(converted.read_bytes()).hexdigest()
    assert record.detected_format == "pickle" and record.output_format == "onnx"
    assert record.validation == "passed" and record.assurance == "integrity_verified"
    assert record.image_id.startswith("sha256:") and record.runtime in {"runc", "runsc"}
    assert record.conversion["executed_artifact_code"] is False  # the policy loader read it
    assert record.conversion["versions"], "the worker's library versions are recorded"
    done = run_cli("verify", str(converted), "--public-key", str(public_key),
                   server=broker.address)
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout and record.input_sha256 in done.stdout
    # The same file is an OpenSSF model-signing signature of the output.
    from model_signing import verifying
    verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(converted, prov)
    as_json = run_cli("verify", str(converted), "--public-key", str(public_key), "--json",
                      server=broker.address)
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["status"] == "ok" and doc["key_source"] == "pinned"
    assert doc["record"]["output_sha256"] == record.output_sha256


def test_convert_signs_which_input_it_was_and_verify_checks_it(
        converted: Path, public_key: Path, broker: BrokerProcess) -> None:
    """The record names the input (the path given to `airlock convert`, made absolute), the
    input's sha256 and who asked; `airlock verify` holds a file to an expected source."""
    source = converted.with_name("pipeline.pkl")
    prov = converted.with_name(converted.name + ".provenance.json")
    record = provenance.verify(converted, prov.read_bytes(), public_key)
    assert record.record_version == 5 and record.subject == os.path.abspath(source)
    assert record.executed_artifact_code is not None  # the broker's verdict, from version 4
    assert record.input_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert record.principal and record.principal_method
    base = ("verify", str(converted), "--public-key", str(public_key))
    shown = run_cli(*base, server=broker.address)
    assert shown.returncode == 0 and repr(record.subject) in shown.stdout, shown.stderr
    ran = "yes" if record.executed_artifact_code else "no"
    assert f"artifact code executed in sandbox: {ran}\n" in shown.stdout, shown.stdout
    ok = run_cli(*base, "--subject", record.subject, "--source-sha256", record.input_sha256,
                 server=broker.address)
    assert ok.returncode == 0, ok.stderr
    # a principal proves something only when the broker authenticated it
    named = run_cli(*base, "--principal", record.principal, server=broker.address)
    assert named.returncode == (1 if record.principal_method == "none" else 0), named.stderr
    for wrong in (("--subject", "models:/fraud/3"), ("--source-sha256", "0" * 64),
                  ("--principal", "someone-else")):
        done = run_cli(*base, *wrong, "--json", server=broker.address)
        assert done.returncode == 1, done.stdout + done.stderr
        assert json.loads(done.stdout)["reason"] in {"SOURCE_MISMATCH",
                                                     "PRINCIPAL_NOT_ALLOWED"}, wrong


def test_verify_without_a_key_uses_the_brokers_with_a_warning(converted: Path,
                                                              broker: BrokerProcess) -> None:
    done = _airlock("verify", str(converted), env={"AIRLOCK_SERVER": broker.address,
                                                   "AIRLOCK_PUBLIC_KEY": ""})
    assert done.returncode == 0, done.stderr
    assert "trust on first use" in done.stderr


def test_one_flipped_byte_fails_verification(converted: Path, public_key: Path,
                                             tmp_path: Path, broker: BrokerProcess) -> None:
    copy = tmp_path / converted.name
    data = bytearray(converted.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    prov = converted.with_name(converted.name + ".provenance.json")
    done = run_cli("verify", str(copy), "--provenance", str(prov), "--public-key",
                   str(public_key), "--json", server=broker.address)
    assert done.returncode == 1, done.stdout + done.stderr
    assert json.loads(done.stdout)["reason"] == "OUTPUT_MISMATCH"


def test_verify_refuses_another_key_and_a_missing_provenance(
        converted: Path, tmp_path: Path, broker: BrokerProcess) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = tmp_path / "other.pub.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    done = run_cli("verify", str(converted), "--public-key", str(other), server=broker.address)
    assert done.returncode == 1 and "SIGNATURE_INVALID" in done.stderr
    missing = run_cli("verify", str(converted), "--provenance", str(tmp_path / "none.json"),
                      "--public-key", str(other), server=broker.address)
    assert missing.returncode == 1 and "PROVENANCE_MISSING" in missing.stderr
    usage = run_cli("verify", str(converted), "--public-key", str(tmp_path / "nokey.pem"),
                    server=broker.address)
    assert usage.returncode == 2, usage.stderr


def test_client_pinned_to_another_key_refuses_and_writes_nothing(
        broker: BrokerProcess, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    artifact, _ = models.make_sklearn_pickle(tmp_path)
    other = tmp_path / "other.pub.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    dest = tmp_path / "out"
    dest.mkdir()
    done = _airlock("convert", str(artifact), "-o", str(dest / "m.onnx"), "--json",
                    env={"AIRLOCK_SERVER": broker.address, "AIRLOCK_PUBLIC_KEY": str(other)})
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert (doc["status"], doc["reason"], doc["output"]) == ("rejected", "SIGNATURE_INVALID",
                                                             None)
    assert list(dest.iterdir()) == []

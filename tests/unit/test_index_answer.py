"""The index record AttestIndex answers is taken only when it lists the shards this client
sent (review of directory conversions): a proxy between client and broker (cleartext, or one
that ends TLS) can answer with another record the broker signed over the same index bytes
(a fine-tuned model's index is its base model's, byte for byte: the same tensor names, the
same sizes), listing the other conversion's shards. ``convert DIR`` wrote it as the index's
record and said every record was verified; only a later ``verify DIR`` found the shards are
not those it lists."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.api import index_attestation
from airlock_broker.api.auth import Principal
from airlock_broker.api.provenance import RECORD_FIELD, sign, statement
from airlock_broker.security.keys import SigningKey
from airlock_broker.validation.safetensors_canonical import names_digest
from airlock_client import ProvenanceError, _client
from airlock_sandbox.contract import LoadingPolicy, OutputFormat, Target
from airlock_sandbox.formats import ArtifactFormat
from airlock_sandbox.policy import SandboxPolicy

LAYOUT = {"model-00001-of-00002.safetensors": ["embed", "layer.0"],
          "model-00002-of-00002.safetensors": ["layer.1", "lm_head"]}
INDEX = json.dumps({"metadata": {"total_size": 128},
                    "weight_map": {n: f for f, names in LAYOUT.items() for n in names}}).encode()
SUBJECT = "/home/alice/llama-finetuned"
ALICE = Principal("alice", "token", frozenset())


def _record(key: SigningKey, names: list[str], weights: str) -> bytes:
    """A shard's record as the broker signs it; ``weights`` tells two conversions apart."""
    from airlock_broker.conversion.jobs import JobRequest, JobResult
    from airlock_broker.conversion.outputs import ValidatedOutput
    from airlock_broker.sandboxes.sandbox import Outcome

    sha = hashlib.sha256(f"{weights}{names}".encode()).hexdigest()
    result = JobResult(
        job_id=f"job-{weights}-{names[0]}", input_sha256="1" * 64, input_size=10,
        detected_format=ArtifactFormat.PYTORCH_ZIP,
        output=ValidatedOutput(format=OutputFormat.SAFETENSORS, size=1000, sha256=sha,
                               path=Path("model.safetensors"), write_into=lambda fd: None),
        outcome=Outcome(exit_code=0, oom_killed=False, timed_out=False, duration_seconds=0.1,
                        image_id="sha256:" + "ab" * 32, runtime="runc"),
        policy=LoadingPolicy.SAFE_ONLY, report={})
    request = JobRequest(job_id=result.job_id, target=Target.SAFETENSORS,
                         subject=f"{SUBJECT}/{names[0]}")
    doc = statement(result, request, SandboxPolicy(), principal=ALICE)
    doc["predicate"][RECORD_FIELD]["output"]["tensors"] = {  # what the validator found
        "count": len(names), "data_bytes": 64, "names_sha256": names_digest(names)}
    return sign(doc, key)


class _Replaying:
    """A channel whose AttestIndex answer is ``answer``, whatever was asked."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def AttestIndex(self, request: pb.AttestIndexRequest, **_: Any) -> pb.AttestIndexResponse:
        return pb.AttestIndexResponse(provenance=self.answer)


def _client_with(key: SigningKey, answer: bytes) -> _client.Client:
    client = _client.Client("127.0.0.1:1", public_key=key.public_key, local_transfer=False)
    client._stub = _Replaying(answer)  # type: ignore[assignment]
    return client


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return SigningKey(private_key=ec.generate_private_key(ec.SECP256R1()),
                      path=tmp_path / "key.pem")


def _sent(key: SigningKey, weights: str) -> list[tuple[str, bytes]]:
    return [(f, _record(key, names, weights)) for f, names in LAYOUT.items()]


def test_the_record_of_the_shards_sent_is_taken(key: SigningKey) -> None:
    sent = _sent(key, "finetuned")
    answer = index_attestation.attest(INDEX, sent, SUBJECT, key=key,
                                      principal=ALICE)
    with _client_with(key, answer) as client:
        assert client.attest_index(INDEX, sent, subject=SUBJECT) == answer


def test_a_record_of_the_same_index_over_other_shards_is_refused(key: SigningKey) -> None:
    base = index_attestation.attest(INDEX, _sent(key, "base"), SUBJECT, key=key,
                                    principal=ALICE)
    with _client_with(key, base) as client, pytest.raises(ProvenanceError) as caught:
        client.attest_index(INDEX, _sent(key, "finetuned"), subject=SUBJECT)
    assert caught.value.reason == "REQUEST_MISMATCH"

"""The broker's request handling, end to end over real gRPC, with a fake sandbox at the seam."""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import save

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.config import BrokerConfig
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_client import Client, ConversionError, TensorSpec
from airlock_sandbox.contract import OUTPUT_NAMES, JobSpec, OutputFormat, WorkerExit
from tests.unit.fakes import Behaviour, FakeSandbox, running_broker

PICKLE = b"\x80\x04\x95" + b"\x00" * 200  # leading bytes of a protocol-4 pickle
TENSORS = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}


def write_safetensors(spec: JobSpec, data: bytes, out: Path) -> int:
    (out / OUTPUT_NAMES[OutputFormat.SAFETENSORS]).write_bytes(save(TENSORS))
    (out / "report.json").write_text(json.dumps({"loader": "fake", "tensor_count": 1}))
    return 0


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[object]:
    brokers = []

    def _make(behaviour: Behaviour, **overrides: object) -> tuple[str, FakeSandbox]:
        overrides.setdefault("pools", PoolSettings(min_warm=0))
        overrides.setdefault("selftest_on_start", False)
        overrides.setdefault("provenance_key", tmp_path / "provenance-key.pem")
        config = BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "spool",
                              **overrides)  # type: ignore[arg-type]
        backend = FakeSandbox(config.spool_root, behaviour)
        cm = running_broker(config, backend)
        broker = cm.__enter__()
        brokers.append(cm)
        return f"127.0.0.1:{broker.port}", backend

    yield _make
    for cm in brokers:
        cm.__exit__(None, None, None)


def _files_left(tmp_path: Path) -> list[str]:
    spool = tmp_path / "spool"
    while True:
        try:  # the broker may be removing a directory while it is walked
            # results/ holds outputs kept for idempotent retries: the store owns them
            # (bounded, expired, removed on close; tests/unit/test_idempotency.py).
            return sorted(str(p.relative_to(spool)) for p in spool.rglob("*")
                          if p.name not in {".lock", "audit.jsonl"} and p.is_file()
                          and p.relative_to(spool).parts[0] != "results")
        except FileNotFoundError:
            continue


def leftovers(tmp_path: Path, timeout: float = 30.0) -> list[str]:
    """Files left in the spool once the broker's background clean-up has had its chance."""
    deadline = time.monotonic() + timeout
    while (left := _files_left(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def settled(backend: FakeSandbox, timeout: float = 30.0) -> set[str]:
    """The slots still alive once released ones have been destroyed (in the background)."""
    deadline = time.monotonic() + timeout
    while backend.live and time.monotonic() < deadline:
        time.sleep(0.02)
    return backend.live


def audit_records(tmp_path: Path, expected: int) -> list[dict[str, object]]:
    """The audit lines, once ``expected`` have been written (the line follows the reply)."""
    deadline = time.monotonic() + 30
    while True:
        lines = (tmp_path / "spool" / "audit.jsonl").read_text().splitlines()
        if len(lines) >= expected or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)


def test_benign_conversion_streams_validated_output(make_broker, tmp_path: Path) -> None:
    address, backend = make_broker(write_safetensors)
    src = tmp_path / "model.pkl"
    src.write_bytes(PICKLE)
    with Client(address) as client:
        result = client.convert(src, tmp_path / "out.safetensors",
                                inputs=(TensorSpec("x", "float32", (-1, 4)),))
    data = (tmp_path / "out.safetensors").read_bytes()
    assert result.format == "safetensors"
    assert result.sha256 == hashlib.sha256(data).hexdigest() and result.size == len(data)
    assert result.input_sha256 == hashlib.sha256(PICKLE).hexdigest()
    assert result.report.loader == "fake"
    assert backend.specs[0].inputs[0].shape == (-1, 4)
    assert settled(backend) == set() and leftovers(tmp_path) == []


@pytest.mark.parametrize(("code", "reason"), [
    (WorkerExit.POLICY_VIOLATION, "POLICY_VIOLATION"),
    (WorkerExit.UNSUPPORTED_MODEL, "UNSUPPORTED_MODEL"),
    (WorkerExit.FORMAT_MISMATCH, "FORMAT_MISMATCH"),
    (1, "CONVERSION_FAILED"),
    (139, "CONVERSION_FAILED"),
    (137, "SANDBOX_OOM"),
])
def test_exit_codes_become_reasons(make_broker, tmp_path: Path, code: int, reason: str) -> None:
    address, backend = make_broker(lambda spec, data, out: code)
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    with Client(address) as client, pytest.raises(ConversionError) as info:
        client.convert(src, tmp_path / "out")
    assert info.value.reason == reason
    assert not (tmp_path / "out").exists()
    assert settled(backend) == set() and leftovers(tmp_path) == []


def test_exit_zero_without_output_is_output_invalid(make_broker, tmp_path: Path) -> None:
    address, _ = make_broker(lambda spec, data, out: 0)  # "spoofed success"
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    with Client(address) as client, pytest.raises(ConversionError) as info:
        client.convert(src, tmp_path / "out")
    assert info.value.reason == "OUTPUT_INVALID" and info.value.kind == "rejected"


def test_hostile_error_text_is_escaped(make_broker, tmp_path: Path) -> None:
    def behaviour(spec: JobSpec, data: bytes, out: Path) -> int:
        (out / "report.json").write_text(json.dumps({"error": "\x1b[31mevil\nline" + "x" * 5000}))
        return 1
    address, _ = make_broker(behaviour)
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    with Client(address) as client, pytest.raises(ConversionError) as info:
        client.convert(src, tmp_path / "out")
    assert "\x1b" not in info.value.message and "\n" not in info.value.message
    assert len(info.value.message) < 1000


def test_deadline_kills_a_job_that_never_ends(make_broker, tmp_path: Path) -> None:
    address, _ = make_broker(lambda spec, data, out: None)
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    with Client(address) as client, pytest.raises(ConversionError) as info:
        client.convert(src, tmp_path / "out", job_timeout=1)
    assert info.value.reason == "SANDBOX_TIMEOUT" and info.value.code == "DEADLINE_EXCEEDED"


def test_unknown_bytes_are_rejected_without_a_sandbox(make_broker, tmp_path: Path) -> None:
    address, backend = make_broker(write_safetensors)
    src = tmp_path / "notes.txt"
    src.write_bytes(b"hello, this is not a model")
    with Client(address) as client, pytest.raises(ConversionError) as info:
        client.convert(src, tmp_path / "out")
    assert info.value.reason == "UNSUPPORTED_FORMAT" and backend.prepared == 0


def test_declared_format_must_match_magic_bytes(make_broker, tmp_path: Path) -> None:
    address, backend = make_broker(write_safetensors)
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    with Client(address) as client, pytest.raises(ConversionError) as info:
        client.convert(src, tmp_path / "out", declared_format="safetensors")
    assert info.value.reason == "FORMAT_MISMATCH" and backend.prepared == 0


def _raw_call(address: str, messages: list[pb.ConvertRequest]) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ConversionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Convert(iter(messages), timeout=10))
    return info.value


def _chunk(data: bytes, crc: int | None = None) -> pb.ConvertRequest:
    return pb.ConvertRequest(chunk=pb.Chunk(data=data, crc32=zlib.crc32(data) if crc is None
                                            else crc))


def _meta(**kw: object) -> pb.ConvertRequest:
    return pb.ConvertRequest(metadata=pb.ConvertMetadata(**kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(("messages", "code", "reason"), [
    ([], grpc.StatusCode.INVALID_ARGUMENT, "BAD_REQUEST"),
    ([_chunk(PICKLE)], grpc.StatusCode.INVALID_ARGUMENT, "BAD_REQUEST"),
    ([_meta(), _meta()], grpc.StatusCode.INVALID_ARGUMENT, "BAD_REQUEST"),
    ([_meta()], grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_ARTIFACT"),
    ([_meta(), _chunk(PICKLE, crc=1)], grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH"),
    ([_meta(size_bytes=10), _chunk(PICKLE)], grpc.StatusCode.INVALID_ARGUMENT, "TOO_LARGE"),
    ([_meta(size_bytes=len(PICKLE) + 1), _chunk(PICKLE)], grpc.StatusCode.DATA_LOSS,
     "CHECKSUM_MISMATCH"),
    ([_meta(sha256="0" * 64), _chunk(PICKLE)], grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH"),
    ([_meta(sha256="xyz"), _chunk(PICKLE)], grpc.StatusCode.INVALID_ARGUMENT, "BAD_REQUEST"),
    ([_meta(size_bytes=10**12)], grpc.StatusCode.INVALID_ARGUMENT, "TOO_LARGE"),
    ([_meta(inputs=[pb.TensorSpec(name="x;rm", dtype="float32", shape=[1])]), _chunk(PICKLE)],
     grpc.StatusCode.INVALID_ARGUMENT, "BAD_REQUEST"),
    ([_meta(inputs=[pb.TensorSpec(name="x", dtype="object", shape=[1])]), _chunk(PICKLE)],
     grpc.StatusCode.INVALID_ARGUMENT, "BAD_REQUEST"),
    # the subject is signed as sent: printable and bounded, or refused (never escaped here)
    ([_meta(subject="models:/fraud/3\x1b[2J"), _chunk(PICKLE)],
     grpc.StatusCode.INVALID_ARGUMENT, "BAD_REQUEST"),
    ([_meta(subject="x" * 1025), _chunk(PICKLE)], grpc.StatusCode.INVALID_ARGUMENT,
     "BAD_REQUEST"),
])
def test_malformed_streams_are_refused_with_a_reason(make_broker, tmp_path: Path, messages,
                                                     code, reason) -> None:
    from grpc_status import rpc_status

    from airlock_client._wire import error_from_rpc
    address, backend = make_broker(write_safetensors)
    err = _raw_call(address, messages)
    assert err.code() == code
    assert rpc_status.from_call(err) is not None
    assert error_from_rpc(err).reason == reason  # type: ignore[attr-defined]
    assert backend.prepared == 0 and leftovers(tmp_path) == []


def test_sandbox_outage_is_unavailable(make_broker, tmp_path: Path) -> None:
    from airlock_client import ServiceUnavailable
    address, backend = make_broker(write_safetensors)
    backend.unavailable = True
    src = tmp_path / "m.pkl"
    src.write_bytes(PICKLE)
    with Client(address, retry_attempts=2) as client, pytest.raises(ServiceUnavailable) as info:
        client.convert(src, tmp_path / "out")
    assert info.value.reason == "SANDBOX_UNAVAILABLE"


def test_every_job_leaves_one_audit_line_without_artifact_bytes(make_broker,
                                                                  tmp_path: Path) -> None:
    address, _ = make_broker(write_safetensors)
    good = tmp_path / "good.pkl"
    good.write_bytes(PICKLE)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x1b[2J not a model \x00" * 4)
    with Client(address) as client:
        client.convert(good, tmp_path / "out")
        with pytest.raises(ConversionError):
            client.convert(bad, tmp_path / "out2")
    records = audit_records(tmp_path, 2)
    assert [r["outcome"] for r in records] == ["ok", "rejected"]
    assert records[0]["input_sha256"] == hashlib.sha256(PICKLE).hexdigest()
    assert records[0]["output_sha256"] and records[0]["detected_format"] == "pickle"
    assert records[1]["reason"] == "UNSUPPORTED_FORMAT"
    raw = (tmp_path / "spool" / "audit.jsonl").read_bytes()
    assert b"not a model" not in raw and b"\x1b" not in raw
    assert all(r["peer"] and r["job_id"] and "limits" in r for r in records)


def test_prometheus_metrics_count_jobs_rpcs_and_bytes(make_broker, tmp_path: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address, _ = make_broker(write_safetensors, metrics_listen=f"127.0.0.1:{port}")
    good = tmp_path / "good.pkl"
    good.write_bytes(PICKLE)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a model at all")
    with Client(address) as client:
        client.convert(good, tmp_path / "out")
        with pytest.raises(ConversionError):
            client.convert(bad, tmp_path / "out2")
    expected = [
        'airlock_jobs_total{outcome="ok",reason=""} 1.0',
        'airlock_jobs_total{outcome="rejected",reason="UNSUPPORTED_FORMAT"} 1.0',
        'airlock_grpc_server_handled_total{code="OK",method="Convert"} 1.0',
        'airlock_grpc_server_handled_total{code="INVALID_ARGUMENT",method="Convert"} 1.0',
        f"airlock_artifact_bytes_in_total {float(len(PICKLE) + 18)}",
        'airlock_pool_containers{profile="sklearn",state="warm"} 0.0',
        'airlock_pool_warm_containers{profile="sklearn",readiness="importing"} 0.0',
        'airlock_pool_warm_containers{profile="sklearn",readiness="ready"} 0.0',
        "airlock_jobs_in_broker 0.0",
    ]
    # Job metrics are recorded after the reply (like the audit line): scrape until they are
    # all there, within a bound, rather than racing the broker's ``finally``.
    deadline = time.monotonic() + 60
    while True:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                          timeout=30).read().decode()
        except OSError:  # a scrape that timed out on a busy machine: try again
            text = ""
        missing = [line for line in expected if line not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert missing == [], text

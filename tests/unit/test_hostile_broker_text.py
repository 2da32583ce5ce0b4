"""A malicious broker (or a squatter answering in its place) writes control characters, ANSI
escapes and bidi overrides into every string it sends: error messages, reasons, report fields,
pool and self-test text. The CLI must show them escaped, and ``--json`` must stay JSON with the
broker's words intact (issue 11, §6)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_client import cli
from airlock_client.provenance import fingerprint
from tests.unit.test_auth import PICKLE

ESC = "\x1b"
EVIL = f"{ESC}[2J{ESC}]0;pwned\x07\u202eexe.onnx\r\nconverted OK\x00\x9b31m"


def test_printable_escapes_controls_escapes_and_bidi_but_keeps_ordinary_text() -> None:
    from airlock_client._terminal import printable

    shown = printable(EVIL)
    assert shown == ("\\x1b[2J\\x1b]0;pwned\\x07\\u202eexe.onnx\\x0d\\x0aconverted OK\\x00"
                     "\\x9b31m")
    assert shown.isprintable()
    for ordinary in ("model.onnx", "größe: 3 µs — ok", "日本語", "a\\x1b"):
        assert printable(ordinary) == ordinary
    for hidden in ("\u200b", "\u2066", "\u2028", "\ufeff", "\U000e0041", "\t"):
        assert printable(f"a{hidden}b").isprintable()


class _MaliciousAdmin(pb_grpc.AdminServiceServicer):
    def GetPoolStatus(self, request, context):  # type: ignore[no-untyped-def]
        return pb.GetPoolStatusResponse(pools=[pb.PoolStatus(
            profile=f"{ESC}[1Aok", runtime=EVIL, image_id=f"sha256:{ESC}[8m", unavailable=EVIL)])

    def RunSelfTest(self, request, context):  # type: ignore[no-untyped-def]
        return pb.RunSelfTestResponse(passed=True, runtime=EVIL, image_id=EVIL, checks=[
            pb.SelfTestCheck(name=EVIL, passed=True, detail=EVIL, source=EVIL)])


class _MaliciousConversion(pb_grpc.ConversionServiceServicer):
    """A real key, wrapped in escapes the PEM parser skips; every job refused with escapes."""

    def __init__(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        self.pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()

    def GetProvenanceKey(self, request, context):  # type: ignore[no-untyped-def]
        return pb.GetProvenanceKeyResponse(public_key_pem=f"{EVIL}\n{self.pem}{EVIL}\n",
                                           fingerprint=fingerprint(self.pem.encode()))

    def Convert(self, request_iterator, context):  # type: ignore[no-untyped-def]
        next(request_iterator)
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=f"{ESC}[32mCONVERTED", domain="airlock.v1"))
        context.abort_with_status(rpc_status.to_status(status_pb2.Status(
            code=code_pb2.FAILED_PRECONDITION, message=EVIL, details=[info])))


@pytest.fixture
def malicious_broker() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_AdminServiceServicer_to_server(_MaliciousAdmin(), server)
    pb_grpc.add_ConversionServiceServicer_to_server(_MaliciousConversion(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_a_malicious_brokers_escapes_reach_the_terminal_escaped(
        malicious_broker: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRLOCK_SERVER", malicious_broker)
    artifact = tmp_path / "m.pkl"
    artifact.write_bytes(PICKLE)
    assert cli.main(["pool", "status"]) == 0
    assert cli.main(["selftest"]) == 0
    assert cli.main(["convert", str(artifact)]) == 1
    assert cli.main(["keys", "fetch"]) == 0  # the PEM printed is the parsed key, re-encoded
    printed = capsys.readouterr()
    for text in (printed.out, printed.err):
        assert ESC not in text and "\u202e" not in text and "\x07" not in text
        assert "\r" not in text and "\x00" not in text and "\x9b" not in text
    assert "\\x1b[2J" in printed.out and "\\x1b[32mCONVERTED" in printed.err
    assert "converted OK" not in printed.out.splitlines()  # no forged line of its own
    # --json stays JSON, with the broker's words exactly (json.dumps escapes them).
    assert cli.main(["convert", str(artifact), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["message"] == EVIL and doc["reason"] == f"{ESC}[32mCONVERTED"

"""A token over TLS, through the real CLI, the real broker and the real engine."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import onnx
import pytest

from tests.certs import TestCA
from tests.conftest import BrokerProcess, run_broker_cli, run_cli, start_broker
from tests.fixtures import models

pytestmark = pytest.mark.integration


def test_convert_with_a_token_against_a_tls_broker(docker_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("broker", dns=("localhost",), ips=("127.0.0.1",))
    minted = run_broker_cli("token", "create", "--principal", "ci-batch", "--role", "convert",
                            "--json")
    assert minted.returncode == 0, minted.stderr
    token = json.loads(minted.stdout)
    config = tmp_path / "airlock.toml"
    config.write_text(f'[pools]\nmin_warm = 0\n\n[auth]\ntls_cert = "{server.cert}"\n'
                      f'tls_key = "{server.key}"\n\n{token["config"]}')
    token_file = tmp_path / "token"
    token_file.write_text(token["token"] + "\n")
    token_file.chmod(0o600)

    (tmp_path / "broker").mkdir()
    broker: BrokerProcess = start_broker(
        tmp_path / "broker", "--config", str(config),
        credentials=grpc.ssl_channel_credentials(ca.cert_path.read_bytes()))
    try:
        artifact, _ = models.make_sklearn_pickle(tmp_path)
        refused = run_cli("convert", str(artifact), "--json", "--tls-ca", str(ca.cert_path),
                          server=broker.address)
        assert refused.returncode == 4, refused.stdout + refused.stderr
        assert json.loads(refused.stdout)["reason"] == "UNAUTHENTICATED"

        done = run_cli("convert", str(artifact), "--json", "--tls-ca", str(ca.cert_path),
                       "--token-file", str(token_file), server=broker.address)
        assert done.returncode == 0, done.stdout + done.stderr
        doc = json.loads(done.stdout)
        assert doc["status"] == "ok" and doc["format"] == "onnx"
        onnx.checker.check_model(onnx.load(doc["output"]), full_check=True)
        # The provenance key is public: fetching it over TLS needs no token.
        checked = run_cli("verify", doc["output"], "--json", "--tls-ca", str(ca.cert_path),
                          server=broker.address)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        code = broker.stop()
    assert code == 0, broker.log.read_text()[-3000:]
    [line] = [json.loads(x) for x in (broker.spool / "audit.jsonl").read_text().splitlines()]
    assert (line["principal"], line["auth"], line["outcome"]) == ("ci-batch", "token", "ok")
    log = broker.log.read_text()
    assert "mutual TLS" not in log and "TLS, 1 token(s)" in log  # the start-up line
    for text in (log, (broker.spool / "audit.jsonl").read_text()):
        assert token["token"] not in text

"""Authentication and authorization, over real gRPC, with a fake sandbox at the seam.

The sandbox is not what is under test: these prove who may call what, how refusals read
(status, reason, ErrorInfo), that the principal reaches the audit log, and that no token is
ever written down.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from safetensors.numpy import save

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.api.auth import (
    OPEN_METHODS,
    OPEN_SERVICES,
    SERVICE_ROLES,
    Authenticator,
    PrincipalFilter,
)
from airlock_broker.config import BrokerConfig
from airlock_broker.errors import AirlockError
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.security.auth_config import (
    AuthConfig,
    Role,
    SubjectEntry,
    TokenEntry,
    check_listen,
    mint_token,
    token_digest,
)
from airlock_client import AccessDenied, Client, ServiceUnavailable
from airlock_client._channel import ChannelSettings
from airlock_client.addresses import is_loopback
from airlock_sandbox.contract import OUTPUT_NAMES, JobSpec, OutputFormat
from tests.certs import TestCA
from tests.unit.fakes import FakeSandbox, running_broker

AIRLOCK = str(Path(sys.executable).parent / "airlock")
#: ``airlock-broker``: what its console script runs.
BROKER = [sys.executable, "-m", "airlock_broker"]
PICKLE = b"\x80\x04\x95" + b"\x00" * 200
CONVERT_TOKEN = mint_token()
ADMIN_TOKEN = mint_token()
TOKENS = (
    TokenEntry("ci-batch", frozenset({Role.CONVERT}), token_digest(CONVERT_TOKEN)),
    TokenEntry("ops", frozenset({Role.ADMIN}), token_digest(ADMIN_TOKEN)),
)


def write_safetensors(spec: JobSpec, data: bytes, out: Path) -> int:
    tensors = {"w": np.arange(4, dtype=np.float32)}
    (out / OUTPUT_NAMES[OutputFormat.SAFETENSORS]).write_bytes(save(tensors))
    (out / "report.json").write_text(json.dumps({"loader": "fake"}))
    return 0


BrokerFactory = Callable[..., tuple[str, FakeSandbox]]


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[BrokerFactory]:
    managers: list[Any] = []

    def _make(auth: AuthConfig, listen: str = "127.0.0.1:0") -> tuple[str, FakeSandbox]:
        # Integrity's second sandbox is not this file's subject (test_format_decision).
        config = BrokerConfig(listen=listen, state_root=tmp_path / "spool",
                              pools=PoolSettings(min_warm=0), selftest_on_start=False, auth=auth,
                              verify_integrity=False)
        backend = FakeSandbox(config.spool_root, write_safetensors)
        cm = running_broker(config, backend)
        broker = cm.__enter__()
        managers.append(cm)
        return f"127.0.0.1:{broker.port}", backend

    yield _make
    for cm in managers:
        cm.__exit__(None, None, None)


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "model.pkl"
    path.write_bytes(PICKLE)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA with a server certificate for loopback and two clients, and a stranger CA."""
    root = tmp_path_factory.mktemp("pki")
    ca = TestCA(root / "ca")
    stranger = TestCA(root / "stranger", name="stranger CA")
    return {
        "ca": ca,
        "server": ca.issue("broker", dns=("localhost",), ips=("127.0.0.1",)),
        "alice": ca.issue("alice", dns=("alice.ops.example",), client=True),
        "mallory": ca.issue("mallory", client=True),
        "forged": stranger.issue("alice", dns=("alice.ops.example",), client=True),
    }


def audit_lines(tmp_path: Path, expected: int) -> list[dict[str, Any]]:
    path = tmp_path / "spool" / "audit.jsonl"
    deadline = time.monotonic() + 30
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= expected or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)


def error_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    info = error_details_pb2.ErrorInfo()
    assert status.details and status.details[0].Unpack(info)
    return info


# -- where the broker may listen ---------------------------------------------------------------

@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:50051", True), ("127.0.0.2:1", True), ("[::1]:50051", True),
    ("localhost:50051", True), ("unix:/run/airlock.sock", True),
    ("0.0.0.0:50051", False), ("[::]:50051", False), (":50051", False),
    ("10.0.0.5:50051", False), ("broker.internal:50051", False),
    ("[::ffff:127.0.0.1]:1", False),
    # gRPC target forms, as a client dials them
    ("dns:///localhost:50051", True), ("ipv4:127.0.0.1:50051", True),
    ("ipv6:[::1]:50051", True), ("dns:///broker.internal:50051", False),
])
def test_only_literal_loopback_counts_as_local(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_without_auth_the_broker_refuses_a_non_loopback_address() -> None:
    with pytest.raises(ValueError, match=r"without authentication.*--insecure-no-auth"):
        BrokerConfig(listen="0.0.0.0:50051")
    BrokerConfig(listen="127.0.0.1:50051")  # the default stays fine (make serve)


def test_the_explicit_flag_allows_a_non_loopback_address_without_auth() -> None:
    config = BrokerConfig.load(None, insecure_no_auth=True, listen="0.0.0.0:50051")
    assert config.auth.insecure_no_auth and not config.auth.enabled
    assert "WITHOUT AUTHENTICATION" in config.auth.describe()


def test_tokens_are_never_accepted_in_cleartext_beyond_loopback(pki: dict[str, Any]) -> None:
    tokens_only = AuthConfig(tokens=TOKENS)
    check_listen("127.0.0.1:50051", tokens_only)
    with pytest.raises(ValueError, match="cleartext"):
        check_listen("0.0.0.0:50051", tokens_only)
    with_tls = replace(tokens_only, tls_cert=pki["server"].cert, tls_key=pki["server"].key)
    check_listen("0.0.0.0:50051", with_tls)


def test_insecure_flag_and_configured_auth_contradict_each_other() -> None:
    with pytest.raises(ValueError, match="drop one"):
        AuthConfig(tokens=TOKENS, insecure_no_auth=True)


def test_serve_refuses_before_touching_docker(tmp_path: Path) -> None:
    # The check runs on the configuration, so no engine, port or spool is involved.
    env = {**os.environ, "AIRLOCK_STATE_DIR": str(tmp_path / "state"),
           "DOCKER_HOST": "unix:///nonexistent.sock"}
    done = subprocess.run([*BROKER, "serve", "--listen", "0.0.0.0:0"], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "without authentication" in done.stderr and "--insecure-no-auth" in done.stderr
    assert not (tmp_path / "spool").exists()


def test_metrics_beyond_loopback_are_refused_without_the_flag(tmp_path: Path) -> None:
    for address in ("0.0.0.0:9464", "[::]:9464", "10.0.0.5:9464", "metrics.internal:9464"):
        with pytest.raises(ValueError, match="--metrics-public"):
            BrokerConfig(metrics_listen=address)
    for address in ("127.0.0.1:9464", "[::1]:9464", "localhost:9464", ":9464"):
        BrokerConfig(metrics_listen=address)
    assert BrokerConfig.load(None, metrics_listen="0.0.0.0:9464", metrics_public=True
                             ).metrics_public
    with pytest.raises(ValueError, match="HOST:PORT"):
        BrokerConfig(metrics_listen="127.0.0.1")
    env = {**os.environ, "AIRLOCK_STATE_DIR": str(tmp_path / "state"),
           "DOCKER_HOST": "unix:///nonexistent.sock"}
    done = subprocess.run([*BROKER, "serve", "--metrics", "0.0.0.0:0"], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert done.returncode == 2 and "--metrics-public" in done.stderr, done.stderr
    assert not (tmp_path / "spool").exists()


def test_insecure_no_auth_serves_beyond_loopback_and_says_so(
        make_broker: BrokerFactory, artifact: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # Binding 0.0.0.0 on an ephemeral port for a second, with a fake sandbox behind it, is the
    # honest way to show the flag works: nothing can be converted for real meanwhile.
    caplog.set_level(logging.WARNING, logger="airlock_broker.api.server")
    address, _ = make_broker(BrokerConfig.load(None, insecure_no_auth=True,
                                               listen="0.0.0.0:0").auth, listen="0.0.0.0:0")
    with Client(address) as client:
        client.convert(artifact, tmp_path / "out")
    assert any("NO AUTHENTICATION" in r.getMessage() for r in caplog.records)
    assert audit_lines(tmp_path, 1)[0]["principal"] == "anonymous"


# -- configuration ------------------------------------------------------------------------------

def test_auth_section_loads_tokens_subjects_and_paths_relative_to_the_file(
        tmp_path: Path, pki: dict[str, Any]) -> None:
    server = pki["server"]
    extra = mint_token()
    (tmp_path / "tokens.toml").write_text(
        f'[[auth.tokens]]\nprincipal = "nightly"\nroles = ["convert"]\n'
        f'sha256 = "{token_digest(extra)}"\n')
    (tmp_path / "airlock.toml").write_text(f"""
[broker]
listen = "0.0.0.0:50051"
[auth]
tls_cert = "{server.cert}"
tls_key = "{server.key.name}"
client_ca = "{pki['ca'].cert_path}"
tokens_file = "tokens.toml"
[[auth.tokens]]
principal = "ci-batch"
roles = ["convert", "admin"]
sha256 = "{token_digest(CONVERT_TOKEN)}"
[[auth.subjects]]
name = "alice.ops.example"
roles = ["admin"]
""")
    (tmp_path / server.key.name).write_bytes(server.key.read_bytes())
    auth = BrokerConfig.load(tmp_path / "airlock.toml").auth
    assert auth.tls_key == tmp_path / server.key.name
    assert [t.principal for t in auth.tokens] == ["ci-batch", "nightly"]
    assert auth.tokens[0].roles == {Role.CONVERT, Role.ADMIN}
    assert auth.subjects == (SubjectEntry("alice.ops.example", frozenset({Role.ADMIN})),)
    assert auth.describe() == "mutual TLS, 2 token(s), 1 certificate subject(s)"
    assert CONVERT_TOKEN not in repr(auth)


@pytest.mark.parametrize(("snippet", "message"), [
    ('[auth]\ntoken = "x"\n', "unknown keys"),
    ('[[auth.tokens]]\nprincipal = "a"\nroles = ["convert"]\nsha256 = "abc"\n', "64 lowercase"),
    ('[[auth.tokens]]\nprincipal = "a"\nroles = ["root"]\nsha256 = "' + "0" * 64 + '"\n',
     "roles"),
    ('[[auth.tokens]]\nprincipal = "a"\nroles = []\nsha256 = "' + "0" * 64 + '"\n', "roles"),
    ('[[auth.tokens]]\nprincipal = "a\\u0007"\nroles = ["admin"]\nsha256 = "' + "0" * 64
     + '"\n', "acceptable name"),
    # The broker's own names: shared idempotency keys and audit name with those callers.
    ('[[auth.tokens]]\nprincipal = "uid:0"\nroles = ["convert"]\nsha256 = "' + "0" * 64
     + '"\n', "a name the broker gives callers itself"),
    ('[[auth.tokens]]\nprincipal = "anonymous"\nroles = ["convert"]\nsha256 = "' + "0" * 64
     + '"\n', "a name the broker gives callers itself"),
    ('[[auth.subjects]]\nname = "uid:1000"\nroles = ["admin"]\n', "gives callers itself"),
    ('[[auth.subjects]]\nname = "x"\nroles = ["admin"]\n', "client_ca"),
    ('[auth]\nclient_ca = "ca.pem"\n', "tls_cert"),
])
def test_bad_auth_config_is_refused_with_a_reason(tmp_path: Path, snippet: str,
                                                  message: str) -> None:
    (tmp_path / "c.toml").write_text(snippet)
    with pytest.raises(ValueError, match=message):
        BrokerConfig.load(tmp_path / "c.toml")


def test_unusable_tls_files_are_refused_at_load(tmp_path: Path, pki: dict[str, Any]) -> None:
    server, alice = pki["server"], pki["alice"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ValueError, match="matching PEM"):
        AuthConfig(tls_cert=server.cert, tls_key=alice.key)  # someone else's key
    with pytest.raises(ValueError, match="matching PEM"):
        AuthConfig(tls_cert=garbage, tls_key=server.key)
    with pytest.raises(ValueError, match="client_ca"):
        AuthConfig(tls_cert=server.cert, tls_key=server.key, client_ca=garbage)


def test_every_service_needs_a_role_or_is_explicitly_open() -> None:
    services = {s.full_name for s in pb.DESCRIPTOR.services_by_name.values()}
    assert services <= set(SERVICE_ROLES)
    assert not set(SERVICE_ROLES) & OPEN_SERVICES
    methods = {f"/{s.full_name}/{m.name}" for s in pb.DESCRIPTOR.services_by_name.values()
               for m in s.methods}
    assert methods >= OPEN_METHODS  # no stale exception outlives its RPC


# -- identifying a caller (the pure part) -------------------------------------------------------

def _ssl(san: list[bytes], cn: list[bytes]) -> dict[str, list[bytes]]:
    return {"transport_security_type": [b"ssl"], "x509_subject_alternative_name": san,
            "x509_common_name": cn}


def test_certificate_names_match_exactly_and_the_cn_only_without_sans(pki: dict[str, Any]) -> None:
    name = "a" * 253
    auth = Authenticator(AuthConfig(
        tls_cert=pki["server"].cert, tls_key=pki["server"].key, client_ca=pki["ca"].cert_path,
        subjects=(SubjectEntry(name, frozenset({Role.ADMIN})),
                  SubjectEntry("alice", frozenset({Role.CONVERT})))))
    longer = auth.identify([], _ssl([name.encode() + b"evil"], [b"nobody"]))
    assert longer.roles == frozenset() and longer.name.startswith("aaa")
    assert auth.identify([], _ssl([b"x.example", b"alice"], [name.encode()])).name == "alice"
    assert auth.identify([], _ssl([], [b"alice"])).roles == {Role.CONVERT}  # no SAN: the CN
    assert auth.identify([], _ssl([b"x.example"], [b"alice"])).roles == frozenset()
    with pytest.raises(AirlockError, match="no credentials"):  # not a TLS connection
        auth.identify([], {"transport_security_type": [b"insecure"],
                           "x509_common_name": [b"alice"]})


def test_more_than_one_authorization_header_is_refused() -> None:
    auth = Authenticator(AuthConfig(tokens=TOKENS))
    bearer = ("authorization", f"Bearer {ADMIN_TOKEN}")
    assert auth.identify([bearer], {}).name == "ops"
    with pytest.raises(AirlockError, match="more than one"):
        auth.identify([bearer, ("authorization", f"Bearer {CONVERT_TOKEN}")], {})


# -- tokens over real gRPC ----------------------------------------------------------------------

def test_no_token_is_unauthenticated_with_a_reason(make_broker: BrokerFactory, artifact: Path,
                                                   tmp_path: Path) -> None:
    address, backend = make_broker(AuthConfig(tokens=TOKENS))
    with Client(address, token="") as client, pytest.raises(AccessDenied) as info:
        client.convert(artifact, tmp_path / "out")
    assert info.value.code == "UNAUTHENTICATED" and info.value.reason == "UNAUTHENTICATED"
    assert info.value.kind == "denied"
    assert backend.specs == [] and backend.prepared == 0  # nothing ran, nothing was spooled
    assert not list((tmp_path / "spool").glob("uploads/*"))
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as raw:
        pb_grpc.AdminServiceStub(channel).GetPoolStatus(pb.GetPoolStatusRequest(), timeout=10)
    assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
    detail = error_info(raw.value)
    assert (detail.reason, detail.domain) == ("UNAUTHENTICATED", "airlock.v1")
    assert detail.metadata["kind"] == "denied"


@pytest.mark.parametrize("header", [
    f"Bearer {mint_token()}",  # well formed, unknown
    f"Bearer {CONVERT_TOKEN}x",  # one character off
    f"Basic {CONVERT_TOKEN}",  # wrong scheme
    "Bearer ",
], ids=["unknown", "one-character-off", "basic-scheme", "empty"])
def test_a_wrong_token_is_unauthenticated(make_broker: BrokerFactory, header: str) -> None:
    address, _ = make_broker(AuthConfig(tokens=TOKENS))
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as raw:
        pb_grpc.AdminServiceStub(channel).GetPoolStatus(
            pb.GetPoolStatusRequest(), timeout=10, metadata=(("authorization", header),))
    assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(raw.value).reason == "UNAUTHENTICATED"
    assert CONVERT_TOKEN not in (raw.value.details() or "")


def test_convert_role_cannot_operate_the_pools(make_broker: BrokerFactory, artifact: Path,
                                               tmp_path: Path) -> None:
    address, backend = make_broker(AuthConfig(tokens=TOKENS))
    with Client(address, token=CONVERT_TOKEN) as client:
        result = client.convert(artifact, tmp_path / "out")
        assert result.format == "safetensors"
        for operation, needs in ((client.restart_pools, "admin"), (client.drain_pools, "admin"),
                                 (client.pool_status, "observe"), (client.selftest, "admin")):
            with pytest.raises(AccessDenied) as info:
                operation()
            assert info.value.code == "PERMISSION_DENIED"
            assert info.value.reason == "PERMISSION_DENIED"
            assert "ci-batch" in info.value.message
            assert f"the {needs} role" in info.value.message
    assert len(backend.specs) == 1


def test_observe_role_reads_the_pools_status_and_changes_nothing(
        make_broker: BrokerFactory, artifact: Path, tmp_path: Path) -> None:
    """Found by review: a monitor that wanted the pools' status needed the role that drains
    and restarts them. ``observe`` reads the status alone; ``admin`` includes it."""
    observer = mint_token()
    address, backend = make_broker(AuthConfig(tokens=(*TOKENS, TokenEntry(
        "dashboard", frozenset({Role.OBSERVE}), token_digest(observer)))))
    with Client(address, token=observer) as client:
        assert [p.profile for p in client.pool_status()]
        for operation in (client.restart_pools, client.drain_pools, client.resume_pools,
                          client.selftest, lambda: client.convert(artifact, tmp_path / "o")):
            with pytest.raises(AccessDenied) as info:
                operation()
            assert info.value.code == "PERMISSION_DENIED" and "dashboard" in info.value.message
    assert backend.specs == []


def test_admin_role_operates_the_pools_but_does_not_convert(
        make_broker: BrokerFactory, artifact: Path, tmp_path: Path) -> None:
    address, backend = make_broker(AuthConfig(tokens=TOKENS))
    with Client(address, token=ADMIN_TOKEN) as client:
        assert client.restart_pools() == 0
        assert [p.profile for p in client.pool_status()]
        assert client.max_concurrent_jobs() == 2  # [broker] max_concurrent_jobs, the default
        client.drain_pools()
        client.resume_pools()
        with pytest.raises(AccessDenied) as info:
            client.convert(artifact, tmp_path / "out")
    assert info.value.code == "PERMISSION_DENIED"
    assert backend.specs == []


def test_health_reflection_and_the_public_key_stay_open(make_broker: BrokerFactory) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    address, _ = make_broker(AuthConfig(tokens=TOKENS))
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "airlock.v1.AdminService" in names
        key = pb_grpc.ConversionServiceStub(channel).GetProvenanceKey(
            pb.GetProvenanceKeyRequest(), timeout=10)
        assert "PUBLIC KEY" in key.public_key_pem


def test_audit_and_logs_carry_the_principal_never_the_token(
        make_broker: BrokerFactory, artifact: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(PrincipalFilter())  # as logs.configure installs it
    address, _ = make_broker(AuthConfig(tokens=TOKENS))
    with Client(address, token=CONVERT_TOKEN) as client:
        client.convert(artifact, tmp_path / "out")
    with Client(address, token=ADMIN_TOKEN) as client:
        client.restart_pools()
        with pytest.raises(AccessDenied):
            client.convert(artifact, tmp_path / "out2")
    lines = audit_lines(tmp_path, 2)
    [line] = [d for d in lines if "job_id" in d]
    assert (line["principal"], line["auth"], line["outcome"]) == ("ci-batch", "token", "ok")
    [action] = [d for d in lines if "action" in d]  # the restart: who asked, never the token
    assert (action["action"], action["principal"], action["auth"]) == ("restart", "ops", "token")
    job_logs = [r for r in caplog.records if getattr(r, "job_id", None) == line["job_id"]]
    assert len(job_logs) >= 2  # received, converted
    assert {getattr(r, "principal", None) for r in job_logs} == {"ci-batch"}
    assert any("RestartPools called by ops" in r.getMessage() for r in caplog.records)
    assert any("refused /airlock.v1.ConversionService/Convert" in r.getMessage()
               and "ops" in r.getMessage() for r in caplog.records)
    everything = (tmp_path / "spool" / "audit.jsonl").read_text() + caplog.text
    for secret in (CONVERT_TOKEN, ADMIN_TOKEN):
        assert secret not in everything
        assert secret.removeprefix("airlock_") not in everything


def test_client_refuses_to_send_a_token_in_cleartext_beyond_loopback() -> None:
    with pytest.raises(ValueError, match="cleartext"):
        Client("10.1.2.3:50051", token=CONVERT_TOKEN)
    assert CONVERT_TOKEN not in repr(ChannelSettings(token=CONVERT_TOKEN))


def test_client_takes_the_token_from_the_environment(
        make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    address, _ = make_broker(AuthConfig(tokens=TOKENS))
    monkeypatch.setenv("AIRLOCK_TOKEN", ADMIN_TOKEN)
    with Client(address) as client:
        assert client.restart_pools() == 0


# -- TLS and mutual TLS -------------------------------------------------------------------------

def test_tls_with_a_token(make_broker: BrokerFactory, artifact: Path, tmp_path: Path,
                          pki: dict[str, Any]) -> None:
    server = pki["server"]
    address, _ = make_broker(AuthConfig(tls_cert=server.cert, tls_key=server.key,
                                        tokens=TOKENS))
    with Client(address, token=CONVERT_TOKEN, tls_ca=pki["ca"].cert_path) as client:
        assert client.convert(artifact, tmp_path / "out").format == "safetensors"
    with Client(address, token=CONVERT_TOKEN, retry_attempts=1) as plain, \
            pytest.raises(ServiceUnavailable):
        plain.convert(artifact, tmp_path / "out")  # a plaintext client cannot even connect
    wrong_ca = TestCA(tmp_path / "other-ca")
    with Client(address, token=CONVERT_TOKEN, tls_ca=wrong_ca.cert_path,
                retry_attempts=1) as client, pytest.raises(ServiceUnavailable):
        client.convert(artifact, tmp_path / "out")
    assert audit_lines(tmp_path, 1)[0]["principal"] == "ci-batch"


def _mtls(pki: dict[str, Any], **extra: Any) -> AuthConfig:
    return AuthConfig(tls_cert=pki["server"].cert, tls_key=pki["server"].key,
                      client_ca=pki["ca"].cert_path, **extra,
                      subjects=(SubjectEntry("alice.ops.example",
                                             frozenset({Role.ADMIN, Role.CONVERT})),))


def test_mtls_without_a_client_certificate_fails_the_handshake(
        make_broker: BrokerFactory, pki: dict[str, Any]) -> None:
    address, _ = make_broker(_mtls(pki, tokens=TOKENS))
    # Not even a valid token gets past a handshake without a certificate.
    with Client(address, tls_ca=pki["ca"].cert_path, token=ADMIN_TOKEN,
                retry_attempts=1) as client, pytest.raises(ServiceUnavailable):
        client.pool_status()


def test_mtls_certificate_from_another_ca_fails_the_handshake(
        make_broker: BrokerFactory, pki: dict[str, Any]) -> None:
    address, _ = make_broker(_mtls(pki))
    forged = pki["forged"]  # same names as alice's, signed by a stranger
    with Client(address, tls_ca=pki["ca"].cert_path, client_cert=forged.cert,
                client_key=forged.key, retry_attempts=1) as client, \
            pytest.raises(ServiceUnavailable):
        client.pool_status()


def test_mtls_subject_maps_to_roles(make_broker: BrokerFactory, artifact: Path, tmp_path: Path,
                                    pki: dict[str, Any]) -> None:
    address, _ = make_broker(_mtls(pki))
    alice, mallory = pki["alice"], pki["mallory"]
    with Client(address, tls_ca=pki["ca"].cert_path, client_cert=alice.cert,
                client_key=alice.key) as client:
        assert client.restart_pools() == 0
        client.convert(artifact, tmp_path / "out")
    restart, line = audit_lines(tmp_path, 2)
    assert (restart["action"], restart["principal"]) == ("restart", "alice.ops.example")
    assert (line["principal"], line["auth"]) == ("alice.ops.example", "certificate")
    # A certificate the CA signed, for a subject with no roles: authenticated, not authorized.
    with Client(address, tls_ca=pki["ca"].cert_path, client_cert=mallory.cert,
                client_key=mallory.key) as client, pytest.raises(AccessDenied) as info:
        client.pool_status()
    assert info.value.code == "PERMISSION_DENIED" and "mallory" in info.value.message


def test_a_certificate_with_sans_is_not_named_by_its_cn(
        make_broker: BrokerFactory, pki: dict[str, Any]) -> None:
    # A CA that issues "mallory.example" may let its holder pick any CN: RFC 6125 says a CN
    # beside SANs is no identity. Mallory's CN names alice; only the SAN may count.
    address, _ = make_broker(_mtls(pki))
    disguised = pki["ca"].issue("alice.ops.example", dns=("mallory.example",), client=True)
    with Client(address, tls_ca=pki["ca"].cert_path, client_cert=disguised.cert,
                client_key=disguised.key) as client, pytest.raises(AccessDenied) as info:
        client.pool_status()
    assert info.value.code == "PERMISSION_DENIED"
    assert info.value.message.startswith("mallory.example may not call")


def test_a_wrong_token_is_not_rescued_by_a_good_certificate(
        make_broker: BrokerFactory, pki: dict[str, Any]) -> None:
    address, _ = make_broker(_mtls(pki, tokens=TOKENS))
    alice = pki["alice"]
    with Client(address, tls_ca=pki["ca"].cert_path, client_cert=alice.cert,
                client_key=alice.key, token=mint_token()) as client, \
            pytest.raises(AccessDenied) as info:
        client.pool_status()
    assert info.value.code == "UNAUTHENTICATED"


# -- the command line ---------------------------------------------------------------------------

def _cli(*args: str, env: dict[str, str] | None = None,
         command: Sequence[str] = (AIRLOCK,)) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})}, check=False)


def test_token_create_prints_the_token_once_and_a_config_line_that_accepts_it(
        tmp_path: Path) -> None:
    done = _cli("token", "create", "--principal", "nightly", "--role", "convert",
                "--role", "admin", command=BROKER)
    assert done.returncode == 0, done.stderr
    token = done.stdout.split("token: ", 1)[1].split()[0]
    assert token.startswith("airlock_") and done.stdout.count(token) == 1
    snippet = done.stdout[done.stdout.index("[[auth.tokens]]"):]
    [entry] = tomllib.loads(snippet)["auth"]["tokens"]
    assert entry == {"principal": "nightly", "roles": ["admin", "convert"],
                     "sha256": token_digest(token)}
    (tmp_path / "c.toml").write_text(snippet)
    assert BrokerConfig.load(tmp_path / "c.toml").auth.tokens[0].principal == "nightly"
    as_json = json.loads(_cli("token", "create", "--principal", "x", "--role", "admin",
                              "--json", command=BROKER).stdout)
    assert as_json["sha256"] == token_digest(as_json["token"])
    assert _cli("token", "create", "--principal", "bad name!", "--role", "admin",
                command=BROKER).returncode == 2


def test_cli_exit_codes_for_denied_calls(make_broker: BrokerFactory, tmp_path: Path) -> None:
    address, _ = make_broker(AuthConfig(tokens=TOKENS))
    server = {"AIRLOCK_SERVER": address}
    none = _cli("pool", "status", env=server)
    assert none.returncode == 4 and "UNAUTHENTICATED" in none.stderr
    weak = _cli("pool", "restart", env={**server, "AIRLOCK_TOKEN": CONVERT_TOKEN})
    assert weak.returncode == 4 and "PERMISSION_DENIED" in weak.stderr
    (tmp_path / "token").write_text(ADMIN_TOKEN + "\n")
    ok = _cli("pool", "status", "--json", "--token-file", str(tmp_path / "token"), env=server)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["pools"]
    remote = _cli("pool", "status", "--server", "192.0.2.1:50051",
                  env={"AIRLOCK_TOKEN": ADMIN_TOKEN})
    assert remote.returncode == 2 and "cleartext" in remote.stderr


def test_refusals_write_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Found by review: every refused call wrote a warning, and anyone who can reach the port
    can be refused: a flood filled the disk or made journald drop the broker's other lines.
    At most 20 lines in 10 s now; the next one says how many were left out."""
    from airlock_broker.api.auth import AuthInterceptor
    from airlock_broker.ops.log_budget import LogBudget

    class Call:
        def peer(self) -> str:
            return "ipv4:192.0.2.7:4242"

        def invocation_metadata(self) -> list[tuple[str, str]]:
            return [("authorization", "Bearer not-a-token")]

        def auth_context(self) -> dict[str, Any]:
            return {}

    interceptor = AuthInterceptor(Authenticator(AuthConfig(tokens=TOKENS)))
    now = [0.0]
    interceptor.refusals = LogBudget(clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="airlock_broker.api.auth")
    for _ in range(1000):
        with pytest.raises(AirlockError):
            interceptor._admit("/airlock.v1.ConversionService/Convert",
                               "airlock.v1.ConversionService", Call())
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 20 and "not logged" not in lines[-1]
    now[0] += 10  # the next window: its first line tells of the ones left out
    with pytest.raises(AirlockError):
        interceptor._admit("/airlock.v1.ConversionService/Convert",
                           "airlock.v1.ConversionService", Call())
    assert caplog.records[-1].getMessage().endswith("(980 more like it not logged)")

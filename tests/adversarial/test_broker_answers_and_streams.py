"""Threat class: exhausting the broker itself, not a sandbox (issue 11, §3). A caller that
never reads its answer, one principal taking every admission place, idle health watchers:
each must leave other callers converting as usual, against the real broker and engine.

The broker here is this module's own (``limited``): two tokens, a short answer drain
deadline and a small bound on open streams, so each attack reaches its limit in seconds.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.security.auth_config import mint_token, token_digest
from airlock_client import Client
from airlock_client._wire import error_from_rpc
from tests.conftest import (
    IMAGE,
    BrokerProcess,
    assert_no_sandbox_left,
    free_port,
    spool_dirs,
    start_broker,
)
from tests.fixtures import models

pytestmark = pytest.mark.adversarial

ALICE, BOB = mint_token(), mint_token()
DRAIN_SECONDS = 8
MAX_OPEN_STREAMS = 4
PER_PRINCIPAL = 3


@pytest.fixture(scope="module")
def limited(docker_client, tmp_path_factory) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("limited-broker")
    metrics = f"127.0.0.1:{free_port()}"
    tokens = "".join(f'[[auth.tokens]]\nprincipal = "{name}"\nroles = ["convert"]\n'
                     f'sha256 = "{token_digest(token)}"\n\n'
                     for name, token in (("alice", ALICE), ("bob", BOB)))
    config = home / "airlock.toml"
    config.write_text(
        f"[broker]\nmax_concurrent_jobs = 2\nmax_queued_jobs = 4\n"
        f"max_jobs_per_principal = {PER_PRINCIPAL}\nanswer_drain_seconds = {DRAIN_SECONDS}\n"
        f'metrics_listen = "{metrics}"\n\n'
        f"[rpc]\nmax_open_streams = {MAX_OPEN_STREAMS}\n\n"
        f'[pools]\nmin_warm = 2\nprofiles = ["light"]\nstream_window_seconds = 0\n\n'
        f"[sandbox]\nimage = {IMAGE!r}\n\n{tokens}")
    proc = start_broker(home, "--config", str(config))
    proc.metrics = metrics  # type: ignore[attr-defined]
    yield proc
    code = proc.stop()
    assert code == 0, f"broker exited {code}:\n{proc.log.read_text()[-3000:]}"


def _own_channel(address: str) -> grpc.Channel:
    """A channel on a TCP connection of its own (gRPC shares them between channels)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _requests(data: bytes, key: str = "", hold: threading.Event | None = None
              ) -> Iterator[pb.ConvertRequest]:
    yield pb.ConvertRequest(metadata=pb.ConvertMetadata(size_bytes=len(data),
                                                        idempotency_key=key,
                                                        declared_format=pb.ARTIFACT_FORMAT_NUMPY))
    if hold is not None:
        hold.wait(120)
    for start in range(0, len(data), 1 << 20):
        block = data[start:start + (1 << 20)]
        yield pb.ConvertRequest(chunk=pb.Chunk(data=block, crc32=zlib.crc32(block)))


def _convert(broker: BrokerProcess, artifact: Path, out: Path, token: str,
             timeout: float) -> float:
    began = time.monotonic()
    with Client(broker.address, token=token, timeout=timeout, retry_attempts=1) as client:
        client.convert(artifact, out)
    return time.monotonic() - began


def _log(broker: BrokerProcess) -> list[dict[str, Any]]:
    lines = []
    for line in broker.log.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def _audit(broker: BrokerProcess) -> list[dict[str, Any]]:
    path = broker.spool / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _converted_by(broker: BrokerProcess, principal: str) -> int:
    return sum(1 for d in _log(broker) if d.get("principal") == principal
               and " converted " in str(d.get("message", "")))


def _jobs_in_broker(broker: BrokerProcess) -> float:
    text = urllib.request.urlopen(f"http://{broker.metrics}/metrics",  # type: ignore[attr-defined]
                                  timeout=5).read().decode()
    found = re.search(r"^airlock_jobs_in_broker (\S+)$", text, re.MULTILINE)
    assert found, text
    return float(found.group(1))


def test_callers_that_never_read_their_answer_do_not_block_other_conversions(
        limited: BrokerProcess, docker_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    benign, _ = models.make_npy(tmp_path / "benign")
    usual = min(_convert(limited, benign, tmp_path / f"usual-{i}.safetensors", BOB, 300)
                for i in range(2))
    # 32 MiB of output each: far more than HTTP/2 flow control lets the broker write to a
    # caller that does not read (4-8 MiB), so both answers stall for good.
    big = tmp_path / "big.npy"
    np.save(big, np.arange(8 * 1024 * 1024, dtype=np.float32), allow_pickle=False)
    data = big.read_bytes()
    auth = (("authorization", f"Bearer {ALICE}"),)
    before = _converted_by(limited, "alice")
    channels = [_own_channel(limited.address) for _ in range(2)]
    try:
        # As many such callers as there are sandboxes; one sends an idempotency key.
        stalled = [pb_grpc.ConversionServiceStub(ch).Convert(_requests(data, key),
                                                             metadata=auth)
                   for ch, key in zip(channels, ("stalled-kept", ""), strict=True)]
        _wait(lambda: _converted_by(limited, "alice") == before + 2, 300,
              "both stalled callers' jobs to convert")
        bound = max(10 * usual, 60.0)
        took = _convert(limited, benign, tmp_path / "benign.safetensors", BOB, bound)
        assert took < bound, (took, usual)
        # The stalled answers end at the drain deadline, with the reason, and leave nothing.
        _wait(lambda: sum(d.get("reason") == "DEADLINE_EXCEEDED" for d in _audit(limited))
              == 2, 120, "the stalled answers to reach their drain deadline")
        ended = [d for d in _audit(limited) if d.get("reason") == "DEADLINE_EXCEEDED"]
        assert {d["principal"] for d in ended} == {"alice"}
        assert all(f"not read within {DRAIN_SECONDS} s" in d["message"] for d in ended)
        assert_no_sandbox_left(docker_client)
        assert [p for d in spool_dirs(limited.spool, "uploads") if d.is_dir()
                for p in d.iterdir()] == []
        by_key = {d["idempotency_key"]: d["job_id"] for d in ended}

        def kept() -> set[str]:
            return {p.name for p in (limited.spool / "results").iterdir()}

        # The answer no store keeps is unlinked on a worker thread, just after its end.
        _wait(lambda: by_key[""] not in kept(), 60, "the unkept answer's file to go")
        assert by_key["stalled-kept"] in kept()
        # The one that reads at last gets the reason after what was already queued.
        with pytest.raises(grpc.RpcError) as info:
            for _ in stalled[1]:
                pass
        assert error_from_rpc(info.value).reason == "DEADLINE_EXCEEDED"  # type: ignore[attr-defined]
        stalled[0].cancel()
    finally:
        for ch in channels:
            ch.close()


def test_one_principal_cannot_take_every_admission_place(
        limited: BrokerProcess, tmp_path: Path) -> None:
    artifact, _ = models.make_npy(tmp_path / "in")
    data = artifact.read_bytes()
    auth = (("authorization", f"Bearer {ALICE}"),)
    hold = threading.Event()
    alice = _own_channel(limited.address)
    held: list[Any] = []
    try:
        # Uploads that never finish: each holds a place in the broker and no sandbox.
        held.extend(pb_grpc.ConversionServiceStub(alice).Convert(_requests(data, hold=hold),
                                                                 metadata=auth, timeout=120)
                    for _ in range(PER_PRINCIPAL))
        _wait(lambda: _jobs_in_broker(limited) == PER_PRINCIPAL, 60,
              "alice's uploads to be admitted")
        with pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.ConversionServiceStub(alice).Convert(_requests(data), metadata=auth,
                                                              timeout=60))
        refused = error_from_rpc(info.value)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.reason == "BUSY", refused  # type: ignore[attr-defined]
        assert (f"{PER_PRINCIPAL} jobs of principal 'alice' in progress, the limit per "
                f"principal is {PER_PRINCIPAL} (of 6 places)") in refused.message  # type: ignore[attr-defined]
        # Bob is admitted and converts while alice holds her places.
        _convert(limited, artifact, tmp_path / "bob.safetensors", BOB, 300)
        assert _jobs_in_broker(limited) == PER_PRINCIPAL
    finally:
        for call in held:
            call.cancel()
        hold.set()
        alice.close()


def test_idle_health_watchers_are_bounded_and_cannot_refuse_other_calls(
        limited: BrokerProcess, tmp_path: Path) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    channel = _own_channel(limited.address)
    watchers: list[Any] = []
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(MAX_OPEN_STREAMS):
            watchers.append(health.Watch(health_pb2.HealthCheckRequest(service="")))
            assert next(watchers[-1]).status == serving
        one_more = health.Watch(health_pb2.HealthCheckRequest(service=""))
        with pytest.raises(grpc.RpcError) as info:
            next(one_more)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"the limit is {MAX_OPEN_STREAMS}" in (info.value.details() or "")
        # Probes and conversions are unaffected.
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status \
            == serving
        artifact, _ = models.make_npy(tmp_path / "in")
        _convert(limited, artifact, tmp_path / "out.safetensors", BOB, 300)
    finally:
        for w in watchers:
            w.cancel()
        channel.close()

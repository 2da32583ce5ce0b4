"""A client that lost its answer mid-stream retries with the same idempotency key and gets the
first attempt's result, without a second sandbox (real engine, real image)."""

from __future__ import annotations

import hashlib
import time
import zlib
from pathlib import Path
from typing import Any

import grpc
import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from tests.adversarial import payloads
from tests.conftest import IMAGE
from tests.integration import pool_helpers as ph

pytestmark = pytest.mark.integration


def _requests(data: bytes, key: str) -> list[pb.ConvertRequest]:
    return [pb.ConvertRequest(metadata=pb.ConvertMetadata(size_bytes=len(data),
                                                          idempotency_key=key)),
            pb.ConvertRequest(chunk=pb.Chunk(data=data, crc32=zlib.crc32(data)))]


def _sandboxes_created(docker_client: Any, identity: str, since: float) -> int:
    events = docker_client.api.events(since=int(since) - 1, until=f"{time.time():.6f}",
                                      decode=True, filters={"type": "container",
                                                            "event": "create"})
    return sum(1 for e in events
               if e.get("Actor", {}).get("Attributes", {}).get(ph.LABEL_BROKER) == identity
               and e.get("timeNano", 0) >= since * 1e9)  # not the start-up self-test's probe


def test_a_retry_after_a_lost_answer_gets_the_first_result_without_a_second_sandbox(
        docker_client: Any, tmp_path: Path) -> None:
    config = ph.write_config(tmp_path, {"min_warm": 0}, sandbox={"image": IMAGE})
    with ph.running_broker(tmp_path, config, docker_client) as broker:
        began = time.time()
        data = payloads.reduce_pickle(payloads.fake_success_source(sleep_seconds=1))
        with grpc.insecure_channel(broker.address) as channel:
            stub = pb_grpc.ConversionServiceStub(channel)
            first = stub.Convert(iter(_requests(data, "lost-answer")), timeout=120)
            header = next(first).result  # the job is done and its result announced ...
            first.cancel()  # ... but the client goes away before the bytes arrive
            messages = list(stub.Convert(iter(_requests(data, "lost-answer")), timeout=120))
        again = messages[0].result
        output = b"".join(m.chunk.data for m in messages[1:])
        assert again.replayed and not header.replayed
        assert again.job_id == header.job_id
        assert hashlib.sha256(output).hexdigest() == header.output_sha256
        assert len(output) == header.output_size
        assert _sandboxes_created(docker_client, broker.identity, began) == 1

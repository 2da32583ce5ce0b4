"""Property: whatever a client streams, the broker answers with a result or a known reason.

Never INTERNAL, never a hang, and nothing left in the spool afterwards.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.config import BrokerConfig
from airlock_broker.errors import Reason
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_client._wire import error_from_rpc
from tests.unit.fakes import FakeSandbox, running_broker
from tests.unit.test_broker import leftovers, settled, write_safetensors

PICKLE_PREFIX = b"\x80\x04\x95"

metadata = st.builds(
    pb.ConvertMetadata,
    declared_format=st.integers(0, 12),
    target=st.integers(0, 5),
    loading_policy=st.integers(0, 4),
    idempotency_key=st.text(max_size=200),
    size_bytes=st.one_of(st.just(0), st.integers(0, 2**40)),
    sha256=st.one_of(st.just(""), st.text(max_size=70)),
    filename=st.text(max_size=300),
    timeout_seconds=st.integers(0, 5),
    inputs=st.lists(st.builds(pb.TensorSpec, name=st.text(max_size=20),
                              dtype=st.sampled_from(["float32", "int64", "x", ""]),
                              shape=st.lists(st.integers(-3, 2**33), max_size=10)),
                    max_size=3),
)
chunk_data = st.one_of(st.binary(max_size=512),
                       st.binary(max_size=256).map(lambda b: PICKLE_PREFIX + b))


@st.composite
def chunk(draw: st.DrawFn) -> pb.ConvertRequest:
    data = draw(chunk_data)
    crc = zlib.crc32(data) if draw(st.booleans()) else draw(st.integers(0, 2**32 - 1))
    return pb.ConvertRequest(chunk=pb.Chunk(data=data, crc32=crc))


messages = st.lists(st.one_of(metadata.map(lambda m: pb.ConvertRequest(metadata=m)), chunk()),
                    max_size=6)
KNOWN = {r.value for r in Reason} - {Reason.INTERNAL.value}


def test_any_request_stream_gets_a_result_or_a_known_reason(tmp_path: Path) -> None:
    config = BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "spool",
                          pools=PoolSettings(min_warm=0), selftest_on_start=False,
                          upload_idle_seconds=5,
                          provenance_key=tmp_path / "provenance-key.pem")
    backend = FakeSandbox(config.spool_root, write_safetensors)
    with running_broker(config, backend) as broker, \
            grpc.insecure_channel(f"127.0.0.1:{broker.port}") as channel:
        stub = pb_grpc.ConversionServiceStub(channel)

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(messages)
        def check(stream: list[pb.ConvertRequest]) -> None:
            try:
                responses = list(stub.Convert(iter(stream), timeout=20))
            except grpc.RpcError as exc:
                assert rpc_status.from_call(exc) is not None, exc
                reason = error_from_rpc(exc).reason  # type: ignore[attr-defined]
                assert reason in KNOWN, (reason, exc.details())
            else:
                assert responses[0].WhichOneof("payload") == "result"
            assert leftovers(tmp_path) == []

        check()
    assert settled(backend) == set()

"""Sizes and limits of big checkpoints (issue 13): where each cap is decided, and the refusals
that say which limit to raise, with the numbers. Real gRPC broker, fake sandbox, fake disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from safetensors.numpy import save

from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.input_room import SpoolSettings
from airlock_broker.conversion.output_room import OutputRooms
from airlock_broker.conversion.spool_space import answer_bytes
from airlock_broker.conversion.upload_limits import MiB, UploadLimits
from airlock_broker.errors import AirlockError, Reason
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.validation.limits import GiB, OutputLimits
from airlock_broker.validation.onnx_check import validate_onnx_bytes
from airlock_broker.validation.onnx_info import check_onnx_size
from airlock_client import Client, ConversionError
from airlock_sandbox.contract import OUTPUT_NAMES, JobSpec, OutputFormat, Target
from airlock_sandbox.policy import OUTPUT_HEADROOM_BYTES, SandboxPolicy
from tests.unit.fakes import FakeSandbox, running_broker
from tests.unit.test_broker import PICKLE
from tests.unit.test_spool_space import Disk, on_fake_disk

RESERVE = 100 * MiB
#: A checkpoint's worth of input (dense: every block is data); its output (the fake
#: worker's) is about as large.
INPUT = PICKLE + b"\x01" * (4 * MiB - len(PICKLE))
#: The same size, but all holes after its first bytes: what it occupies is what counts.
SPARSE = PICKLE + bytes(4 * MiB - len(PICKLE))
OUTPUT = save({"w": np.arange(MiB, dtype=np.float32)})  # 4 MiB of tensor data


def test_defaults_take_a_16_gib_file_and_keep_the_output_inside_the_sandboxs_memory() -> None:
    config = BrokerConfig(state_root=Path("/nonexistent"), unix_socket=None)
    assert config.max_artifact_bytes == 16 * GiB
    # The output a job may make is the sandbox's output tmpfs, decided once, below the
    # validator's own (format) cap, and it fits in the sandbox's memory beside the worker.
    limits = config.job_output_limits
    assert limits.max_output_bytes == config.sandbox.output_bytes < config.output.max_output_bytes
    assert config.sandbox.output_bytes + OUTPUT_HEADROOM_BYTES <= config.sandbox.memory_bytes
    assert limits.max_onnx_bytes == config.output.max_onnx_bytes < 2 * GiB


def test_an_output_tmpfs_the_sandboxs_memory_cannot_hold_is_refused_with_both_numbers() -> None:
    with pytest.raises(ValueError) as refused:
        SandboxPolicy(memory_bytes=4 * GiB, output_bytes=4 * GiB)
    message = str(refused.value)
    assert str(4 * GiB) in message and "memory_bytes" in message and "output_bytes" in message
    SandboxPolicy(memory_bytes=18 * GiB, output_bytes=16 * GiB)  # raised together: fine


def test_the_answer_is_estimated_from_the_input_within_the_formats_cap() -> None:
    limits = OutputLimits(max_output_bytes=10 * MiB, max_onnx_bytes=2 * MiB)
    assert answer_bytes(4 * MiB, Target.SAFETENSORS, limits) == 4 * MiB
    assert answer_bytes(40 * MiB, Target.AUTO, limits) == 10 * MiB
    assert answer_bytes(4 * MiB, Target.ONNX, limits) == 2 * MiB


def test_an_onnx_output_over_its_cap_is_refused_with_the_advice_to_use_safetensors() -> None:
    limits = OutputLimits(max_onnx_bytes=1 * MiB)
    for refuse in (lambda: check_onnx_size(3 * MiB, limits),
                   lambda: validate_onnx_bytes(bytes(3 * MiB), limits)):
        with pytest.raises(AirlockError) as refused:
            refuse()
        assert refused.value.reason is Reason.OUTPUT_TOO_LARGE
        assert str(3 * MiB) in refused.value.message and str(MiB) in refused.value.message
        assert "safetensors instead" in refused.value.message


# -- the spool's reserve, for the whole job, before it starts ---------------------------------


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Disk:
    """The broker's spool on a fake disk."""
    return on_fake_disk(monkeypatch, tmp_path / "spool")


def _writes_output(spec: JobSpec, data: bytes, out: Path) -> int:
    (out / OUTPUT_NAMES[OutputFormat.SAFETENSORS]).write_bytes(OUTPUT)
    return 0


def _broker(tmp_path: Path, **config: Any) -> Iterator[tuple[str, FakeSandbox]]:
    """A real broker on the fake disk whose fake worker writes ``OUTPUT``."""
    spool = tmp_path / "spool"
    # Inputs on the disk these tests measure (the RAM spool off: test_ram_spool.py has the
    # reserve with inputs in RAM).
    defaults: dict[str, Any] = {"pools": PoolSettings(min_warm=0),
                                "spool": SpoolSettings(ram_bytes=0)}
    settings = BrokerConfig(listen="127.0.0.1:0", state_root=spool, selftest_on_start=False,
                            provenance_key=tmp_path / "provenance-key.pem",
                            **{"upload": UploadLimits(spool_min_free_bytes=RESERVE),
                               **defaults, **config})
    backend = FakeSandbox(spool, _writes_output)
    with running_broker(settings, backend) as running:
        yield f"127.0.0.1:{running.port}", backend


@pytest.fixture
def broker(tmp_path: Path, disk: Disk) -> Iterator[tuple[str, FakeSandbox]]:
    yield from _broker(tmp_path, verify_integrity=False)


@pytest.mark.parametrize("local_transfer", [False, True])
def test_a_job_whose_output_would_cross_the_reserve_is_refused_before_it_starts(
        broker: tuple[str, FakeSandbox], disk: Disk, tmp_path: Path,
        local_transfer: bool) -> None:
    address, backend = broker
    src = tmp_path / "shard.bin"
    src.write_bytes(INPUT)
    # Room for the upload, not for the upload and then its answer.
    disk.free = RESERVE + 6 * MiB
    with Client(address, retry_attempts=1, local_transfer=local_transfer) as client, \
            pytest.raises(ConversionError) as refused:
        client.convert(src, tmp_path / "out.safetensors", target="safetensors")
    assert refused.value.reason == "SPOOL_FULL"
    message = str(refused.value)
    assert "this job's output (about its input's 4.0 MiB of data) needs 4.0 MiB" in message
    assert "102.0 MiB free" in message and "keeps 100.0 MiB free" in message
    assert backend.specs == []  # no sandbox ran
    assert os.listdir(tmp_path / "spool" / "uploads") == []


def test_a_sparse_input_claims_the_room_of_its_data_not_of_its_length(
        broker: tuple[str, FakeSandbox], disk: Disk, tmp_path: Path) -> None:
    address, backend = broker
    src = tmp_path / "sparse.bin"
    src.write_bytes(SPARSE)
    # Its upload occupies its data (1 MiB: the rest are holes); its answer, 4 MiB of written
    # tensors, is claimed at that size once known (answers.spool_answer), with a little over.
    disk.free = RESERVE + 6 * MiB
    with Client(address, retry_attempts=1, local_transfer=False) as client:
        client.convert(src, tmp_path / "out.safetensors", target="safetensors")
    assert len(backend.specs) == 1


def test_with_room_for_input_and_output_the_job_runs(
        broker: tuple[str, FakeSandbox], disk: Disk, tmp_path: Path) -> None:
    address, backend = broker
    src = tmp_path / "shard.bin"
    src.write_bytes(INPUT)
    disk.free = RESERVE + 9 * MiB  # the upload, then the answer (and a little)
    with Client(address, retry_attempts=1, local_transfer=False) as client:
        client.convert(src, tmp_path / "out.safetensors", target="safetensors")
    assert len(backend.specs) == 1
    assert backend.specs[0].max_output_bytes == SandboxPolicy().output_bytes


def test_the_worker_refuses_an_onnx_model_past_protobufs_limit_naming_safetensors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    from airlock_broker.validation.onnx_worker import tiny_model
    from airlock_sandbox.contract import WorkerExit
    from airlock_worker import onnx_out
    from airlock_worker.errors import WorkerError

    model = onnx.ModelProto.FromString(tiny_model())
    monkeypatch.setattr(onnx_out, "PROTOBUF_LIMIT", 8)  # what 2 GiB is to a real model
    with pytest.raises(WorkerError) as refused:
        onnx_out.finish(model)
    assert refused.value.exit is WorkerExit.OUTPUT_TOO_LARGE
    assert str(model.ByteSize()) in str(refused.value)
    assert "safetensors instead" in str(refused.value)


# -- outputs too large for RAM: a disk-backed filesystem, sized from the input ---------------


ROOMS = OutputRooms(OutputLimits(max_output_bytes=64 * GiB), tmpfs_bytes=3 * GiB,
                    disk_max_bytes=16 * GiB)


@pytest.mark.parametrize(("target", "occupied", "disk_bytes", "cap"), [
    # a shard that fits the tmpfs with a quarter and 64 MiB to spare stays in RAM
    (Target.SAFETENSORS, 2 * GiB, 0, 3 * GiB),
    # a 10 GB shard: a disk-backed output of its data, a quarter more and 64 MiB
    (Target.SAFETENSORS, 10 * GiB, 10 * GiB + 10 * GiB // 4 + 64 * MiB,
     10 * GiB + 10 * GiB // 4 + 64 * MiB),
    (Target.AUTO, 10 * GiB, 10 * GiB + 10 * GiB // 4 + 64 * MiB,
     10 * GiB + 10 * GiB // 4 + 64 * MiB),
    # never more than the configured largest
    (Target.SAFETENSORS, 15 * GiB, 16 * GiB, 16 * GiB),
    # ONNX is parsed in memory and capped far below: never on disk
    (Target.ONNX, 10 * GiB, 0, 3 * GiB),
])
def test_an_output_too_large_for_the_tmpfs_gets_a_disk_backed_room_sized_from_the_input(
        target: Target, occupied: int, disk_bytes: int, cap: int) -> None:
    room = ROOMS.for_job(target, occupied)
    assert room.disk_bytes == disk_bytes
    assert room.limits.max_output_bytes == cap


def test_with_disk_backed_outputs_off_a_large_output_keeps_the_tmpfs_cap() -> None:
    rooms = OutputRooms(OutputLimits(), tmpfs_bytes=3 * GiB, disk_max_bytes=0)
    room = rooms.for_job(Target.SAFETENSORS, 10 * GiB)
    assert (room.disk_bytes, room.limits.max_output_bytes) == (0, 3 * GiB)
    assert BrokerConfig(state_root=Path("/nonexistent"), unix_socket=None,
                        sandbox=SandboxPolicy(disk_output_bytes=0)).output_rooms == rooms


@pytest.fixture
def small_tmpfs_broker(tmp_path: Path, disk: Disk) -> Iterator[tuple[str, FakeSandbox]]:
    """A broker whose sandboxes' tmpfs holds 1 MiB (and warm pools, which such jobs pass
    by): the 4 MiB input's output needs the disk."""
    yield from _broker(tmp_path, pools=PoolSettings(min_warm=1, profiles=("torch", "light")),
                       sandbox=SandboxPolicy(output_bytes=MiB))


def torch_zip(tmp_path: Path) -> Path:
    """A dense 4 MiB PyTorch zip checkpoint (the fake worker's output is 4 MiB too)."""
    import torch

    path = tmp_path / "shard.pt"
    torch.save({"w": torch.arange(MiB, dtype=torch.float32)}, path)
    return path


def test_both_sandboxes_of_a_job_too_large_for_ram_get_a_disk_backed_output(
        small_tmpfs_broker: tuple[str, FakeSandbox], disk: Disk, tmp_path: Path) -> None:
    address, backend = small_tmpfs_broker
    src = torch_zip(tmp_path)
    room = src.stat().st_size + src.stat().st_size // 4 + 64 * MiB
    with Client(address, retry_attempts=1) as client:
        prepared = len(backend.disk_outputs)
        result = client.convert(src, tmp_path / "out.safetensors", target="safetensors")
    assert result.assurance == "integrity_verified"
    # the conversion's sandbox and the integrity reading's, each prepared for this job (not
    # a warm one, whose output is a tmpfs), and each told the same cap
    assert backend.disk_outputs[prepared:].count(room) == 2
    assert [s.max_output_bytes for s in backend.specs] == [room, room]


def test_a_job_too_large_for_ram_claims_the_spool_room_of_its_disk_backed_outputs(
        small_tmpfs_broker: tuple[str, FakeSandbox], disk: Disk, tmp_path: Path) -> None:
    address, backend = small_tmpfs_broker
    src = torch_zip(tmp_path)
    disk.free = RESERVE + 10 * MiB  # the upload and its answer, not two outputs besides
    with Client(address, retry_attempts=1) as client, \
            pytest.raises(ConversionError) as refused:
        client.convert(src, tmp_path / "out.safetensors", target="safetensors")
    assert refused.value.reason == "SPOOL_FULL"
    assert "two sandboxes' disk-backed outputs" in str(refused.value)
    assert backend.specs == []


def _spool_accounts(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The ``SpoolSpace`` of each broker started from now on (on the fake disk if
    ``on_fake_disk`` came first), to see what it promises."""
    from airlock_broker.api import server

    spaces: list[Any] = []
    make = server.SpoolSpace

    def recorded(root: Path, limits: UploadLimits) -> Any:
        spaces.append(make(root, limits))
        return spaces[-1]

    monkeypatch.setattr(server, "SpoolSpace", recorded)
    return spaces


def test_one_callers_stalled_uploads_leave_room_for_anothers_job(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Found in review: a caller with the convert role declared large uploads and sent them
    at the minimum rate (zeros: holes, the disk stayed empty), and every other caller's
    upload was refused SPOOL_FULL for as long. Its uploads now hold at most half the room
    (``[upload] spool_share_per_caller``): its second is refused, another caller converts."""
    import contextlib
    import threading

    import grpc

    from airlock.v1 import airlock_pb2 as pb
    from airlock.v1 import airlock_pb2_grpc as pb_grpc
    from airlock_broker.security.auth_config import (
        AuthConfig,
        Role,
        TokenEntry,
        mint_token,
        token_digest,
    )
    from tests.unit.test_broker_limits import wait_for

    disk = on_fake_disk(monkeypatch, tmp_path / "spool")
    spaces = _spool_accounts(monkeypatch)
    disk.free = RESERVE + 40 * MiB  # 20 MiB a caller
    alice, bob = mint_token(), mint_token()
    auth = AuthConfig(tokens=(
        TokenEntry("alice", frozenset({Role.CONVERT}), token_digest(alice)),
        TokenEntry("bob", frozenset({Role.CONVERT}), token_digest(bob))))
    # Stalled uploads are not cut off while the test runs (the pace is not the subject).
    upload = UploadLimits(spool_min_free_bytes=RESERVE, grace_seconds=600,
                          min_bytes_per_second=0)
    broker = contextlib.contextmanager(_broker)
    with broker(tmp_path, verify_integrity=False, auth=auth, upload=upload) as (address, _):
        hold = threading.Event()

        def stalled(declared: int) -> Iterator[pb.ConvertRequest]:
            yield pb.ConvertRequest(metadata=pb.ConvertMetadata(size_bytes=declared))
            hold.wait(120)

        channel = grpc.insecure_channel(address)
        stub = pb_grpc.ConversionServiceStub(channel)
        metadata = (("authorization", f"Bearer {alice}"),)
        results: list[Any] = []

        def upload_as_alice() -> None:
            try:
                results.append(list(stub.Convert(stalled(20 * MiB), metadata=metadata,
                                                 timeout=120)))
            except grpc.RpcError as exc:
                results.append(exc)

        calls = [threading.Thread(target=upload_as_alice) for _ in range(2)]
        try:
            calls[0].start()
            wait_for(lambda: len(spaces[0]._claims) == 1, 60)  # alice's first is promised
            calls[1].start()  # refused at once, or (the code before) promised as well
            wait_for(lambda: bool(results) or len(spaces[0]._claims) == 2, 60)
            src = tmp_path / "bob.pkl"
            src.write_bytes(INPUT[:MiB])
            with Client(address, token=bob, retry_attempts=1) as client:
                client.convert(src, tmp_path / "bob.safetensors", target="safetensors")
            assert results and isinstance(results[0], grpc.RpcError)
            assert "your uploads in progress" in results[0].details()
        finally:
            hold.set()
            for call in calls:
                call.join(60)
            channel.close()


# -- an ONNX output's canonical copy, claimed with its answer ---------------------------------


def _onnx_model(weights: int) -> bytes:
    """``y = x + W``, W ``weights`` bytes of float32 (a canonical copy about that large)."""
    from onnx import TensorProto, helper, numpy_helper

    count = weights // 4
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [count])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [count])
    graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "w", [x], [y],
                              initializer=[numpy_helper.from_array(
                                  np.arange(count, dtype=np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


#: The fake worker's ONNX output: as large as the input's data (4 MiB), as the estimate says.
ONNX_OUTPUT = _onnx_model(4 * MiB)


def _writes_onnx(spec: JobSpec, data: bytes, out: Path) -> int:
    (out / OUTPUT_NAMES[OutputFormat.ONNX]).write_bytes(ONNX_OUTPUT)
    return 0


def _writes_bad_onnx(spec: JobSpec, data: bytes, out: Path) -> int:
    (out / OUTPUT_NAMES[OutputFormat.ONNX]).write_bytes(b"\x08\x07 not a model")
    return 0


@pytest.fixture
def onnx_broker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                disk: Disk) -> Iterator[tuple[str, FakeSandbox, list[Any]]]:
    """A broker on the fake disk whose fake worker writes ``ONNX_OUTPUT``, and its spool's
    account (``SpoolSpace``), to see what it still promises."""
    spaces = _spool_accounts(monkeypatch)
    for address, backend in _broker(tmp_path, verify_integrity=False):
        backend.behaviour = _writes_onnx
        yield address, backend, spaces


def _promises_nothing(spaces: list[Any]) -> None:
    """Every claim the jobs made is given back (the answer's after it is written)."""
    from tests.unit.test_broker_limits import wait_for

    wait_for(lambda: not spaces[0]._claims, 60)


@pytest.mark.parametrize("target", ["onnx", "auto"])
def test_an_onnx_job_without_room_for_its_canonical_copy_is_refused_before_it_starts(
        onnx_broker: tuple[str, FakeSandbox, list[Any]], disk: Disk, tmp_path: Path,
        target: Literal["onnx", "auto"]) -> None:
    """The eleventh review's first gap: the canonical copy of an ONNX output (written on the
    spool as its validator sends it, until the job is answered) was claimed only when its
    bytes arrived, so a spool with room for the upload and the answer but not that copy
    ran the conversion and then refused it (SPOOL_FULL after the sandbox)."""
    address, backend, spaces = onnx_broker
    src = tmp_path / "model.pkl"
    src.write_bytes(INPUT)
    # Room for the upload (4 MiB) and its answer (4 MiB), not for the canonical copy too.
    disk.free = RESERVE + 10 * MiB
    with Client(address, retry_attempts=1, local_transfer=False) as client, \
            pytest.raises(ConversionError) as refused:
        client.convert(src, tmp_path / "out.onnx", target=target)
    assert refused.value.reason == "SPOOL_FULL" and refused.value.code == "RESOURCE_EXHAUSTED"
    assert len(backend.specs) == 0, "a sandbox ran before the refusal"
    message = str(refused.value)
    assert "this job's ONNX output's canonical copy (about its input's 4.0 MiB of data, at " \
           "most [output] max_onnx_bytes) needs 4.0 MiB more" in message, message
    assert "106.0 MiB free, 4.0 MiB of it promised" in message, message
    assert "keeps 100.0 MiB free" in message
    _promises_nothing(spaces)  # the answer's room, claimed first, is given back too


def test_an_onnx_job_with_room_for_its_canonical_copy_runs_and_gives_every_claim_back(
        onnx_broker: tuple[str, FakeSandbox, list[Any]], disk: Disk, tmp_path: Path) -> None:
    address, backend, spaces = onnx_broker
    src = tmp_path / "model.pkl"
    src.write_bytes(INPUT)
    disk.free = RESERVE + 14 * MiB  # the upload, its answer and the canonical copy
    with Client(address, retry_attempts=1, local_transfer=False) as client:
        result = client.convert(src, tmp_path / "out.onnx", target="onnx")
    assert len(backend.specs) == 1 and result.size > 4 * MiB
    _promises_nothing(spaces)


@pytest.mark.parametrize("behaviour", [_writes_bad_onnx, lambda *_: 1],
                         ids=["invalid_output", "worker_failed"])
def test_a_failed_onnx_job_gives_its_canonical_claim_back(
        onnx_broker: tuple[str, FakeSandbox, list[Any]], disk: Disk, tmp_path: Path,
        behaviour: Any) -> None:
    address, backend, spaces = onnx_broker
    backend.behaviour = behaviour
    src = tmp_path / "model.pkl"
    src.write_bytes(INPUT)
    disk.free = RESERVE + 14 * MiB
    with Client(address, retry_attempts=1, local_transfer=False) as client, \
            pytest.raises(ConversionError):
        client.convert(src, tmp_path / "out.onnx", target="onnx")
    assert len(backend.specs) == 1
    _promises_nothing(spaces)


def test_a_cancelled_onnx_job_gives_its_canonical_claim_back(
        onnx_broker: tuple[str, FakeSandbox, list[Any]], disk: Disk) -> None:
    """The caller goes away while its sandbox runs (the fake one hangs until cancelled)."""
    import zlib

    import grpc

    from airlock.v1 import airlock_pb2 as pb
    from airlock.v1 import airlock_pb2_grpc as pb_grpc
    from tests.unit.test_broker_limits import wait_for

    address, backend, spaces = onnx_broker
    backend.behaviour = lambda *_: None  # runs until its deadline
    disk.free = RESERVE + 14 * MiB
    requests = [pb.ConvertRequest(metadata=pb.ConvertMetadata(
                    size_bytes=len(INPUT), target=pb.TARGET_FORMAT_ONNX)),
                *(pb.ConvertRequest(chunk=pb.Chunk(data=INPUT[at:at + MiB],
                                                   crc32=zlib.crc32(INPUT[at:at + MiB])))
                  for at in range(0, len(INPUT), MiB))]
    with grpc.insecure_channel(address) as channel:
        call: Any = pb_grpc.ConversionServiceStub(channel).Convert(iter(requests), timeout=120)
        wait_for(lambda: len(backend.specs) == 1 or call.done(), 60)
        assert not call.done(), call
        assert len(spaces[0]._claims) == 2  # the answer's room and the canonical copy's
        call.cancel()
    _promises_nothing(spaces)


def test_a_replay_from_the_store_needs_no_room_for_a_canonical_copy(
        onnx_broker: tuple[str, FakeSandbox, list[Any]], disk: Disk, tmp_path: Path) -> None:
    """Found in the twelfth review's review: the canonical copy's room was claimed before the
    idempotency store was asked, so a retry answered from the store (no sandbox, no
    validator, no copy) was refused SPOOL_FULL where the spool had room for everything it
    does write. It is claimed once the job is known to convert."""
    address, backend, spaces = onnx_broker
    src = tmp_path / "model.pkl"
    src.write_bytes(INPUT)
    disk.free = RESERVE + 20 * MiB
    with Client(address, retry_attempts=1, local_transfer=False) as client:
        first = client.convert(src, tmp_path / "first.onnx", target="onnx",
                               idempotency_key="k-1")
        _promises_nothing(spaces)
        # The store's copy of the answer occupies the spool now: what is left is room for
        # the upload and an answer, not for a canonical copy too (as in the refusal above).
        disk.free = RESERVE + 10 * MiB + first.size
        again = client.convert(src, tmp_path / "again.onnx", target="onnx",
                               idempotency_key="k-1")
    assert again.replayed and again.sha256 == first.sha256
    assert len(backend.specs) == 1  # the retry ran nothing
    _promises_nothing(spaces)


def test_a_job_refused_for_its_canonical_copy_is_not_what_its_key_replays(
        onnx_broker: tuple[str, FakeSandbox, list[Any]], disk: Disk, tmp_path: Path) -> None:
    """The canonical copy is claimed inside the idempotency key's claim: its refusal
    (``SPOOL_FULL``, the moment's disk) is forgotten, and a retry with room converts."""
    address, backend, spaces = onnx_broker
    src = tmp_path / "model.pkl"
    src.write_bytes(INPUT)
    disk.free = RESERVE + 10 * MiB
    with Client(address, retry_attempts=1, local_transfer=False) as client:
        with pytest.raises(ConversionError) as refused:
            client.convert(src, tmp_path / "out.onnx", target="onnx", idempotency_key="k-2")
        assert refused.value.reason == "SPOOL_FULL" and backend.specs == []
        disk.free = RESERVE + 14 * MiB
        result = client.convert(src, tmp_path / "out.onnx", target="onnx",
                                idempotency_key="k-2")
    assert not result.replayed and len(backend.specs) == 1
    _promises_nothing(spaces)

"""The same-host fast path, end to end: the real broker, engine and image, and hostile peers
on its Unix socket.

Each hostile peer is refused with its reason, and the broker holds none of the peer's
descriptors afterwards (counted in /proc/<broker>/fd, and no broker descriptor names a file
of the test's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.security.auth_config import token_digest
from airlock_broker.validation.onnx_pool import ValidatorSettings
from airlock_client import Client, ConversionError
from airlock_client._regular_files import NOT_REGULAR
from tests.adversarial import payloads
from tests.conftest import IMAGE, BrokerProcess, start_broker
from tests.fixtures import models
from tests.integration.test_onnx_validator_processes import wait_for_validators
from tests.unit.hand_over import hand_over
from tests.unit.shared_tmp import returns_within

pytestmark = pytest.mark.integration

ALICE, BOB = secrets.token_urlsafe(24), secrets.token_urlsafe(24)


def _socket_path(broker: BrokerProcess) -> Path:
    return broker.transfer_socket


@contextlib.contextmanager
def _stub(address: str) -> Iterator[pb_grpc.ConversionServiceStub]:
    """A stub on a channel of its own, closed after use: a channel left to the garbage
    collector keeps its connection, which the broker counts as a descriptor of its own."""
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.ConversionServiceStub(channel)


def _ticket(broker: BrokerProcess, token: str | None = None) -> str:
    md = (("authorization", f"Bearer {token}"),) if token else ()
    with _stub(broker.address) as stub:
        reply = stub.OpenLocalTransfer(pb.OpenLocalTransferRequest(), timeout=10, metadata=md)
    assert reply.socket_path == str(_socket_path(broker))
    return str(reply.ticket)


def _send(path: Path, message: bytes, fds: list[int]) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        return hand_over(sock, message, fds)


def _hand_over(broker: BrokerProcess, artifact: Path, out: Path) -> str:
    """A ticket holding ``artifact`` and a new ``out`` (whose path the test keeps, so that it
    can look inside afterwards), as the client would hand them over."""
    ticket = _ticket(broker)
    in_fd = os.open(artifact, os.O_RDONLY)
    out_fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert _send(_socket_path(broker), ticket.encode(), [in_fd, out_fd]) == {"ok": True}
    finally:
        os.close(in_fd)
        os.close(out_fd)
    return ticket


def _convert_with(broker: BrokerProcess, ticket: str, token: str | None = None) -> None:
    md = (("authorization", f"Bearer {token}"),) if token else ()
    meta = pb.ConvertMetadata(target=pb.TARGET_FORMAT_AUTO, local_handle=ticket)
    with _stub(broker.address) as stub:
        for _ in stub.Convert(iter([pb.ConvertRequest(metadata=meta)]), timeout=120,
                              metadata=md):
            pass


def _reason(exc: grpc.RpcError) -> str:
    from airlock_client._wire import error_from_rpc

    return str(getattr(error_from_rpc(exc), "reason", ""))


def _broker_fds(pid: int) -> list[str]:
    links = []
    for entry in os.scandir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            links.append(os.readlink(entry.path))
    return links


def _settled_fds(pid: int, before: list[str], timeout: float = 60.0) -> list[str]:
    """[] once the broker holds no more descriptors than ``before``; at the deadline, those it
    opened since. Generous: a silent peer is dropped only after the socket's 5 s timeout, later
    on a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        now = _broker_fds(pid)
        if len(now) <= len(before):
            return []
        if time.monotonic() > deadline:
            return list((Counter(now) - Counter(before)).elements())
        time.sleep(0.2)


def test_fast_path_gives_the_same_bytes_as_streaming(broker: BrokerProcess,
                                                     tmp_path: Path) -> None:
    artifact, _check = models.make_state_dict(tmp_path)
    with Client(broker.address) as client:
        local = client.convert(artifact, tmp_path / "local.safetensors")
        assert client.last_transfer == "local"
    with Client(broker.address, local_transfer=False) as client:
        streamed = client.convert(artifact, tmp_path / "stream.safetensors")
        assert client.last_transfer == "stream"
    a = (tmp_path / "local.safetensors").read_bytes()
    b = (tmp_path / "stream.safetensors").read_bytes()
    assert a == b and hashlib.sha256(a).hexdigest() == local.sha256 == streamed.sha256
    assert local.input_sha256 == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert local.provenance_record is not None
    assert (local.transfer, streamed.transfer) == ("local", "stream")
    assert not list(tmp_path.glob(".*.part"))
    lines = [json.loads(x) for x in (broker.spool / "audit.jsonl").read_text().splitlines()]
    mine = {x["job_id"]: x for x in lines}
    assert mine[local.job_id]["transfer"] == "local" and "uid" in mine[local.job_id]["local_peer"]
    assert mine[streamed.job_id]["transfer"] == "stream"


def test_a_fifo_put_at_the_inputs_name_is_refused_not_waited_on(broker: BrokerProcess,
                                                                tmp_path: Path) -> None:
    """Another user who may write the model's directory swaps the model for a FIFO (after
    ``airlock convert`` looked at it). Swapped in after the client read the size, the fast
    path's open waited for a writer for ever (a command still there after 10 minutes, seen
    by hand); a FIFO from the start was streamed from until the broker gave up
    (UPLOAD_TOO_SLOW after 10 s: this test, on the code before). It is refused at once."""
    fifo = tmp_path / "model.pkl"
    os.mkfifo(fifo)

    def convert() -> object:
        with Client(broker.address) as client:
            return client.convert(fifo, tmp_path / "model.onnx")

    refused = returns_within(convert, fifo)
    assert isinstance(refused, OSError) and refused.strerror == NOT_REGULAR, refused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pkl"]


def test_a_refused_output_never_reaches_the_callers_file(broker: BrokerProcess,
                                                         tmp_path: Path) -> None:
    source = payloads.hostile_output_source([("symlink", payloads.SAFETENSORS_NAME,
                                              "/etc/passwd")])
    artifact = payloads.write_carrier(tmp_path / "artifact.npy", "npy", source)
    out = tmp_path / "out.bin"
    ticket = _hand_over(broker, artifact, out)
    with pytest.raises(grpc.RpcError) as caught:
        _convert_with(broker, ticket)
    assert _reason(caught.value) == "OUTPUT_INVALID"
    assert out.stat().st_size == 0
    # Through the client: the temp file is gone and nothing is at the destination.
    dest = tmp_path / "dest" / "model.safetensors"
    with Client(broker.address) as client, pytest.raises(ConversionError) as refused:
        client.convert(artifact, dest)
    assert refused.value.reason == "OUTPUT_INVALID" and client.last_transfer == "local"
    assert list(dest.parent.iterdir()) == []


def test_a_retry_on_the_fast_path_is_answered_from_the_copy_kept_after_the_answer(
        broker: BrokerProcess, tmp_path: Path) -> None:
    # The caller's file is written alone; the idempotency store's copy is made after the
    # answer, from the dead sandbox's output held open (its slot is destroyed meanwhile). A
    # retry with the same key gets that copy, byte for byte, without converting again.
    artifact, _ = models.make_state_dict(tmp_path)
    meta = pb.ConvertMetadata(target=pb.TARGET_FORMAT_SAFETENSORS, idempotency_key="kept-after",
                              size_bytes=artifact.stat().st_size)
    headers, outputs = [], []
    for attempt in ("first", "retry"):
        out = tmp_path / f"{attempt}.safetensors"
        ticket = _hand_over(broker, artifact, out)
        request = pb.ConvertRequest(metadata=meta)
        request.metadata.local_handle = ticket
        with _stub(broker.address) as stub:
            messages = list(stub.Convert(iter([request]), timeout=120))
        assert [m.WhichOneof("payload") for m in messages] == ["result"]
        headers.append(messages[0].result)
        outputs.append(out.read_bytes())
    first, retry = headers
    assert not first.replayed and retry.replayed and retry.job_id == first.job_id
    assert outputs[0] == outputs[1] and len(outputs[0]) == first.output_size
    assert hashlib.sha256(outputs[1]).hexdigest() == first.output_sha256


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[dict[str, int]]:
    """Descriptors of every kind a hostile peer might send; all closed afterwards."""
    good = tmp_path / "input.bin"
    good.write_bytes(b"\x80\x04N." * 16)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "nonempty").write_bytes(b"x")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = {
        "input": os.open(good, os.O_RDONLY),
        "input_wronly": os.open(good, os.O_WRONLY),
        "fifo": os.open(fifo, os.O_RDONLY | os.O_NONBLOCK),
        "directory": os.open(tmp_path, os.O_RDONLY),
        "socket": sock.fileno(),
        "nonempty": os.open(tmp_path / "nonempty", os.O_WRONLY),
        "append": os.open(tmp_path / "append", os.O_WRONLY | os.O_CREAT | os.O_APPEND),
        "out_rdonly": os.open(tmp_path / "out-ro", os.O_RDONLY | os.O_CREAT),
    }
    fds["output"] = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        yield fds
    finally:
        sock.close()
        for name, fd in fds.items():
            if name != "socket":
                os.close(fd)


#: case -> (descriptor names to send, message: "ticket" / bytes, expected reason)
CASES: dict[str, tuple[list[str], object, str]] = {
    "fifo_input": (["fifo", "output"], "ticket", "LOCAL_FD_REFUSED"),
    "directory_input": (["directory", "output"], "ticket", "LOCAL_FD_REFUSED"),
    "socket_input": (["socket", "output"], "ticket", "LOCAL_FD_REFUSED"),
    "write_only_input": (["input_wronly", "output"], "ticket", "LOCAL_FD_REFUSED"),
    "read_only_output": (["input", "out_rdonly"], "ticket", "LOCAL_FD_REFUSED"),
    "non_empty_output": (["input", "nonempty"], "ticket", "LOCAL_FD_REFUSED"),
    "append_output": (["input", "append"], "ticket", "LOCAL_FD_REFUSED"),
    "fifo_output": (["input", "fifo"], "ticket", "LOCAL_FD_REFUSED"),
    "three_fds": (["input", "output", "output"], "ticket", "LOCAL_FD_REFUSED"),
    "one_fd": (["input"], "ticket", "LOCAL_FD_REFUSED"),
    "many_fds": (["input", "output"] * 10, "ticket", "LOCAL_FD_REFUSED"),
    "no_fds": ([], "ticket", "LOCAL_FD_REFUSED"),
    "garbage_message": (["input", "output"], b"\x00\xffnot a ticket", "LOCAL_FD_REFUSED"),
    "long_message": (["input", "output"], b"A" * 4000, "LOCAL_FD_REFUSED"),
    "unknown_ticket": (["input", "output"], secrets.token_urlsafe(32).encode(),
                       "LOCAL_HANDLE_INVALID"),
}


@pytest.fixture(scope="module")
def poolless(docker_client, tmp_path_factory) -> Iterator[BrokerProcess]:  # type: ignore[no-untyped-def]
    """A broker with no warm containers: its descriptors change only with what the test does
    (a pool's refill opens a pidfd and engine connections per container, which made the count
    below flaky on the session broker)."""
    tmp = tmp_path_factory.mktemp("poolless")
    config = tmp / "broker.toml"
    config.write_text(f'[sandbox]\nimage = {IMAGE!r}\n\n[pools]\nmin_warm = 0\n')
    proc = start_broker(tmp, "--config", str(config))
    yield proc
    assert proc.stop() == 0, proc.log.read_text()[-3000:]


def test_hostile_peers_are_refused_and_leak_no_descriptor(poolless: BrokerProcess,
                                                          hostile: dict[str, int],
                                                          tmp_path: Path) -> None:
    broker = poolless  # no job runs here: every descriptor is refused before one could
    pid = broker.process.pid
    # The broker serves before its ONNX validators are forked (about a second later); each
    # holds descriptors in the broker. Counted from when they are all there.
    wait_for_validators(pid, ValidatorSettings().processes, set())
    before = _broker_fds(pid)
    path = _socket_path(broker)
    for case, (names, message, reason) in CASES.items():
        msg = _ticket(broker).encode() if message == "ticket" else message
        assert isinstance(msg, bytes)
        reply = _send(path, msg, [hostile[n] for n in names])
        assert reply.get("ok") is False and reply.get("reason") == reason, (case, reply)
    # A ticket takes descriptors once: a second attach burns it, and its Convert is refused.
    ticket = _ticket(broker)
    first = _send(path, ticket.encode(), [hostile["input"], hostile["output"]])
    assert first["ok"] is True, first
    again = _send(path, ticket.encode(), [hostile["input"], hostile["output"]])
    assert again["reason"] == "LOCAL_HANDLE_INVALID"
    with pytest.raises(grpc.RpcError) as caught:
        _convert_with(broker, ticket)
    assert _reason(caught.value) == "LOCAL_HANDLE_INVALID"
    # A ticket without descriptors, and a ticket never issued, are refused at Convert.
    with pytest.raises(grpc.RpcError) as caught:
        _convert_with(broker, _ticket(broker))
    assert _reason(caught.value) == "LOCAL_HANDLE_INVALID"
    with pytest.raises(grpc.RpcError) as caught:
        _convert_with(broker, secrets.token_urlsafe(32))
    assert _reason(caught.value) == "LOCAL_HANDLE_INVALID"
    # A peer that connects and says nothing is dropped after the connection timeout.
    assert _settled_fds(pid, before) == []
    mine = [link for link in _broker_fds(pid) if str(tmp_path) in link]
    assert mine == []


def test_a_used_ticket_cannot_be_replayed(broker: BrokerProcess, tmp_path: Path) -> None:
    artifact, _check = models.make_state_dict(tmp_path)
    ticket = _ticket(broker)
    in_fd = os.open(artifact, os.O_RDONLY)
    out_fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert _send(_socket_path(broker), ticket.encode(), [in_fd, out_fd])["ok"] is True
        _convert_with(broker, ticket)
        assert (tmp_path / "out").stat().st_size > 0
        fresh = os.open(tmp_path / "out2", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            reply = _send(_socket_path(broker), ticket.encode(), [in_fd, fresh])
        finally:
            os.close(fresh)
        assert reply["reason"] == "LOCAL_HANDLE_INVALID"
        with pytest.raises(grpc.RpcError) as caught:
            _convert_with(broker, ticket)
        assert _reason(caught.value) == "LOCAL_HANDLE_INVALID"
    finally:
        os.close(in_fd)
        os.close(out_fd)


@pytest.fixture(scope="module")
def authed(docker_client, tmp_path_factory) -> Iterator[BrokerProcess]:  # type: ignore[no-untyped-def]
    """A broker with two principals and 8-second tickets (cold containers: its tests are
    about tickets, not pools). Long enough for a hand-over and a call on a busy machine."""
    tmp = tmp_path_factory.mktemp("authed")
    config = tmp / "broker.toml"
    config.write_text(
        f'[sandbox]\nimage = {IMAGE!r}\n\n[pools]\nmin_warm = 0\n\n'
        f'[local_transfer]\nticket_ttl_seconds = 8.0\n\n'
        + "".join(f'[[auth.tokens]]\nprincipal = "{name}"\nroles = ["convert"]\n'
                  f'sha256 = "{token_digest(token)}"\n\n'
                  for name, token in (("alice", ALICE), ("bob", BOB))))
    proc = start_broker(tmp, "--config", str(config))
    yield proc
    assert proc.stop() == 0, proc.log.read_text()[-3000:]


def test_a_ticket_is_bound_to_its_principal_and_expires(authed: BrokerProcess,
                                                        tmp_path: Path) -> None:
    artifact, _check = models.make_state_dict(tmp_path)
    path = _socket_path(authed)
    with pytest.raises(grpc.RpcError) as caught:  # no credentials: no ticket
        _ticket(authed)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    in_fd = os.open(artifact, os.O_RDONLY)
    try:
        fresh = []
        for _ in range(2):
            out_fd = os.open(tmp_path / secrets.token_hex(4), os.O_WRONLY | os.O_CREAT, 0o600)
            fresh.append(out_fd)
        ticket = _ticket(authed, ALICE)
        assert _send(path, ticket.encode(), [in_fd, fresh[0]])["ok"] is True
        with pytest.raises(grpc.RpcError) as caught:  # bob presents alice's ticket
            _convert_with(authed, ticket, BOB)
        assert _reason(caught.value) == "LOCAL_HANDLE_FOREIGN"
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        old = _ticket(authed, ALICE)
        time.sleep(8.5)
        assert _send(path, old.encode(), [in_fd, fresh[1]])["reason"] == "LOCAL_HANDLE_INVALID"
        with pytest.raises(grpc.RpcError) as caught:  # alice's first ticket expired meanwhile
            _convert_with(authed, ticket, ALICE)
        assert _reason(caught.value) == "LOCAL_HANDLE_INVALID"
    finally:
        os.close(in_fd)
        for fd in fresh:
            os.close(fd)


def test_the_client_streams_when_the_socket_is_absent(authed: BrokerProcess, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    artifact, _check = models.make_state_dict(tmp_path)
    _socket_path(authed).unlink()
    caplog.set_level(logging.INFO, logger="airlock_client")
    with Client(authed.address, token=ALICE) as client:
        result = client.convert(artifact, tmp_path / "model.safetensors")
        assert client.last_transfer == "stream"
    assert result.sha256 == hashlib.sha256((tmp_path / "model.safetensors")
                                           .read_bytes()).hexdigest()
    assert any("streaming instead" in r.getMessage() and "transfer.sock" in r.getMessage()
               for r in caplog.records)

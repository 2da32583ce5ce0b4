"""Threat class C against the broker itself: clients that exhaust the broker's threads,
admission places and spool disk, so that nobody else converts.

Each attack runs while a benign job from another principal converts; that job must finish
within a generous bound of its usual time, measured in the same test. The attacks touch no
sandbox, so one broker on runc serves them all. Its spool is a 256 MiB tmpfs of the test's
own (the spool's disk is what one attack fills: never the machine's), with a short upload
grace period so that the slow-client cases take seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.security.auth_config import token_digest
from airlock_client import Client, ConversionError
from tests.adversarial.stalling_fs import StallingFs, overlay_over
from tests.conftest import IMAGE, BrokerProcess, start_broker
from tests.fixtures import models
from tests.unit.hand_over import hand_over

pytestmark = pytest.mark.adversarial

MiB = 1024**2
ALICE, MALLORY = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
#: The broker's spool: a tmpfs this size, of which all but HEADROOM is kept free.
SPOOL_BYTES = 256 * MiB
HEADROOM = 64 * MiB
GRACE = 2.0
MIN_RATE = 64 * 1024
#: Every admission place (max_concurrent_jobs + max_queued_jobs, the defaults).
PLACES = 2 + 16
#: Copy threads of the fast path (the default).
IO_THREADS = 4
CONFIG = f"""
[sandbox]
image = {IMAGE!r}

[upload]
grace_seconds = {GRACE}
min_bytes_per_second = {MIN_RATE}
spool_min_free_bytes = {SPOOL_BYTES - HEADROOM}
spool_min_free_ratio = 0.0

# The benign job is a state dict (the torch sandbox, then the light checkpoint reader).
[pools]
profiles = ["torch", "light"]
stream_window_seconds = 0
""" + "".join(f'\n[[auth.tokens]]\nprincipal = "{name}"\nroles = ["convert"]\n'
              f'sha256 = "{token_digest(token)}"\n'
              for name, token in (("alice", ALICE), ("mallory", MALLORY)))

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@pytest.fixture(scope="module")
def broker(docker_client, tmp_path_factory) -> Iterator[BrokerProcess]:  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("exhaustion")
    spool = home / "state"  # start_broker's state root: the spool lives in it
    spool.mkdir(mode=0o700)
    opts = f"size={SPOOL_BYTES},mode=0700".encode()
    if _libc.mount(b"tmpfs", os.fsencode(spool), b"tmpfs", 0, opts) != 0:
        pytest.fail(f"cannot mount the spool's tmpfs: {os.strerror(ctypes.get_errno())}")
    try:
        (home / "airlock.toml").write_text(CONFIG)
        proc = start_broker(home, "--runtime", "runc", "--config", str(home / "airlock.toml"))
        yield proc
        code = proc.stop()
        assert code == 0, f"broker exited {code}:\n{proc.log.read_text()[-3000:]}"
    finally:
        _libc.umount2(os.fsencode(spool), 2)  # MNT_DETACH


# -- a benign job, and the fast path by hand ----------------------------------------------------

def _benign(broker: BrokerProcess, tmp_path: Path, *, local: bool = True,
            within: float = 180.0) -> float:
    """alice converts a small state dict; seconds it took. It must succeed within
    ``within`` seconds; BUSY is retried meanwhile, as a patient caller would."""
    artifact, _check = models.make_state_dict(tmp_path / secrets.token_hex(4))
    began = time.monotonic()
    while True:
        left = within - (time.monotonic() - began)
        assert left > 0, f"the benign job did not convert within {within:.0f} s"
        try:
            with Client(broker.address, token=ALICE, timeout=left,
                        local_transfer=local) as client:
                client.convert(artifact, artifact.with_suffix(".safetensors"))
            return time.monotonic() - began
        except ConversionError as exc:
            if exc.reason == "DEADLINE_EXCEEDED" and time.monotonic() - began >= within - 1:
                pytest.fail(f"the benign job did not convert within {within:.0f} s: {exc}")
            if exc.reason != "BUSY":
                raise
            time.sleep(0.5)


def _usual(broker: BrokerProcess, tmp_path: Path) -> float:
    """The benign job's time on this machine now (the second run: pools warm)."""
    _benign(broker, tmp_path)
    return _benign(broker, tmp_path)


def _bound(usual: float) -> float:
    """A generous bound on the benign job's time under attack: the machine is shared, and
    its load swings a single job between seconds and a minute."""
    return 3 * usual + 60


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _stub(broker: BrokerProcess) -> pb_grpc.ConversionServiceStub:
    return pb_grpc.ConversionServiceStub(grpc.insecure_channel(broker.address))


def _socket_path(broker: BrokerProcess) -> Path:
    return broker.transfer_socket


def _reason(exc: grpc.RpcError) -> str:
    from airlock_client._wire import error_from_rpc

    return str(getattr(error_from_rpc(exc), "reason", exc.code().name))


@dataclass
class Outcome:
    reason: str  # "ok", a reason code, or HANDOVER_TIMEOUT
    seconds: float
    message: str


def _fast_path_job(broker: BrokerProcess, in_fd: int, out_dir: Path) -> Outcome:
    """mallory hands the broker ``in_fd`` (the caller's to close) on the fast path and
    converts it."""
    began = time.monotonic()

    def done(reason: str, message: str) -> Outcome:
        return Outcome(reason, time.monotonic() - began, message)

    ticket = _stub(broker).OpenLocalTransfer(pb.OpenLocalTransferRequest(), timeout=30,
                                             metadata=_metadata(MALLORY)).ticket
    out_fd = os.open(out_dir / secrets.token_hex(6), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.settimeout(15)
                sock.connect(str(_socket_path(broker)))
                reply = hand_over(sock, ticket.encode(), [in_fd, out_fd])
        except OSError as exc:  # the socket stopped taking descriptors: the client streams
            return done("HANDOVER_TIMEOUT", str(exc))
        if not reply.get("ok"):
            return done(str(reply.get("reason")), str(reply.get("message")))
        meta = pb.ConvertMetadata(target=pb.TARGET_FORMAT_AUTO, local_handle=ticket)
        try:
            for _ in _stub(broker).Convert(iter([pb.ConvertRequest(metadata=meta)]),
                                           timeout=150, metadata=_metadata(MALLORY)):
                pass
        except grpc.RpcError as exc:
            return done(_reason(exc), str(exc.details()))
        return done("ok", "")
    finally:
        os.close(out_fd)


def _in_threads(count: int, job: Callable[[int], Outcome]) -> tuple[list[Outcome],
                                                                    list[threading.Thread]]:
    outcomes: list[Outcome] = []
    threads = [threading.Thread(target=lambda i=i: outcomes.append(job(i)), daemon=True)
               for i in range(count)]
    for thread in threads:
        thread.start()
    return outcomes, threads


def _broker_fds_under(broker: BrokerProcess, root: Path) -> list[str]:
    found = []
    for entry in os.scandir(f"/proc/{broker.process.pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(entry.path).startswith(str(root)):
                found.append(entry.path)
    return found


# -- the attacks --------------------------------------------------------------------------------

def test_descriptors_on_a_filesystem_that_never_answers_cannot_wedge_the_broker(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """A FUSE file whose daemon never answers a read (nor a close's FLUSH): refused at the
    hand-over, naming its filesystem. The same file behind an overlay (an allowed type):
    more of them than the default executor has threads, and than the fast path has; each
    job ends at its pace with a reason, or is refused, and a benign job converts meanwhile.
    Before: the default executor's threads blocked in the reads for ever (every ``to_thread``
    of the broker with them), and the job's ``close`` froze the event loop."""
    usual = _usual(broker, tmp_path)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    count = max(IO_THREADS, min(32, (os.cpu_count() or 1) + 4)) + 2
    held: list[int] = []  # the files on the stalled filesystem: closed once it is gone
    try:
        with StallingFs(tmp_path / "fuse") as fuse, \
                overlay_over(fuse.mountpoint, tmp_path / "overlay") as merged:
            held.append(os.open(fuse.path, os.O_RDONLY))
            plain = _fast_path_job(broker, held[0], outputs)
            assert plain.reason == "LOCAL_FD_REFUSED", plain
            assert "'fuse.airlockstall' filesystem" in plain.message, plain
            # Opened before any read stalls (an open would wait for the pages it holds).
            held += [os.open(merged / fuse.path.name, os.O_RDONLY) for _ in range(count)]
            stalled, threads = _in_threads(
                count, lambda i: _fast_path_job(broker, held[1 + i], outputs))
            deadline = time.monotonic() + 60  # the benign job must meet stalled reads
            while fuse.stalled < IO_THREADS and time.monotonic() < deadline:
                time.sleep(0.05)
            took = _benign(broker, tmp_path, within=_bound(usual))
            deadline = time.monotonic() + 180
            for thread in threads:
                thread.join(max(deadline - time.monotonic(), 0))
            assert len(stalled) == count, "a stalled job never ended"
    finally:
        for fd in held:
            with contextlib.suppress(OSError):  # ENOTCONN: the connection was aborted
                os.close(fd)
    assert took < _bound(usual)
    reasons = [o.reason for o in stalled]
    # Cut off at the pace (the read never returns), or turned away (BUSY) while the copy or
    # close threads are held (a hand-over that timed out would also make a client stream).
    assert set(reasons) <= {"UPLOAD_TOO_SLOW", "BUSY", "HANDOVER_TIMEOUT"}, stalled
    assert reasons.count("UPLOAD_TOO_SLOW") >= 1, stalled
    cut = [o for o in stalled if o.reason == "UPLOAD_TOO_SLOW"]
    assert all("0 bytes in" in o.message and o.seconds < GRACE + 60 for o in cut), cut
    # The filesystem is gone (its connection aborted): the blocked threads come back, drop
    # their descriptors, and the fast path serves again.
    deadline = time.monotonic() + 60
    while _broker_fds_under(broker, tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _broker_fds_under(broker, tmp_path) == []
    artifact, _check = models.make_state_dict(tmp_path / "after")
    with Client(broker.address, token=ALICE, timeout=180) as client:
        client.convert(artifact, tmp_path / "after.safetensors")
        assert client.last_transfer == "local"


def test_dribbling_uploads_cannot_hold_every_admission_place(broker: BrokerProcess,
                                                             tmp_path: Path) -> None:
    """One stream per admission place, each sending a byte a second (never idle long enough
    for the idle timeout): each is cut off once it falls behind the minimum rate, with the
    rate it reached; a benign job converts meanwhile. Before: they held every place for as
    long as they kept dribbling (here: until the test stops them), and the benign job got
    BUSY until its bound ran out."""
    usual = _usual(broker, tmp_path)
    stop = threading.Event()
    sent = [0] * PLACES

    def requests(i: int) -> Iterator[pb.ConvertRequest]:
        meta = pb.ConvertMetadata(target=pb.TARGET_FORMAT_AUTO, size_bytes=MiB)
        yield pb.ConvertRequest(metadata=meta)
        sent[i] += 1
        began = time.monotonic()
        while not stop.is_set() and time.monotonic() - began < 600:  # until the test ends
            yield pb.ConvertRequest(chunk=pb.Chunk(data=b"\x80", crc32=zlib.crc32(b"\x80")))
            sent[i] += 1
            stop.wait(1.0)

    def dribble(i: int) -> Outcome:
        began = time.monotonic()
        try:
            for _ in _stub(broker).Convert(requests(i), timeout=660,
                                           metadata=_metadata(MALLORY)):
                pass
        except grpc.RpcError as exc:
            return Outcome(_reason(exc), time.monotonic() - began, str(exc.details()))
        return Outcome("ok", time.monotonic() - began, "")

    try:
        outcomes, threads = _in_threads(PLACES, dribble)
        deadline = time.monotonic() + 30
        while min(sent) < 2 and time.monotonic() < deadline:  # every one is in, dribbling
            time.sleep(0.05)
        took = _benign(broker, tmp_path, local=False, within=_bound(usual))
        # Each dribbler must end on its own, cut off by the broker; the test stops sending
        # only if one never does (ending a stream early would be a different refusal).
        deadline = time.monotonic() + GRACE + 60
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
    finally:
        stop.set()
    assert took < _bound(usual)
    assert len(outcomes) == PLACES, "a dribbler was not cut off within the grace + 60 s"
    reasons = [o.reason for o in outcomes]
    assert set(reasons) <= {"UPLOAD_TOO_SLOW", "BUSY"}, outcomes  # BUSY: a per-caller cap
    slow = [o for o in outcomes if o.reason == "UPLOAD_TOO_SLOW"]
    assert slow, outcomes
    for o in slow:
        assert "too slow" in o.message and "B/s" in o.message, o
        assert f"{MIN_RATE} bytes/s" in o.message, o
        assert o.seconds < GRACE + 30, o  # cut off when it fell behind, not when we stopped


def _spool_used(broker: BrokerProcess) -> int:
    st = os.statvfs(broker.spool)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@contextlib.contextmanager
def _peak_spool_use(broker: BrokerProcess) -> Iterator[list[int]]:
    """Samples the spool's used bytes every 10 ms; yields [peak] (updated live)."""
    peak = [_spool_used(broker)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _spool_used(broker))
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join(5)


def test_a_sparse_multi_gib_input_costs_the_spool_what_it_really_occupies(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """A 2 GiB sparse file (nothing allocated) on the fast path: spooled as sparse, the
    spool's disk use stays flat, and the job ends with the artifact's own verdict; a dense
    input bigger than what the reserve leaves is refused before a byte is spooled, by
    either path, saying why with the numbers. A benign job converts meanwhile.
    Before: the broker wrote 2 GiB of zeros densely (here: until its 256 MiB disk was
    full), and took the dense one too."""
    usual = _usual(broker, tmp_path)
    sparse = tmp_path / "sparse.bin"
    with sparse.open("wb") as fh:
        fh.truncate(2 * 1024 * MiB)
    assert sparse.stat().st_blocks == 0
    dense = tmp_path / "dense.bin"
    dense.write_bytes(b"\x80\x04" * (HEADROOM // 2 + 8 * MiB))
    baseline = _spool_used(broker)
    with _peak_spool_use(broker) as peak:
        outcome: list[BaseException | None] = []
        transfer: list[str] = []

        def convert_sparse() -> None:
            with Client(broker.address, token=ALICE, timeout=300) as client:
                try:
                    client.convert(sparse, tmp_path / "sparse.out")
                    outcome.append(None)
                except BaseException as exc:  # judged below
                    outcome.append(exc)
                transfer.append(client.last_transfer)

        worker = threading.Thread(target=convert_sparse, daemon=True)
        worker.start()
        took = _benign(broker, tmp_path, within=_bound(usual))
        worker.join(300)
        refused = {}
        for local in (True, False):
            with Client(broker.address, token=ALICE, timeout=120,
                        local_transfer=local) as client, \
                    pytest.raises(ConversionError) as full:
                client.convert(dense, tmp_path / "dense.out")
            refused[client.last_transfer] = full.value
    assert outcome and isinstance(outcome[0], ConversionError), outcome
    assert outcome[0].reason == "UNSUPPORTED_FORMAT", outcome[0]  # zeros: spooled, then judged
    assert transfer == ["local"]
    grew = peak[0] - baseline
    assert grew < 16 * MiB, f"the spool grew by {grew / MiB:.0f} MiB"
    assert set(refused) == {"local", "stream"}
    for way, exc in refused.items():
        assert exc.reason == "SPOOL_FULL", (way, exc)
        assert exc.code == "RESOURCE_EXHAUSTED" and "MiB free" in exc.message, exc
        assert f"keeps {(SPOOL_BYTES - HEADROOM) / MiB:.1f} MiB free" in exc.message, exc
    assert took < _bound(usual)


def _sparse_copy(source: Path, target: Path) -> Path:
    """``source``'s bytes in ``target``, its all-zero 4 KiB blocks left as holes."""
    data = source.read_bytes()
    with target.open("wb") as fh:
        for at in range(0, len(data), 4096):
            block = data[at:at + 4096]
            if block.count(0) != len(block):
                fh.seek(at)
                fh.write(block)
        fh.truncate(len(data))
    return target


def test_zero_weights_held_as_holes_do_not_let_their_answer_cross_the_reserve(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """A checkpoint of 96 MiB of zero weights, sparse on the fast path: the job's room was
    estimated from its data (a few KiB), but its answer is 96 MiB of written zeros, more
    than the 64 MiB above the reserve. The answer reaches the caller's file; the copy the
    idempotency store would keep is not made. Before: that copy was written anyway, and the
    spool grew by 96 MiB, into the space it keeps free."""
    import torch

    dense = tmp_path / "zeros.pt"
    torch.save({"w": torch.zeros(24 * MiB)}, dense)  # 96 MiB of float32 zeros
    artifact = _sparse_copy(dense, tmp_path / "sparse-zeros.pt")
    assert artifact.stat().st_blocks * 512 < 4 * MiB
    out = tmp_path / "zeros.safetensors"
    baseline = _spool_used(broker)
    with _peak_spool_use(broker) as peak:
        with Client(broker.address, token=ALICE, timeout=300) as client:
            result = client.convert(artifact, out)
            assert client.last_transfer == "local"
        # The store's copy would be written after the answer: sampled until the broker says
        # it will not keep it.
        deadline = time.monotonic() + 60
        while "is not kept for retries" not in broker.log.read_text():
            assert time.monotonic() < deadline, "the broker never said the copy is not kept"
            assert peak[0] - baseline < HEADROOM, "the store's copy crossed the reserve"
            time.sleep(0.1)
    assert result.size == out.stat().st_size >= 96 * MiB
    grew = peak[0] - baseline
    assert grew < HEADROOM, f"the spool grew by {grew / MiB:.0f} MiB"

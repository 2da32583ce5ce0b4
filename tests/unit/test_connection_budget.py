"""Floods of connections that make no call, against a real broker (fake sandbox): what one
listener's flood leaves to the others, local callers on the Unix socket above all.

Calls are authenticated, connections are not. gRPC keeps ``[rpc] max_connections`` per
listener (each loopback family of the TCP port, the Unix socket) and closes one beyond it at
once; the broker holds that count to what its open-files limit can hold on every listener
(ops/process_limits.connections_per_listener).
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airlock_broker.api.local_listeners import listener_count
from airlock_broker.ops.process_limits import RESERVED_FILES, connections_per_listener
from airlock_broker.security.exposure import RpcLimits
from tests.unit.test_broker_limits import (  # noqa: F401  (the in-process broker fixture)
    _PREFACE,
    _closed_within,
    start,
)

#: Opens ``count`` connections to 127.0.0.1:``port``, each sending the HTTP/2 preface and
#: settings and then nothing, and says so; then reports how many the broker answered (its
#: settings), closed, or left unaccepted by the deadline; holds them until its stdin closes.
_FLOOD = """
import resource, selectors, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
port, count, preface = int(sys.argv[1]), int(sys.argv[2]), bytes.fromhex(sys.argv[3])
held, waiting = [], selectors.DefaultSelector()
for _ in range(count):
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(preface)
    except OSError:
        pass  # closed at once by the broker: counted as closed below
    held.append(sock)
    waiting.register(sock, selectors.EVENT_READ)
print("opened", flush=True)
answered = closed = 0
deadline = time.monotonic() + 60
while waiting.get_map() and time.monotonic() < deadline:
    for key, _ in waiting.select(timeout=1):
        waiting.unregister(key.fileobj)
        try:
            data = key.fileobj.recv(4096)
        except OSError:
            data = b""
        answered, closed = (answered + 1, closed) if data else (answered, closed + 1)
print(answered, closed, len(waiting.get_map()), flush=True)
sys.stdin.read()
"""

#: Waits for a line on stdin, then asks the broker on the Unix socket ``argv[1]`` for its
#: health: prints the status, or the error. A process of its own, as a local user's is.
_LOCAL_CALLER = """
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
sys.stdin.readline()
try:
    with grpc.insecure_channel("unix:" + sys.argv[1]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=30)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), flush=True)
except grpc.RpcError as exc:
    print(exc.code().name, exc.details(), flush=True)
"""


def _health(address: str) -> str:
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) \
            as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=30)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_a_flood_of_one_listeners_connections_leaves_the_others_their_own(
        start: Any, tmp_path: Path) -> None:  # noqa: F811
    """A client fills ``max_connections`` of the TCP port with connections that finished
    their handshake and make no call: every new connection there is closed at once, for
    ``max_connection_idle_seconds`` (a network's to stop: docs/security.md, known gaps). The
    Unix socket and the other loopback family keep counts of their own, so local callers are
    served meanwhile. gRPC 1.85 counts per listener (``Server::ListenerState``); this pins
    it, since a count for the whole server would let any TCP client starve the socket."""
    path = tmp_path / "run" / "broker.sock"
    run = start(rpc=RpcLimits(max_connections=8), unix_socket=path)
    held = [socket.create_connection(("127.0.0.1", run.broker.port)) for _ in range(8)]
    extra = None
    try:
        for sock in held:
            sock.sendall(_PREFACE)
            sock.settimeout(30)
            assert sock.recv(4096), "a connection within the cap is answered"
        extra = socket.create_connection(("127.0.0.1", run.broker.port))
        extra.sendall(_PREFACE)
        assert _closed_within(extra, 30), "a connection beyond the cap stayed open"
        assert _health(f"unix:{path}") == "SERVING"
        assert _health(f"[::1]:{run.broker.port}") == "SERVING"
    finally:
        for sock in [*held, *([extra] if extra else [])]:
            sock.close()


def test_a_flood_of_tcp_connections_cannot_take_the_descriptors_local_callers_need(
        start: Any, tmp_path: Path) -> None:  # noqa: F811
    """Found after the eleventh review, of the network edge: gRPC counts ``max_connections``
    per listener, and the broker's three (two loopback families, the Unix socket) could hold
    12,288 connections under an open-files limit that holds fewer. A client that opened more
    TCP connections than the limit left the broker without descriptors: every ``accept``
    failed (gRPC: "File descriptor limit reached. Retrying."), so a local user's call on the
    Unix socket went unanswered (20 s, then UNAVAILABLE), and the ONNX validators could not
    start. Each listener now takes what the limit holds beside the broker's own files; beyond
    that a connection is closed at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = 2 * 600  # half of it kept for the broker's own files: 200 per listener
    flood = limit + 200
    if hard != resource.RLIM_INFINITY and hard < 2 * flood:
        pytest.skip(f"the hard open-files limit ({hard}) is too low for the flood")
    path = tmp_path / "run" / "broker.sock"
    # Both children start before the flood: the test process is the broker's, and spawns
    # nothing while its descriptors may run out.
    local = subprocess.Popen([sys.executable, "-c", _LOCAL_CALLER, str(path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    flooder = None
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        run = start(unix_socket=path)  # [rpc] max_connections: the default, 4096
        flooder = subprocess.Popen(
            [sys.executable, "-c", _FLOOD, str(run.broker.port), str(flood), _PREFACE.hex()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert flooder.stdout is not None and local.stdin is not None \
            and local.stdout is not None
        assert flooder.stdout.readline() == "opened\n"
        local.stdin.write("go\n")
        local.stdin.flush()
        began = time.monotonic()
        local_answer = local.stdout.readline().strip()
        waited = time.monotonic() - began
        answered, closed, unaccepted = map(int, flooder.stdout.readline().split())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for child in (flooder, local):
            if child is not None:
                child.kill()
                child.wait(30)
    assert local_answer == "SERVING", (
        f"the local caller on the Unix socket got {local_answer!r} after {waited:.1f} s while "
        f"{answered} TCP connections were held, {closed} closed, {unaccepted} unaccepted")
    cap = connections_per_listener(RpcLimits().max_connections,
                                   listener_count("127.0.0.1:0", path), limit)
    assert cap == (limit - min(RESERVED_FILES, limit // 2)) // 3 == 200
    assert (answered, closed, unaccepted) == (cap, flood - cap, 0)


def test_each_listener_takes_what_the_descriptor_limit_holds_beside_the_brokers_files(
        caplog: pytest.LogCaptureFixture) -> None:
    assert connections_per_listener(4096, 3, 65536) == 4096
    assert connections_per_listener(4096, 3, 13312) == 4096  # 3 x 4096 + 1024: fits
    assert connections_per_listener(4096, 3, 4096) == 1024  # (4096 - 1024) / 3
    assert connections_per_listener(4096, 3, 1024) == 170  # half kept: (1024 - 512) / 3
    assert connections_per_listener(4096, 2, 2) == 1
    assert "raise the hard open-files limit (LimitNOFILE) to 13312" in caplog.text
    assert listener_count("127.0.0.1:50051", None) == 2  # both loopback families
    assert listener_count("localhost:0", Path("/run/airlock/broker.sock")) == 3
    assert listener_count("10.0.0.5:50051", None) == 1
    assert listener_count("[2001:db8::1]:50051", Path("/run/b.sock")) == 2


def test_the_advice_for_more_connections_than_the_broker_raises_its_limit_to_is_to_lower_them(
        caplog: pytest.LogCaptureFixture) -> None:
    """Found in the twelfth review's review: with ``max_connections`` beyond what 65,536
    descriptors hold on three listeners, the warning said to raise LimitNOFILE to 91,024,
    which changes nothing: the broker raises its soft limit to ``MAX_OPEN_FILES`` at most
    (ops/process_limits.raise_open_files_limit), so it warned at every start however high
    the limit was set."""
    from airlock_broker.ops.process_limits import MAX_OPEN_FILES

    assert MAX_OPEN_FILES == 65536
    assert connections_per_listener(30000, 3, 65536) == 21504  # (65536 - 1024) / 3
    assert "LimitNOFILE" not in caplog.text, caplog.text
    assert "lower [rpc] max_connections to 21504" in caplog.text, caplog.text
    caplog.clear()
    assert connections_per_listener(30000, 3, 4096) == 1024
    assert "lower [rpc] max_connections to 21504 and raise the hard open-files limit " \
           "(LimitNOFILE) to 65536" in caplog.text, caplog.text

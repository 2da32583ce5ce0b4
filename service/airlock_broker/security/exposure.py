"""What the broker exposes, and the bounds on it: where it may listen (the Unix socket, the
metrics port) and the gRPC server's own limits.

Settings and their checks only, read by config.py when a configuration is loaded; the
listeners and interceptors that apply them are the API's (api/local_listeners.py,
api/rpc_limits.py). Without ``[auth]`` the broker may listen only on loopback: that check is
auth_config.check_listen.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_UNIX_SOCKET = Path("/run/airlock/broker.sock")
#: The identity socket sits beside the gRPC socket, under this suffix (fastpath/peer_identity).
IDENTITY_SUFFIX = ".id"
#: sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
SUN_PATH_MAX = 107
_OFF = frozenset({"", "none"})


def identity_path(unix_socket: Path) -> Path:
    """Where the identity socket of the gRPC socket ``unix_socket`` is (clients derive it)."""
    return unix_socket.with_name(unix_socket.name + IDENTITY_SUFFIX)


def unix_socket_setting(value: str | os.PathLike[str] | None) -> Path | None:
    """A configured value: a path, or ``""`` / ``"none"`` for no Unix socket."""
    if value is None or os.fspath(value).strip().lower() in _OFF:
        return None
    return Path(value)


def default_unix_socket() -> Path | None:
    """``AIRLOCK_SOCKET`` if set, else ``/run/airlock/broker.sock`` when running as root."""
    env = os.environ.get("AIRLOCK_SOCKET")
    if env is not None:
        return unix_socket_setting(env)
    return DEFAULT_UNIX_SOCKET if os.geteuid() == 0 else None


def check_unix_socket(path: Path | None) -> None:
    """Refuse a socket path the kernel cannot bind (raises ``ValueError``)."""
    if path is None:
        return
    if not path.is_absolute():
        raise ValueError(f"unix_socket must be an absolute path, not {path}")
    if len(os.fsencode(identity_path(path))) > SUN_PATH_MAX:
        raise ValueError(f"unix_socket {path} is too long: with its {identity_path(path).name} "
                         f"sibling it must fit in {SUN_PATH_MAX} bytes")


def check_metrics_listen(listen: str | None, public: bool) -> None:
    """Refuse a metrics address beyond loopback without ``public`` (raises ``ValueError``)."""
    if listen is None:
        return
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536 or listen.startswith("unix"):
        raise ValueError(f"--metrics takes HOST:PORT (e.g. 127.0.0.1:9464), not {listen!r}")
    host = host.strip("[]")
    if public or not host or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a name may resolve to anything
    if not loopback:
        raise ValueError(
            f"refusing to serve metrics on {listen}: they have no authentication and show "
            "load and failures to anyone who can reach them; use 127.0.0.1:PORT (scrape "
            "through a proxy or an SSH tunnel), or pass --metrics-public "
            "([broker] metrics_public = true) to serve them there anyway")


@dataclass(frozen=True)
class RpcLimits:
    """The ``[rpc]`` section. Every limit is finite; each number says why it is what it is."""

    #: Calls in progress at once, every method together (RESOURCE_EXHAUSTED beyond it, with
    #: the numbers: api/rpc_limits.CallLimiter). The backstop against floods of calls (each
    #: costs a task and its HTTP/2 buffers): well above the 18 job places and
    #: ``max_open_streams``, because calls beyond the places are already refused by
    #: admission, with BUSY and a reason. A call counts while its task runs, not until its
    #: stream closes (which a caller that never reads its answer delays for the connection's
    #: age).
    max_concurrent_rpcs: int = 256
    #: HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: calls one connection may have open at once;
    #: beyond it a new stream is refused (REFUSED_STREAM, which clients see as UNAVAILABLE and
    #: retry). gRPC clients share one connection per address among a process's channels, so
    #: this is also what one client process may have in flight: as many as
    #: ``max_concurrent_rpcs`` (a 200-call burst from one process is a tested case). It bounds
    #: the stream state one connection can make the broker hold.
    max_streams_per_connection: int = 256
    #: Health.Watch and reflection streams open at once (``OPEN_STREAMS``); beyond it a new
    #: one is refused with RESOURCE_EXHAUSTED. Load balancers and probes use one or two each.
    max_open_streams: int = 16
    #: How long a call may take to send its request message, for every method that takes
    #: one (all but Convert and reflection, which stream theirs): gRPC counts a call against
    #: ``max_concurrent_rpcs`` from its first frame, and a caller that withholds its request
    #: would hold that place for ever (api/rpc_limits.RequestArrival). Ten seconds: a
    #: request is a few bytes sent with the call's headers. The same bound applies to the
    #: answer of such a method (a few bytes too): a call whose caller does not let it out
    #: (HTTP/2 windows of 0) is ended then.
    request_seconds: float = 10.0
    #: Calls of one principal waiting for their request message, or for their answer to
    #: leave, at once; beyond it a call gets ``PROMPT_SECONDS`` for either (its request is
    #: then refused with RESOURCE_EXHAUSTED, its answer's call ended). Every caller of an
    #: open method (a health check) and every caller with authentication off is
    #: ``anonymous``: together they never hold more than this many places of
    #: ``max_concurrent_rpcs`` with withheld requests or answers.
    max_waiting_calls: int = 16
    #: A connection is asked to close (GOAWAY) after this long; clients reconnect for new
    #: calls. With the grace below, this is what finally ends an HTTP/2 stream whose caller
    #: never reads and never leaves (its handler gave up at ``answer_drain_seconds``).
    max_connection_age_seconds: float = 3600.0
    #: Calls in progress on a connection asked to close get this long to finish; then the
    #: connection is closed. Half an hour: longer than a job (``max_job_seconds``) plus its
    #: answer (``answer_drain_seconds``), and a call cut short is retried by the client with
    #: its idempotency key.
    connection_age_grace_seconds: float = 1800.0
    #: A connection with no call in progress for this long is asked to close (GOAWAY); clients
    #: reconnect for their next call. Without it a connection that only sent the HTTP/2
    #: preface held a descriptor of the broker's for ``max_connection_age_seconds``, and a
    #: local user (or anyone, on a public port: calls are authenticated, connections are not)
    #: opening thousands ran the broker out of descriptors.
    max_connection_idle_seconds: float = 300.0
    #: How long a new connection has to finish its handshake (TLS, then the HTTP/2 preface and
    #: settings); gRPC's own default is 120 s.
    handshake_seconds: float = 20.0
    #: Connections open at once on each listener (gRPC keeps one count per listener: each
    #: loopback family of the TCP port, the Unix socket); one beyond is closed at once. A
    #: backstop: connections are not authenticated, so a flood of them (each idle one lives
    #: ``max_connection_idle_seconds``) would otherwise run the broker out of descriptors and
    #: fail the jobs in flight; at the cap only that listener's new connections are refused,
    #: and a TCP flood leaves the Unix socket its own. Lowered at start where the open-files
    #: limit cannot hold this many on every listener (ops/process_limits.py). Far above what a
    #: fleet of clients holds (gRPC shares one connection per address in a process).
    max_connections: int = 4096
    #: Answers of one peer (a TCP caller's IP address, an IPv6 caller's /64, a Unix-socket
    #: caller's principal) that did not leave within ``request_seconds``; while it has this
    #: many, its new calls are refused at once with RESOURCE_EXHAUSTED, with the numbers
    #: (api/rpc_limits.StuckAnswers). Each such answer stays in gRPC as a stuck HTTP/2 stream
    #: (about 15 KB) until its connection closes, which the broker cannot see: so it counts
    #: for ``max_connection_age_seconds`` plus the grace. Without it, one client with windows
    #: of 0 held a million (15 GiB, no token needed: Health.Check). 64 (1 MiB a peer) is far
    #: above what a client that reads its answers ever reaches: an answer of a few bytes is
    #: late only if the caller does not read. Clients behind one address (NAT, loopback TCP)
    #: share it; local ones on the Unix socket are counted per user.
    max_stuck_answers_per_peer: int = 64

    def __post_init__(self) -> None:
        for name in ("max_concurrent_rpcs", "max_streams_per_connection", "max_open_streams",
                     "max_waiting_calls", "max_connections", "max_stuck_answers_per_peer"):
            if getattr(self, name) < 1:
                raise ValueError(f"[rpc] {name} must be at least 1")
        if self.max_waiting_calls >= self.max_concurrent_rpcs:
            raise ValueError("[rpc] max_waiting_calls must stay below max_concurrent_rpcs, or "
                             "calls that withhold their request can refuse every other call")
        if not 0 < self.request_seconds <= 3600:
            raise ValueError("[rpc] request_seconds must be more than 0 and at most 3600")
        if self.max_open_streams >= self.max_concurrent_rpcs:
            raise ValueError("[rpc] max_open_streams must stay below max_concurrent_rpcs, or "
                             "idle watchers can refuse every other call")
        if self.max_connection_age_seconds <= 0 or self.connection_age_grace_seconds <= 0 \
                or self.max_connection_idle_seconds <= 0 or self.handshake_seconds <= 0:
            raise ValueError("[rpc] connection ages, idle time and handshake time must be "
                             "positive")

    def server_options(self, connections_per_listener: int | None = None
                       ) -> list[tuple[str, int]]:
        """Channel arguments for ``grpc.aio.server``; each listener takes
        ``connections_per_listener`` connections if given (never more than
        ``max_connections``)."""
        connections = self.max_connections if connections_per_listener is None \
            else min(connections_per_listener, self.max_connections)
        return [
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.max_connection_age_ms", int(self.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(self.connection_age_grace_seconds * 1000)),
            ("grpc.max_connection_idle_ms", int(self.max_connection_idle_seconds * 1000)),
            ("grpc.server_handshake_timeout_ms", int(self.handshake_seconds * 1000)),
            ("grpc.max_allowed_incoming_connections", connections),
        ]

    @property
    def stream_seconds(self) -> float:
        """The longest an HTTP/2 stream may stay open: its connection's age and grace."""
        return self.max_connection_age_seconds + self.connection_age_grace_seconds

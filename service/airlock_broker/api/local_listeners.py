"""Where the broker listens for clients on this machine: both loopback families, and a Unix socket.

**Both loopback families.** A broker on ``127.0.0.1:P`` alone leaves ``[::1]:P`` to anyone,
and a client that dials ``localhost:P`` may try ``::1`` first: a local user who binds it gets
that client's token and artifacts and can answer with any output. So a broker told to listen
on ``127.0.0.1``, ``[::1]`` or ``localhost`` holds the same port on both (gRPC, given
``localhost``, silently binds only the family that is free). If the other family's port is
already taken, someone may be squatting it: the broker refuses to start and says so. A host
without that loopback family has nothing to squat (skipped, logged). With port 0 (tests) a port
free on both is picked.

**The Unix socket** (``[broker] unix_socket``, ``--unix-socket``, ``AIRLOCK_SOCKET``; by default
``/run/airlock/broker.sock`` for a broker running as root, none otherwise; ``none`` turns it
off). The socket is where a local client can know whom it talks to, and the broker whom it
serves:

- its directory must be a real directory owned by the broker's user that no one else can
  write (created 0755 if missing; an existing one someone else made is refused, loudly), so
  nobody else can plant or replace the socket, and clients check exactly that before they
  connect (``airlock_client._channel``);
- the socket is 0666: connecting grants nothing but a name the kernel vouches for
  (``peer_identity``: each caller is ``uid:N``);
- a socket at that path on which someone is still listening (another broker) is not taken
  over: the broker refuses to start. A stale one (nobody listening) is replaced;
- gRPC removes the socket when the broker stops; its directory stays, and with it a client's
  choice of the socket over TCP, so a client never falls back to a port anyone may hold.

The directory is checked by state_dirs.py, as every state directory of the broker is
(DESIGN §1.8). It is the one that is not under the 0700 state root: other users must reach
the socket, so it may be 0755 (never writable by anyone else).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from airlock_broker.fastpath.peer_identity import IdentityServer, PeerTickets
from airlock_broker.security.exposure import identity_path
from airlock_broker.security.state_dirs import StateDirError, check_ancestors, ensure_dir

log = logging.getLogger(__name__)

#: The loopback hosts for which the broker holds both families, and the pair it binds.
_BOTH = {"127.0.0.1": ("127.0.0.1", "::1"), "localhost": ("127.0.0.1", "::1"),
         "::1": ("::1", "127.0.0.1")}


# -- TCP: both loopback families ----------------------------------------------------------------

def add_tcp_listeners(server: grpc.aio.Server, listen: str,
                      credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``listen`` (both families on one port for a loopback host); the port bound."""
    host, _, port_text = listen.rpartition(":")
    pair = _BOTH.get(host.strip("[]"))
    if pair is None or not port_text.isdigit():
        return _add(server, listen, credentials)
    first, other = pair
    if not _family_present(other):
        log.info("no %s loopback on this host: listening on %s only", other, first)
        return _add(server, _address(first, int(port_text)), credentials)
    wanted = int(port_text)
    port = _add(server, _address(first, wanted or _free_on_both(first, other)), credentials)
    try:
        _add(server, _address(other, port), credentials)
    except RuntimeError:
        if wanted:
            raise OSError(
                f"{_address(other, port)} is held by another process, so a client that dials "
                f"localhost:{port} could reach it instead of this broker: find it "
                f"(ss -ltnp 'sport = :{port}') and stop it, or listen on another port") from None
        log.warning("%s was taken meanwhile: listening on %s only", _address(other, port),
                    _address(first, port))
    return port


def listener_count(listen: str, unix_socket: Path | None) -> int:
    """How many gRPC listeners ``listen`` and ``unix_socket`` make at most: gRPC gives each
    its own ``[rpc] max_connections`` (ops/process_limits.connections_per_listener)."""
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if host in _BOTH:
        tcp = 2
    else:
        try:
            ipaddress.ip_address(host)
            tcp = 1
        except ValueError:  # a name (or none): gRPC listens on every address it resolves to
            try:
                tcp = len({info[4][0] for info in socket.getaddrinfo(
                    host or None, port_text or None, type=socket.SOCK_STREAM)}) or 1
            except (OSError, UnicodeError):
                tcp = 1  # gRPC will not bind it either, and says so
    return tcp + (unix_socket is not None)


def _add(server: grpc.aio.Server, address: str,
         credentials: grpc.ServerCredentials | None) -> int:
    return (server.add_secure_port(address, credentials) if credentials is not None
            else server.add_insecure_port(address))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _family_present(host: str) -> bool:
    try:
        with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return False
        raise
    return True


def _free_on_both(first: str, other: str) -> int:
    """A port free on both loopback families now (port 0: the kernel picks per family)."""
    for _ in range(32):
        with socket.socket(_family(first), socket.SOCK_STREAM) as a, \
                socket.socket(_family(other), socket.SOCK_STREAM) as b:
            a.bind((first, 0))
            port = int(a.getsockname()[1])
            try:
                b.bind((other, port))
            except OSError:
                continue
            return port
    return 0  # let gRPC pick for the first family; the second then warns


# -- the Unix socket ----------------------------------------------------------------------------

@dataclass
class UnixListener:
    """The broker's Unix socket and its identity socket. Owned by ``Broker``: ``close`` once."""

    path: Path | None = None
    identity: IdentityServer | None = field(default=None, repr=False)

    async def close(self) -> None:
        """After the gRPC server stopped (it removes its socket itself)."""
        if self.identity is not None:
            await self.identity.close()
            self.identity = None


async def add_unix_listener(server: grpc.aio.Server, path: Path | None,
                            tickets: PeerTickets) -> UnixListener:
    """Serve ``server`` on the Unix socket ``path`` too (``OSError`` with the reason if not)."""
    if path is None:
        log.info("no Unix socket (unix_socket = none): local clients use the TCP port")
        return UnixListener()
    prepare_socket_dir(path.parent)
    _refuse_live(path)
    identity = IdentityServer(identity_path(path), tickets)
    identity.start()
    try:
        # Local credentials: plaintext on the wire, but gRPC lets a client attach call
        # credentials (the peer ticket) only to a channel it considers secure.
        try:
            server.add_secure_port(f"unix:{path}", grpc.local_server_credentials(
                grpc.LocalConnectionType.UDS))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on the Unix socket {path}: {exc}") from None
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} is not the socket gRPC just made")
        os.chmod(path, 0o666, follow_symlinks=False)  # in our own directory, checked
    except BaseException:
        await identity.close()
        raise
    log.info("local clients: unix:%s (each caller named by its uid)", path)
    return UnixListener(path, identity)


def prepare_socket_dir(directory: Path) -> None:
    """The socket's directory: made 0755 if missing, else checked (``OSError`` if unsafe)."""
    try:
        os.makedirs(directory.parent, 0o755, exist_ok=True)
        check_ancestors(directory)
        ensure_dir(directory, shared=True)
    except StateDirError as exc:
        raise OSError(f"refusing the Unix socket's directory: {exc} (or configure another "
                      "socket: unix_socket)") from None
    if not os.lstat(directory).st_mode & stat.S_IXOTH:
        log.warning("%s is not searchable by others: only its owner can reach the socket",
                    directory)


def _refuse_live(path: Path) -> None:
    """A socket someone still listens on is theirs; a stale one may be replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket: remove it or configure another "
                      "unix_socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return
        except OSError:
            pass  # a timeout: someone is there, with a full backlog
    raise OSError(f"another process is serving on {path} (another broker?): stop it, or give "
                  "this broker its own socket (--unix-socket, [broker] unix_socket or "
                  "AIRLOCK_SOCKET)")


__all__ = ["UnixListener", "add_tcp_listeners", "add_unix_listener", "listener_count",
           "prepare_socket_dir"]

"""Opening the channel to a broker: its Unix socket, plain, TLS, or mutual TLS, with or without a
bearer token.

Over TLS the token rides as call credentials (``authorization: Bearer ...``), which gRPC sends
only on a secure channel. Without TLS it is plain metadata, and only to a loopback address: a
token sent in cleartext across a network is a token given away, so that is refused here as
the broker refuses to accept it.

**Which broker** (``default_address``): an explicit address, else ``AIRLOCK_SERVER``, else the
broker's Unix socket (``AIRLOCK_SOCKET``, default ``/run/airlock/broker.sock``) whenever its
directory exists, else ``127.0.0.1:50051``. A TCP port is anyone's to bind while the broker is
down; the socket's directory is root's, and stays when the broker stops, so a client that has
a socket to use never falls back to a port someone else may hold. ``localhost`` is dialled as
``127.0.0.1`` on a plaintext channel, so a user who binds ``[::1]`` gets nothing (the broker
holds both families as well).

**The Unix socket** (``unix:PATH``) is trusted only if no one but root, this user, or the uid
in ``AIRLOCK_BROKER_UID`` could have put it there: every directory on its path must be owned
by one of them and writable by no one else (a sticky directory such as /tmp is allowed above
the socket's own), and the socket itself owned by one of them. That is checked before every
call, so a socket that appears later is checked too; a call to a socket that fails the check
fails with ``UNAVAILABLE`` and says why, before any byte of it is sent. Each call also carries
a fresh single-use ticket from the broker's identity socket beside it, with which the broker
names the caller by its uid (the broker's ``peer_identity``). TLS settings do not apply to a
Unix socket (the kernel vouches for both ends); a token still rides along.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from airlock_client._errors import ServiceUnavailable
from airlock_client._regular_files import read_small
from airlock_client.addresses import is_loopback

#: Printable ASCII without spaces: what an HTTP/2 header value can carry unchanged.
_TOKEN = re.compile(r"[\x21-\x7e]{1,512}")

Metadata = tuple[tuple[str, str], ...]
PathLike = str | os.PathLike[str]

DEFAULT_ADDRESS = "127.0.0.1:50051"
#: A CA bundle, a client certificate or key: a system's whole CA bundle is about 200 KiB.
MAX_PEM_BYTES = 1024 * 1024
DEFAULT_SOCKET = Path("/run/airlock/broker.sock")
#: The broker's contract (its ``peer_identity``): the identity socket beside the gRPC one,
#: and the metadata that carries the ticket it hands out.
IDENTITY_SUFFIX = ".id"
PEER_TICKET_HEADER = "airlock-peer-ticket"
_TICKET = re.compile(r"[A-Za-z0-9_-]{32,64}")
_TICKET_TIMEOUT = 10.0


def default_address() -> str:
    """``AIRLOCK_SERVER``, else the broker's Unix socket if its directory exists, else
    ``127.0.0.1:50051`` (see the module docstring for why in this order)."""
    env = os.environ.get("AIRLOCK_SERVER")
    if env:
        return env
    chosen = os.environ.get("AIRLOCK_SOCKET")
    sock = DEFAULT_SOCKET if chosen is None else \
        None if chosen.strip().lower() in {"", "none"} else Path(chosen)
    if sock is not None and sock.parent.is_dir():
        return f"unix:{sock}"
    return DEFAULT_ADDRESS


def unix_path(address: str) -> Path | None:
    """The socket path of a ``unix:`` target (``unix:/p``, ``unix:///p``), else None."""
    if not address.startswith("unix:"):
        return None
    rest = address[len("unix:"):]
    return Path(rest[2:] if rest.startswith("//") else rest)


def trusted_owners() -> frozenset[int]:
    """Root, this user, and ``AIRLOCK_BROKER_UID`` (a broker running as a user of its own)."""
    owners = {0, os.geteuid()}
    extra = os.environ.get("AIRLOCK_BROKER_UID", "").strip()
    if extra:
        if not extra.isdigit():
            raise ValueError(f"AIRLOCK_BROKER_UID must be a uid (a number), not {extra!r}")
        owners.add(int(extra))
    return frozenset(owners)


class UntrustedSocket(ServiceUnavailable):
    """The socket, or a directory on its path, could have been made by someone else."""

    reason = "UNTRUSTED_SOCKET"


def check_socket(path: Path, owners: frozenset[int]) -> None:
    """Raise ``UntrustedSocket`` (or ``OSError``: missing) unless only ``owners`` could have
    put a socket at ``path``; ``path`` must have no symbolic link in it (``realpath`` first)."""
    def refuse(why: str) -> UntrustedSocket:
        return UntrustedSocket(f"refusing the broker socket {path}: {why}; only root, this "
                               "user or AIRLOCK_BROKER_UID may own it and its directories")
    directories = list(reversed(path.parents))
    for directory in directories:
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode):
            raise refuse(f"{directory} is not a directory (a symbolic link?)")
        if st.st_uid not in owners:
            raise refuse(f"{directory} is owned by uid {st.st_uid}")
        sticky = st.st_mode & stat.S_ISVTX and directory != path.parent
        if st.st_mode & 0o022 and not sticky:
            raise refuse(f"{directory} is writable by others (mode "
                         f"{stat.S_IMODE(st.st_mode):o})")
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise refuse("it is not a socket")
    if st.st_uid not in owners:
        raise refuse(f"it is owned by uid {st.st_uid}")


class PeerTicket(grpc.AuthMetadataPlugin):
    """Before each call: check the socket, then fetch a single-use ticket naming this uid."""

    def __init__(self, path: Path, owners: frozenset[int]) -> None:
        self.path = path
        self.identity = path.with_name(path.name + IDENTITY_SUFFIX)
        self.owners = owners

    def __call__(self, context: Any, callback: Any) -> None:
        try:
            callback(((PEER_TICKET_HEADER, self.fetch()),), None)
        except UntrustedSocket as exc:
            callback(None, exc)
        except OSError as exc:
            callback(None, OSError(f"cannot reach the broker at unix:{self.path}: "
                                   f"{exc.strerror or exc}"))

    def fetch(self) -> str:
        check_socket(self.path, self.owners)
        check_socket(self.identity, self.owners)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_TICKET_TIMEOUT)
            sock.connect(os.fspath(self.identity))
            raw = sock.recv(128)
        ticket = raw.decode("ascii", "replace")
        if not _TICKET.fullmatch(ticket):
            raise UntrustedSocket(f"{self.identity} did not answer with a ticket")
        return ticket


@dataclass(frozen=True)
class ChannelSettings:
    """How to reach and authenticate to the broker. See ``Client`` for each field."""

    token: str | None = field(default=None, repr=False)  # never in a repr, a log or a traceback
    tls: bool = False
    tls_ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def __post_init__(self) -> None:
        if self.token is not None and not _TOKEN.fullmatch(self.token):
            raise ValueError("the token must be 1-512 printable ASCII characters, no spaces")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")

    @property
    def secure(self) -> bool:
        return self.tls or self.tls_ca is not None or self.client_cert is not None

    @classmethod
    def resolve(cls, *, token: str | None, tls: bool | None, tls_ca: PathLike | None,
                client_cert: PathLike | None, client_key: PathLike | None) -> ChannelSettings:
        """Explicit values, else ``AIRLOCK_TOKEN``, ``AIRLOCK_TLS``, ``AIRLOCK_TLS_CA``,
        ``AIRLOCK_CLIENT_CERT``, ``AIRLOCK_CLIENT_KEY`` (as ``AIRLOCK_SERVER`` names the server).
        ``token=""`` means no token, whatever the environment says.
        """
        env = os.environ

        def path(value: PathLike | None, name: str) -> Path | None:
            chosen = value if value is not None else env.get(name) or None
            return Path(chosen) if chosen is not None else None

        if token is None:
            token = env.get("AIRLOCK_TOKEN") or None
        if tls is None:
            tls = env.get("AIRLOCK_TLS", "").lower() in {"1", "true", "yes"}
        return cls(token=token.strip() or None if token else None, tls=tls,
                   tls_ca=path(tls_ca, "AIRLOCK_TLS_CA"),
                   client_cert=path(client_cert, "AIRLOCK_CLIENT_CERT"),
                   client_key=path(client_key, "AIRLOCK_CLIENT_KEY"))


def open_channel(address: str, settings: ChannelSettings,
                 options: list[tuple[str, int]]) -> tuple[grpc.Channel, Metadata]:
    """The channel, and the metadata each call must carry (only for a loopback token)."""
    if address.startswith("unix-abstract:"):
        raise ValueError(f"refusing {address}: an abstract socket has no owner, so anyone may "
                         "have bound that name first; use the broker's unix:PATH")
    path = unix_path(address)
    if path is not None:
        return _unix_channel(path, settings, options), ()
    if settings.secure:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(settings.tls_ca), private_key=_read(settings.client_key),
            certificate_chain=_read(settings.client_cert))
        if settings.token is not None:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(settings.token))
        return grpc.secure_channel(address, creds, options=options), ()
    address = _ipv4_for_localhost(address)
    if settings.token is None:
        return grpc.insecure_channel(address, options=options), ()
    if not is_loopback(address):
        raise ValueError(f"refusing to send a bearer token in cleartext to {address}: use TLS "
                         "(tls_ca=... / --tls-ca, or tls=True / --tls for the system's CAs)")
    return (grpc.insecure_channel(address, options=options),
            (("authorization", f"Bearer {settings.token}"),))


def _unix_channel(path: Path, settings: ChannelSettings,
                  options: list[tuple[str, int]]) -> grpc.Channel:
    """Local credentials: gRPC attaches call credentials (the ticket, a token) only to a
    channel it deems secure, and a Unix socket is, between two processes of one kernel."""
    if not path.is_absolute():
        raise ValueError(f"the broker socket must be an absolute path, not {path}")
    real = Path(os.path.realpath(path.parent)) / path.name  # then checked link-free
    owners = trusted_owners()
    if os.path.lexists(real):  # refused before gRPC even connects (it would send a preface)
        try:
            check_socket(real, owners)
        except OSError as exc:
            raise ServiceUnavailable(f"cannot reach the broker at unix:{real}: "
                                     f"{exc.strerror or exc}") from None
    calls = [grpc.metadata_call_credentials(PeerTicket(real, owners),
                                            name="airlock-peer-ticket")]
    if settings.token is not None:
        calls.append(grpc.access_token_call_credentials(settings.token))
    creds = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(grpc.LocalConnectionType.UDS), *calls)
    return grpc.secure_channel(f"unix:{real}", creds, options=options)


def _ipv4_for_localhost(address: str) -> str:
    """``localhost:P`` as ``127.0.0.1:P``: without TLS nothing but the address says who
    answers, and ``localhost`` may resolve to ``::1`` first, which any user may have bound."""
    for prefix in ("", "dns:", "dns:///"):
        if address.startswith(prefix + "localhost:"):
            return "127.0.0.1:" + address[len(prefix + "localhost:"):]
    return address


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return read_small(path, MAX_PEM_BYTES)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None

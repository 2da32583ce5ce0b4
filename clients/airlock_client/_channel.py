"""Opening the channel to a broker: plain, TLS, or mutual TLS, with or without a bearer token.

Over TLS the token rides as call credentials (``authorization: Bearer ...``), which gRPC sends
only on a secure channel. Without TLS it is plain metadata, and only to a loopback address: a
token sent in cleartext across a network is a token given away, so that is refused here as
the broker refuses to accept it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import grpc

#: Printable ASCII without spaces: what an HTTP/2 header value can carry unchanged.
_TOKEN = re.compile(r"[\x21-\x7e]{1,512}")

Metadata = tuple[tuple[str, str], ...]
PathLike = str | os.PathLike[str]


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


def is_loopback(address: str) -> bool:
    """Whether ``address`` (a gRPC target) can only be this machine."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    target = address.split("///", 1)[-1] if address.startswith("dns:") else address
    target = target.removeprefix("ipv4:").removeprefix("ipv6:")
    host = target.rpartition(":")[0] if ":" in target else target
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_channel(address: str, settings: ChannelSettings,
                 options: list[tuple[str, int]]) -> tuple[grpc.Channel, Metadata]:
    """The channel, and the metadata each call must carry (only for a loopback token)."""
    if settings.secure:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(settings.tls_ca), private_key=_read(settings.client_key),
            certificate_chain=_read(settings.client_cert))
        if settings.token is not None:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(settings.token))
        return grpc.secure_channel(address, creds, options=options), ()
    if settings.token is None:
        return grpc.insecure_channel(address, options=options), ()
    if not is_loopback(address):
        raise ValueError(f"refusing to send a bearer token in cleartext to {address}: use TLS "
                         "(tls_ca=... / --tls-ca, or tls=True / --tls for the system's CAs)")
    return (grpc.insecure_channel(address, options=options),
            (("authorization", f"Bearer {settings.token}"),))


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None

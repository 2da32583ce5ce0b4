"""Who may call the broker, as frozen data: TLS files, hashed bearer tokens, certificate subjects.

Read from the ``[auth]`` section of the broker's TOML (paths relative to that file)::

    [auth]
    tls_cert = "server.crt"          # TLS on the listening port
    tls_key = "server.key"
    client_ca = "clients-ca.pem"     # mutual TLS: every client must present a cert signed by it
    tokens_file = "tokens.toml"      # optional: more [[auth.tokens]] tables, kept apart

    [[auth.tokens]]                  # printed by `airlock-broker token create`
    principal = "ci-batch"
    roles = ["convert"]
    sha256 = "9f86d0..."             # SHA-256 of the token; the token itself is never stored

    [[auth.subjects]]                # a client certificate's SANs (its CN only if it has none)
    name = "ops.example.com"
    roles = ["admin"]

    [[auth.local_users]]             # a caller on the broker's Unix socket, by its uid
    uid = 1000
    roles = ["admin", "convert"]

    anonymous_admin = false          # true: callers without credentials on the TCP port
                                     # may operate the pools (any local user could)

Why a plain SHA-256 and not a password KDF: tokens are minted by ``mint_token`` with 256 bits
from ``secrets``, so nobody can guess one from its digest however fast the hash is; a KDF
protects low-entropy passwords, and here it would only give callers a way to burn the broker's
CPU with every request.

``check_listen`` is the rule for where the broker may listen: without authentication only on
loopback (or a unix socket), unless ``insecure_no_auth`` says otherwise, visibly; and bearer
tokens never in cleartext beyond loopback.

Who holds which role (``auth.py`` applies it):

- a token's or a certificate subject's principal: the roles configured for it;
- a caller on the broker's Unix socket without a token, named ``uid:N`` by the kernel
  (``SO_PEERCRED``): uid 0 and the broker's own uid hold every role (they own the broker's
  files already); others hold ``[[auth.local_users]]``'s roles, plus ``convert`` when
  authentication is off (as anyone on the TCP port has);
- ``anonymous`` (the TCP port, authentication off): ``convert``, and ``admin`` only with
  ``anonymous_admin = true``: every local user shares that principal, and draining the pools
  is not something any of them should be able to do unnoticed.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import ssl
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airlock_broker.security.trusted_files import check_trusted_file, read_trusted_file
from airlock_client.addresses import is_loopback

TOKEN_PREFIX = "airlock_"
_DIGEST = re.compile(r"[0-9a-f]{64}")
#: Principal and subject names: printable, no quotes or control characters, bounded.
_NAME = re.compile(r"[A-Za-z0-9*][A-Za-z0-9_.@:/=,+*-]{0,252}")
_MAX_TOKENS_FILE = 1024 * 1024
_MAX_ENTRIES = 10_000


class Role(enum.StrEnum):
    #: ConversionService: convert artifacts.
    CONVERT = "convert"
    #: AdminService: pool status, restart, drain, resume; the isolation self-test.
    ADMIN = "admin"
    #: AdminService's pool status alone (dashboards, monitors): what ``admin`` may do that
    #: changes nothing. ``admin`` includes it.
    OBSERVE = "observe"


def mint_token() -> str:
    """A new bearer token: 256 random bits, prefixed so secret scanners can spot a leak."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the config stores in place of ``token`` (see the module docstring for why SHA-256)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _roles(values: Iterable[str], where: str) -> frozenset[Role]:
    roles = list(values)
    unknown = [r for r in roles if r not in {x.value for x in Role}]
    if unknown or not roles:
        raise ValueError(f"{where}: roles must be a non-empty subset of "
                         f"{sorted(r.value for r in Role)}, not {roles!r}")
    return frozenset(Role(r) for r in roles)


def _check_name(name: str, where: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}: {name!r} is not an acceptable name (letters, digits and "
                         "_.@:/=,+*- only, at most 253 characters)")
    # The broker's own names: a token or certificate named so would share the idempotency
    # keys, tickets and audit name of every unauthenticated caller, or of a local user.
    if name == "anonymous" or name.startswith("uid:"):
        raise ValueError(f"{where}: {name!r} is a name the broker gives callers itself "
                         "('anonymous', 'uid:N'): choose another")


@dataclass(frozen=True)
class TokenEntry:
    """One accepted bearer token, by its digest, and whom it stands for."""

    principal: str
    roles: frozenset[Role]
    sha256: str = field(repr=False)

    def __post_init__(self) -> None:
        _check_name(self.principal, "token principal")
        if not _DIGEST.fullmatch(self.sha256):
            raise ValueError(f"token of {self.principal}: sha256 must be 64 lowercase hex digits "
                             "(`airlock-broker token create` prints it)")


@dataclass(frozen=True)
class SubjectEntry:
    """A client certificate identity (a SAN or the CN) and its roles."""

    name: str
    roles: frozenset[Role]

    def __post_init__(self) -> None:
        _check_name(self.name, "certificate subject")


@dataclass(frozen=True)
class LocalUserEntry:
    """A local user, by uid, and the roles it holds on the broker's Unix socket."""

    uid: int
    roles: frozenset[Role]

    def __post_init__(self) -> None:
        if isinstance(self.uid, bool) or not isinstance(self.uid, int) \
                or not 0 <= self.uid < 2**32 - 1:
            raise ValueError(f"[[auth.local_users]]: uid must be a number (0 to 4294967294), "
                             f"not {self.uid!r}")

    @property
    def principal(self) -> str:
        return f"uid:{self.uid}"


@dataclass(frozen=True)
class AuthConfig:
    """TLS, mutual TLS and tokens. The default is no authentication, hence loopback only."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Clients must present a certificate signed by this CA (the TLS handshake fails otherwise).
    client_ca: Path | None = None
    tokens: tuple[TokenEntry, ...] = ()
    subjects: tuple[SubjectEntry, ...] = ()
    #: Serve beyond loopback without authentication. A weakening: say it out loud.
    insecure_no_auth: bool = False
    #: Roles of callers on the broker's Unix socket, by uid (root and the broker's own uid
    #: hold every role without a line here).
    local_users: tuple[LocalUserEntry, ...] = ()
    #: Let callers without credentials on the TCP port (the shared principal "anonymous")
    #: operate the pools. A weakening: any local user could drain them.
    anonymous_admin: bool = False

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("[auth] tls_cert and tls_key go together")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("[auth] client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.subjects and self.client_ca is None:
            raise ValueError("[auth] subjects are client certificates: they need client_ca")
        digests = [t.sha256 for t in self.tokens]
        if len(set(digests)) != len(digests):
            raise ValueError("[auth] the same token digest appears twice")
        names = [s.name for s in self.subjects]
        if len(set(names)) != len(names):
            raise ValueError("[auth] a certificate subject appears twice")
        uids = [u.uid for u in self.local_users]
        if len(set(uids)) != len(uids):
            raise ValueError("[auth] a local user's uid appears twice")
        if self.anonymous_admin and self.enabled:
            raise ValueError("anonymous_admin is set but authentication is configured: "
                             "callers on the TCP port are never anonymous then; drop it")
        if self.insecure_no_auth and self.enabled:
            raise ValueError("insecure_no_auth is set but authentication is configured: "
                             "drop one of them")
        for name, path in (("tls_cert", self.tls_cert), ("tls_key", self.tls_key),
                           ("client_ca", self.client_ca)):
            if path is not None:  # a readable regular file no one else could have written
                check_trusted_file(path, f"[auth] {name}")
        self._check_pem()

    def _check_pem(self) -> None:
        """Parse the PEM files now: gRPC would only say "failed to bind" about a bad one."""
        if self.tls_cert is None or self.tls_key is None:
            return
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:  # the password callback keeps OpenSSL from prompting on a terminal
            context.load_cert_chain(self.tls_cert, self.tls_key, password=lambda: b"")
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"[auth] tls_cert / tls_key ({self.tls_cert}, {self.tls_key}) "
                             f"are not a matching PEM certificate and unencrypted key: "
                             f"{exc}") from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"[auth] client_ca {self.client_ca} is not a PEM CA "
                                 f"certificate: {exc}") from None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def mutual_tls(self) -> bool:
        return self.client_ca is not None

    @property
    def enabled(self) -> bool:
        """Whether callers must authenticate (by token or client certificate)."""
        return bool(self.tokens) or self.mutual_tls

    def describe(self) -> str:
        """For the start-up line: what a caller must present."""
        local = f", {len(self.local_users)} local user(s)" if self.local_users else ""
        if not self.enabled:
            transport = "TLS, " if self.tls else ""
            admin = ", ANYONE MAY OPERATE THE POOLS (anonymous_admin)" if self.anonymous_admin \
                else ""
            return transport + ("WITHOUT AUTHENTICATION (--insecure-no-auth)"
                                if self.insecure_no_auth else "no authentication: loopback only"
                                ) + admin + local
        parts = ["mutual TLS" if self.mutual_tls else "TLS" if self.tls else "no TLS (loopback)"]
        if self.tokens:
            parts.append(f"{len(self.tokens)} token(s)")
        if self.mutual_tls:
            parts.append(f"{len(self.subjects)} certificate subject(s)")
        return ", ".join(parts) + local

    @classmethod
    def from_toml(cls, doc: dict[str, Any], base: Path) -> AuthConfig:
        """The ``[auth]`` table of a config file that lives in directory ``base``."""
        known = {"tls_cert", "tls_key", "client_ca", "tokens_file", "tokens", "subjects",
                 "insecure_no_auth", "local_users", "anonymous_admin"}
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"unknown keys in [auth]: {sorted(unknown)}")
        paths = {k: base / doc[k] for k in ("tls_cert", "tls_key", "client_ca") if k in doc}
        tokens = _token_entries(doc.get("tokens", []), "[[auth.tokens]]")
        if "tokens_file" in doc:
            tokens += load_tokens_file(base / doc["tokens_file"])
        subjects = []
        for item in _tables(doc.get("subjects", []), "[[auth.subjects]]", {"name", "roles"}):
            subjects.append(SubjectEntry(name=item["name"],
                                         roles=_roles(item["roles"], f"subject {item['name']}")))
        local_users = [LocalUserEntry(uid=item["uid"],
                                      roles=_roles(item["roles"], f"local user {item['uid']}"))
                       for item in _tables(doc.get("local_users", []), "[[auth.local_users]]",
                                           {"uid", "roles"})]
        flags = {}
        for flag in ("insecure_no_auth", "anonymous_admin"):
            flags[flag] = doc.get(flag, False)
            if not isinstance(flags[flag], bool):
                raise ValueError(f"[auth] {flag} must be true or false")
        return cls(tokens=tuple(tokens), subjects=tuple(subjects),
                   local_users=tuple(local_users), **flags, **paths)


def _tables(items: Any, where: str, keys: set[str]) -> list[dict[str, Any]]:
    if not isinstance(items, list) or len(items) > _MAX_ENTRIES:
        raise ValueError(f"{where} must be an array of at most {_MAX_ENTRIES} tables")
    for item in items:
        if not isinstance(item, dict) or set(item) != keys:
            raise ValueError(f"each {where} table has exactly the keys {sorted(keys)}")
    return items


def _token_entries(items: Any, where: str) -> list[TokenEntry]:
    return [TokenEntry(principal=item["principal"],
                       roles=_roles(item["roles"], f"token of {item['principal']}"),
                       sha256=item["sha256"])
            for item in _tables(items, where, {"principal", "roles", "sha256"})]


def load_tokens_file(path: Path) -> list[TokenEntry]:
    """A file holding only ``[[auth.tokens]]`` tables (so a minted snippet pastes into either),
    which no one but root or the broker's user could have written (``trusted_files``)."""
    raw = read_trusted_file(path, "[auth] tokens_file", _MAX_TOKENS_FILE)
    doc = tomllib.loads(raw.decode("utf-8"))
    auth = doc.get("auth")
    if set(doc) != {"auth"} or not isinstance(auth, dict) or set(auth) != {"tokens"}:
        raise ValueError(f"{path} may hold only [[auth.tokens]] tables")
    return _token_entries(auth["tokens"], f"[[auth.tokens]] in {path}")


def check_listen(address: str, auth: AuthConfig) -> None:
    """Refuse a listen address the auth settings cannot protect (raises ``ValueError``)."""
    if address.startswith(("unix:", "unix-abstract:")):
        raise ValueError(f"listen takes HOST:PORT, not {address}: the broker's Unix socket, "
                         "where each caller is named by its uid, is [broker] unix_socket "
                         "(--unix-socket)")
    if is_loopback(address):
        return
    if auth.tokens and not auth.tls:
        raise ValueError(
            f"refusing to accept bearer tokens in cleartext on {address}: configure "
            "[auth] tls_cert and tls_key, or listen on loopback")
    if not auth.enabled and not auth.insecure_no_auth:
        raise ValueError(
            f"refusing to listen on {address} without authentication: configure [auth] "
            "(tokens or client certificates), listen on 127.0.0.1, or pass --insecure-no-auth "
            "to let anyone who can reach the port convert")


__all__ = ["TOKEN_PREFIX", "AuthConfig", "LocalUserEntry", "Role", "SubjectEntry", "TokenEntry",
           "check_listen", "is_loopback", "load_tokens_file", "mint_token", "token_digest"]

"""Who is calling, and may they: the broker's authentication and authorization interceptor.

Every RPC except health and reflection passes through ``AuthInterceptor`` before its servicer
runs (so an unauthenticated caller cannot make the broker spool a single byte). It is always
installed: even without ``[auth]``, operating the pools needs the admin role.

1. **Identify.** On the broker's Unix socket every call carries a peer ticket
   (``peer_identity``): the caller is ``uid:N``, named by the kernel; a call there without a
   valid ticket is ``UNAUTHENTICATED``. When ``[auth]`` is configured, a bearer token
   (``authorization: Bearer ...``) is hashed and compared with the configured digests and wins
   over the uid; a wrong token is ``UNAUTHENTICATED`` even if a client certificate was
   presented too. Without a token, the client certificate (mutual TLS; its chain was already
   checked against ``client_ca`` by the TLS handshake) names the caller by its SANs, or by
   its CN only when it has no SAN (RFC 6125: a CN beside SANs is not an identity). Without
   ``[auth]``, a TCP caller is ``anonymous``. Otherwise: ``UNAUTHENTICATED``.
2. **Authorize.** Each service needs one role: ``convert`` for ConversionService, ``admin`` for
   AdminService (``OPEN_METHODS`` lists the exceptions: the provenance public key). Pool
   *status* needs ``observe`` (``METHOD_ROLES``), which ``admin`` includes: it names the
   runtime and image a sandbox escape would have to beat, and shows other callers' load, so
   converting callers do not have it (they learn about load from ``BUSY``); a monitor can,
   without the role that drains and restarts the pools.
   Who holds which role is in ``auth_config`` (root on the Unix socket holds all;
   ``anonymous`` converts but operates the pools only with ``anonymous_admin``).
   A service missing from ``SERVICE_ROLES`` is refused to everyone.
   Missing role: ``PERMISSION_DENIED``.

The principal that passed is available to the servicer as ``current_principal()`` (audit log,
job logs). gRPC runs each RPC in its own task, whose context is a copy, so the value set here
belongs to that one call. The token itself is never logged, stored or echoed.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from grpc_status import rpc_status

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.api.wire import status_of
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.fastpath.peer_identity import PEER_TICKET_HEADER, PeerTickets
from airlock_broker.hostile_text import printable_name
from airlock_broker.ops.log_budget import LogBudget, left_out
from airlock_broker.security.auth_config import AuthConfig, Role, TokenEntry, token_digest
from airlock_broker.security.trusted_files import read_trusted_file
from airlock_broker.security.uid_owners import UidOwners

log = logging.getLogger(__name__)

#: Callable by anyone: load balancers probe health, and reflection only describes the API.
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})
#: Methods of protected services that anyone may call. The provenance *public* key: whoever
#: holds an output may verify it without being allowed to convert.
OPEN_METHODS = frozenset({
    f"/{pb.DESCRIPTOR.services_by_name['ConversionService'].full_name}/GetProvenanceKey",
})
#: The one role each service needs. A test proves every service in the proto has a row.
SERVICE_ROLES: dict[str, Role] = {
    pb.DESCRIPTOR.services_by_name["ConversionService"].full_name: Role.CONVERT,
    pb.DESCRIPTOR.services_by_name["AdminService"].full_name: Role.ADMIN,
}
#: Methods that need less than their service's role: reading the pools' status changes
#: nothing, so a monitor need not hold the role that drains and restarts them.
METHOD_ROLES: dict[str, Role] = {
    f"/{pb.DESCRIPTOR.services_by_name['AdminService'].full_name}/GetPoolStatus": Role.OBSERVE,
}
#: Roles that include others.
_INCLUDES: dict[Role, frozenset[Role]] = {Role.ADMIN: frozenset({Role.OBSERVE})}


def holds(principal_roles: frozenset[Role], role: Role) -> bool:
    """Whether roles ``principal_roles`` include ``role`` (``admin`` includes ``observe``)."""
    return role in principal_roles or any(role in _INCLUDES.get(r, ()) for r in principal_roles)
_MAX_TOKEN = 512


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a token's principal or a certificate's subject."""

    name: str
    #: How it was established: "token", "certificate", "peercred" (the Unix socket's
    #: ``SO_PEERCRED``), or "none" (a TCP caller while authentication is off).
    method: str
    roles: frozenset[Role]
    #: Whom the per-caller bounds count it as, when not ``name``: a local user's subordinate
    #: uid (a process in that user's namespace: /etc/subuid) counts as the user that owns it.
    counted_as: str = ""

    @property
    def quota(self) -> str:
        """The key of every per-caller bound (admission places, calls waiting for their
        request, fast-path tickets): one user is one caller, however many uids it has."""
        return self.counted_as or self.name

    @property
    def uid(self) -> int | None:
        """The local user this caller is, when the kernel said so (``peercred``)."""
        if self.method != "peercred":
            return None
        return int(self.name.removeprefix("uid:"))


ANONYMOUS = Principal(name="anonymous", method="none", roles=frozenset())
_EVERY_ROLE = frozenset(Role)
_CURRENT: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "airlock_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The caller of the RPC being served (``ANONYMOUS`` outside an intercepted call)."""
    return _CURRENT.get()


class PrincipalFilter(logging.Filter):
    """Adds the caller's ``principal`` to every job log line (those with a ``job_id``).

    A job's lines are logged from its RPC's task, or from tasks it started (which copy its
    context), so ``current_principal()`` is that job's caller.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if hasattr(record, "job_id") and not hasattr(record, "principal"):
            record.principal = current_principal().name
        return True


class Authenticator:
    """Turns what a call presented into a ``Principal``, or a ``Denied`` error."""

    def __init__(self, config: AuthConfig, tickets: PeerTickets | None = None,
                 broker_uid: int | None = None, owners: UidOwners | None = None) -> None:
        self.enabled = config.enabled
        self.tokens: tuple[TokenEntry, ...] = config.tokens
        self.subjects = {s.name: s.roles for s in config.subjects}
        self.mutual_tls = config.mutual_tls
        self.tickets = tickets if tickets is not None else PeerTickets()
        #: A subordinate uid counts as its owner for every per-caller bound.
        self.uid_owners = owners or UidOwners()
        self.local_users = {u.uid: u.roles for u in config.local_users}
        #: Root and the broker's own user can read its keys and config anyway.
        self.owners = frozenset({0, os.geteuid() if broker_uid is None else broker_uid})
        self.anonymous = Principal(
            "anonymous", "none",
            frozenset({Role.CONVERT} | ({Role.ADMIN} if config.anonymous_admin else set())))

    def identify(self, metadata: Sequence[tuple[str, str | bytes]] | None,
                 auth_context: Mapping[str, Any], peer: str = "") -> Principal:
        metadata = metadata or ()
        unix = peer.startswith("unix:")
        uid = self._peer_uid(metadata, unix)
        if self.enabled:
            token = self._bearer(metadata)
            if token is not None:
                entry = self._match(token)
                if entry is None:
                    raise error(Reason.UNAUTHENTICATED, "the bearer token is not valid")
                return Principal(entry.principal, "token", entry.roles)
            names = [] if unix else self._certificate_names(auth_context)
            if names:
                for name in names:  # exact matches only: nothing truncated or replaced
                    if name in self.subjects:
                        return Principal(name, "certificate", self.subjects[name])
                return Principal(printable_name(names[0]), "certificate", frozenset())
        if uid is not None:
            return self._local(uid)
        if unix:
            raise error(Reason.UNAUTHENTICATED, "a call on the broker's Unix socket must carry "
                        "a peer ticket from its identity socket (the airlock client sends "
                        "one)")
        if not self.enabled:
            return self.anonymous
        raise error(Reason.UNAUTHENTICATED, "no credentials: send a bearer token "
                    "(authorization: Bearer ...)" + (" or a client certificate"
                                                     if self.mutual_tls else ""))

    def _peer_uid(self, metadata: Sequence[tuple[str, str | bytes]], unix: bool) -> int | None:
        """The uid a peer ticket was issued to (single use), None if the call has none."""
        values = [v for k, v in metadata if k.lower() == PEER_TICKET_HEADER]
        if not values:
            return None
        if not unix:  # tickets never travel over TCP; one that does was taken from its owner
            raise error(Reason.UNAUTHENTICATED, "peer tickets are accepted only on the "
                        "broker's Unix socket")
        raw = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        uid = self.tickets.redeem(raw) if len(values) == 1 else None
        if uid is None:
            raise error(Reason.UNAUTHENTICATED, "the peer ticket is unknown, used or expired: "
                        "take a new one for each call")
        return uid

    def _local(self, uid: int) -> Principal:
        if uid in self.owners:
            roles = _EVERY_ROLE
        else:
            roles = self.local_users.get(uid, frozenset())
            if not self.enabled:  # as anyone on the TCP port may
                roles |= {Role.CONVERT}
        owner = self.uid_owners.owner(uid)
        return Principal(f"uid:{uid}", "peercred", roles,
                         counted_as=f"uid:{owner}" if owner != uid else "")

    @staticmethod
    def _bearer(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        values = [v for k, v in metadata if k.lower() == "authorization"]
        if not values:
            return None
        if len(values) > 1:
            raise error(Reason.UNAUTHENTICATED, "more than one authorization header")
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN:
            raise error(Reason.UNAUTHENTICATED,
                        "the authorization header must be 'Bearer <token>'")
        return token

    def _match(self, token: str) -> TokenEntry | None:
        digest = token_digest(token)
        found = None
        for entry in self.tokens:  # no early exit: every entry is compared
            if hmac.compare_digest(digest, entry.sha256) and found is None:
                found = entry
        return found

    def _certificate_names(self, auth_context: Mapping[str, Any]) -> list[str]:
        """The SANs; the CN only when there is no SAN (RFC 6125 §6.4.4: a CA vouches for the
        SANs it issued, and a CN beside them may say anything). Only from a verified
        handshake."""
        if not self.mutual_tls or list(auth_context.get("transport_security_type", [])) \
                != [b"ssl"]:
            return []

        def names(key: str) -> list[str]:
            return [r.decode("utf-8", "replace") for r in auth_context.get(key, [])
                    if isinstance(r, bytes) and r]
        return names("x509_subject_alternative_name") or names("x509_common_name")


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the stubs


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call to a protected service before its servicer runs."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        #: Refusals are a caller's to cause: their lines are bounded (ops/log_budget.py).
        self.refusals = LogBudget()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        service = method.lstrip("/").split("/", 1)[0]
        if handler is None or service in OPEN_SERVICES or method in OPEN_METHODS:
            return handler
        return _guarded(handler, lambda context: self._admit(method, service, context))

    def _admit(self, method: str, service: str, context: Any) -> Principal:
        raw_peer = context.peer()
        peer = printable_name(raw_peer)
        try:
            principal = self.authenticator.identify(context.invocation_metadata(),
                                                    context.auth_context(), raw_peer)
        except AirlockError as exc:
            self._refused("refused %s from %s: %s", method, peer, exc.message)
            raise
        role = METHOD_ROLES.get(method, SERVICE_ROLES.get(service))
        if role is None or not holds(principal.roles, role):
            needs = f"the {role.value} role" if role else "a role no principal can hold"
            self._refused("refused %s from %s: principal %s (%s) lacks %s", method, peer,
                          principal.name, principal.method, needs)
            raise error(Reason.PERMISSION_DENIED,
                        f"{principal.name} may not call {method.rsplit('/', 1)[-1]}: it needs "
                        f"{needs}{_how_to_get(principal, role)}")
        if role is Role.ADMIN:  # what changes the pools; a status read is not news
            log.info("%s called by %s (%s) from %s", method.rsplit("/", 1)[-1], principal.name,
                     principal.method, peer)
        return principal


    def _refused(self, message: str, *args: object) -> None:
        write, dropped = self.refusals.take()
        if write:
            log.warning(message + "%s", *args, left_out(dropped))


def _how_to_get(principal: Principal, role: Role | None) -> str:
    if role is None:
        return ""
    if principal.method == "none":
        return (" (call over the broker's Unix socket as root, send a token that holds it, or, "
                "to let every local user have it, set [auth] anonymous_admin = true)")
    if principal.method == "peercred":
        return " (grant it to this uid in [[auth.local_users]], or send a token that holds it)"
    return ""


def _guarded(handler: Handler, admit: Callable[[Any], Principal]) -> Handler:
    """The same handler, with ``admit`` run (and the principal set) before the servicer."""

    async def enter(context: Any) -> None:
        try:
            principal = admit(context)
        except AirlockError as exc:
            await context.abort_with_status(rpc_status.to_status(status_of(exc, "")))
            raise  # abort_with_status raises; this only keeps a non-raising fake honest
        _CURRENT.set(principal)

    if handler.unary_unary:
        uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await enter(context)
            return await uu(request, context)
        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            await enter(context)
            return await su(requests, context)
        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer)
    inner: Any = handler.unary_stream or handler.stream_stream  # async generators here

    async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
        await enter(context)
        async for item in inner(request, context):
            yield item
    make = grpc.unary_stream_rpc_method_handler if handler.unary_stream \
        else grpc.stream_stream_rpc_method_handler
    return make(streaming, handler.request_deserializer, handler.response_serializer)


def server_credentials(config: AuthConfig) -> grpc.ServerCredentials | None:
    """TLS for the listening port (client certificates required when a client CA is set)."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    ca = (read_trusted_file(config.client_ca, "[auth] client_ca")
          if config.client_ca is not None else None)
    return grpc.ssl_server_credentials(
        [(read_trusted_file(config.tls_key, "[auth] tls_key"),
          read_trusted_file(config.tls_cert, "[auth] tls_cert"))],
        root_certificates=ca, require_client_auth=ca is not None)


__all__ = ["ANONYMOUS", "OPEN_METHODS", "OPEN_SERVICES", "SERVICE_ROLES", "AuthInterceptor",
           "Authenticator", "Principal", "PrincipalFilter", "current_principal",
           "server_credentials"]

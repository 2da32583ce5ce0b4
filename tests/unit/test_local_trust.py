"""Local trust (issue 11, §6), the parts that need no engine: who a Unix caller is, who may
operate the pools, which sockets a client trusts, which address it dials, where the broker
listens.

The same properties against a real broker, played by another user: tests/adversarial/
test_local_trust.py. A broker's hostile text on the terminal: test_hostile_broker_text.py;
metrics beyond loopback and certificate names: test_auth.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.api.auth import Authenticator
from airlock_broker.api.local_listeners import add_tcp_listeners, prepare_socket_dir
from airlock_broker.api.server import create_server
from airlock_broker.config import BrokerConfig
from airlock_broker.errors import AirlockError
from airlock_broker.fastpath import peer_identity
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.security import exposure
from airlock_broker.security.auth_config import (
    AuthConfig,
    LocalUserEntry,
    Role,
    mint_token,
    token_digest,
)
from airlock_broker.security.auth_config import TokenEntry as Token
from airlock_client import Client, ServiceUnavailable, _channel
from tests.unit.fakes import FakeSandbox, running_broker
from tests.unit.test_auth import write_safetensors

NOBODY = 65534
#: What operating and converting take (``admin`` includes ``observe``).
ALL = frozenset({Role.ADMIN, Role.CONVERT})


# -- peer tickets -------------------------------------------------------------------------------

def test_a_peer_ticket_names_its_uid_once_and_not_after_it_expires() -> None:
    now = [0.0]
    tickets = peer_identity.PeerTickets(ttl_seconds=30, per_uid=3, clock=lambda: now[0])
    first, second = tickets.issue(1000), tickets.issue(0)
    assert tickets.redeem(first) == 1000 and tickets.redeem(first) is None  # single use
    assert tickets.redeem("x" * 43) is None and tickets.redeem("y" * 5000) is None
    now[0] = 31
    assert tickets.redeem(second) is None  # expired
    flood = [tickets.issue(1000) for _ in range(10)]
    other = tickets.issue(1001)
    assert len(tickets) == 4  # 3 for the flooding uid, its oldest dropped; the other's kept
    assert [tickets.redeem(t) for t in flood[-3:]] == [1000] * 3
    assert tickets.redeem(flood[0]) is None and tickets.redeem(other) == 1001


def test_the_identity_socket_answers_with_the_connecting_processes_uid(tmp_path: Path) -> None:
    tickets = peer_identity.PeerTickets()
    server = peer_identity.IdentityServer(tmp_path / "b.sock.id", tickets)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        server.answer(a)
        assert tickets.redeem(b.recv(128).decode()) == os.getuid()


def test_client_and_broker_agree_on_the_ticket_contract() -> None:
    assert _channel.IDENTITY_SUFFIX == exposure.IDENTITY_SUFFIX
    assert _channel.PEER_TICKET_HEADER == peer_identity.PEER_TICKET_HEADER
    assert _channel.DEFAULT_SOCKET.parent.as_posix() == "/run/airlock"


# -- who holds which role -----------------------------------------------------------------------

def _ticket(auth: Authenticator, uid: int) -> list[tuple[str, str]]:
    return [(peer_identity.PEER_TICKET_HEADER, auth.tickets.issue(uid))]


def test_without_auth_unix_callers_are_their_uid_and_only_root_operates_the_pools() -> None:
    auth = Authenticator(AuthConfig(local_users=(LocalUserEntry(1001, frozenset({Role.ADMIN})),)),
                         broker_uid=0)
    root = auth.identify(_ticket(auth, 0), {}, "unix:")
    assert (root.name, root.method, root.roles) == ("uid:0", "peercred", frozenset(Role))
    user = auth.identify(_ticket(auth, 1000), {}, "unix:")
    assert (user.name, user.roles) == ("uid:1000", {Role.CONVERT})
    assert auth.identify(_ticket(auth, 1001), {}, "unix:").roles == ALL  # granted admin
    anonymous = auth.identify([], {}, "ipv4:127.0.0.1:5000")
    assert (anonymous.name, anonymous.roles) == ("anonymous", {Role.CONVERT})
    assert Authenticator(AuthConfig(anonymous_admin=True)).identify(
        [], {}, "ipv4:127.0.0.1:1").roles == ALL


def test_a_unix_call_needs_a_fresh_ticket_and_a_ticket_never_counts_over_tcp() -> None:
    auth = Authenticator(AuthConfig())
    with pytest.raises(AirlockError, match="peer ticket"):
        auth.identify([], {}, "unix:")
    used = _ticket(auth, 1000)
    auth.identify(used, {}, "unix:")
    with pytest.raises(AirlockError, match="unknown, used or expired"):
        auth.identify(used, {}, "unix:")
    with pytest.raises(AirlockError, match="only on the broker's Unix socket"):
        auth.identify(_ticket(auth, 0), {}, "ipv4:127.0.0.1:5000")


def test_with_auth_a_token_wins_over_the_uid_and_unlisted_uids_hold_nothing() -> None:
    token = mint_token()
    auth = Authenticator(AuthConfig(tokens=(Token("ci", frozenset({Role.CONVERT}),
                                                  token_digest(token)),)), broker_uid=999)
    bearer = [("authorization", f"Bearer {token}")]
    assert auth.identify(bearer + _ticket(auth, 1000), {}, "unix:").name == "ci"
    assert auth.identify(_ticket(auth, 1000), {}, "unix:").roles == frozenset()
    own = auth.identify(_ticket(auth, 999), {}, "unix:")  # the broker's own user
    assert own.roles == frozenset(Role)
    with pytest.raises(AirlockError, match="no credentials"):
        auth.identify([], {}, "ipv4:127.0.0.1:5000")


def test_local_users_and_anonymous_admin_load_from_the_config(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(
        '[broker]\nunix_socket = "none"\n[auth]\nanonymous_admin = true\n'
        '[[auth.local_users]]\nuid = 1000\nroles = ["admin"]\n')
    config = BrokerConfig.load(tmp_path / "a.toml")
    assert config.unix_socket is None and config.auth.anonymous_admin
    assert config.auth.local_users == (LocalUserEntry(1000, frozenset({Role.ADMIN})),)
    assert "ANYONE MAY OPERATE THE POOLS" in config.auth.describe()
    for snippet, message in [
        ('[[auth.local_users]]\nuid = -1\nroles = ["admin"]\n', "uid must be a number"),
        ('[[auth.local_users]]\nuid = "root"\nroles = ["admin"]\n', "uid must be a number"),
        ('[auth]\nanonymous_admin = "yes"\n', "true or false"),
        ('[broker]\nunix_socket = "run/b.sock"\n', "absolute"),
        ('[broker]\nlisten = "unix:/run/b.sock"\n', "is \\[broker\\] unix_socket"),
        ('[broker]\nunix_socket = "/' + "d" * 120 + '/b.sock"\n', "too long"),
    ]:
        (tmp_path / "b.toml").write_text(snippet)
        with pytest.raises(ValueError, match=message):
            BrokerConfig.load(tmp_path / "b.toml")
    token = Token("ci", frozenset({Role.ADMIN}), token_digest(mint_token()))
    with pytest.raises(ValueError, match="anonymous_admin"):
        AuthConfig(tokens=(token,), anonymous_admin=True)


def test_the_broker_socket_defaults_to_run_airlock_for_root_and_the_environment_wins(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRLOCK_SOCKET")
    expected = Path("/run/airlock/broker.sock") if os.geteuid() == 0 else None
    assert BrokerConfig().unix_socket == expected
    monkeypatch.setenv("AIRLOCK_SOCKET", "/srv/a/b.sock")
    assert BrokerConfig().unix_socket == Path("/srv/a/b.sock")
    monkeypatch.setenv("AIRLOCK_SOCKET", "none")
    assert BrokerConfig().unix_socket is None


# -- which address a client dials, and which socket it trusts -----------------------------------

def test_the_default_address_prefers_the_server_variable_then_the_socket_then_tcp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRLOCK_SERVER", raising=False)
    monkeypatch.setenv("AIRLOCK_SOCKET", str(tmp_path / "run" / "broker.sock"))
    assert _channel.default_address() == "127.0.0.1:50051"  # no broker ever made the directory
    (tmp_path / "run").mkdir()
    assert _channel.default_address() == f"unix:{tmp_path}/run/broker.sock"  # even if stopped
    monkeypatch.setenv("AIRLOCK_SERVER", "broker.example:443")
    assert _channel.default_address() == "broker.example:443"
    monkeypatch.delenv("AIRLOCK_SERVER")
    monkeypatch.setenv("AIRLOCK_SOCKET", "none")
    assert _channel.default_address() == "127.0.0.1:50051"


def test_plaintext_localhost_is_dialled_as_ipv4_loopback() -> None:
    for address in ("localhost:50051", "dns:localhost:50051", "dns:///localhost:50051"):
        assert _channel._ipv4_for_localhost(address) == "127.0.0.1:50051"
    assert _channel._ipv4_for_localhost("[::1]:50051") == "[::1]:50051"
    with pytest.raises(ValueError, match="abstract"):
        _channel.open_channel("unix-abstract:airlock", _channel.ChannelSettings(), [])


def _socket_at(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    return sock


def test_the_client_refuses_a_socket_anyone_else_could_have_made(tmp_path: Path) -> None:
    owners = frozenset({0, os.geteuid()})
    good = tmp_path / "run"
    good.mkdir(mode=0o755)
    with _socket_at(good / "b.sock"):
        _channel.check_socket(good / "b.sock", owners)
        os.chown(good / "b.sock", NOBODY, NOBODY)
        with pytest.raises(_channel.UntrustedSocket, match="it is owned by uid 65534"):
            _channel.check_socket(good / "b.sock", owners)
        assert _channel.check_socket(good / "b.sock", owners | {NOBODY}) is None
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with _socket_at(theirs / "b.sock"), \
            pytest.raises(_channel.UntrustedSocket, match="theirs is owned by uid 65534"):
        _channel.check_socket(theirs / "b.sock", owners)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # sticky: fine above the socket's directory, never as it
    (shared / "run").mkdir(mode=0o755)
    with _socket_at(shared / "b.sock"), _socket_at(shared / "run" / "b.sock"):
        with pytest.raises(_channel.UntrustedSocket, match="writable by others"):
            _channel.check_socket(shared / "b.sock", owners)
        _channel.check_socket(shared / "run" / "b.sock", owners)
    (tmp_path / "link").symlink_to(good)
    with pytest.raises(_channel.UntrustedSocket, match="symbolic link"):
        _channel.check_socket(tmp_path / "link" / "b.sock", owners)
    (good / "file").write_text("")
    with pytest.raises(_channel.UntrustedSocket, match="not a socket"):
        _channel.check_socket(good / "file", owners)


def test_the_broker_uid_variable_must_be_a_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRLOCK_BROKER_UID", "999")
    assert 999 in _channel.trusted_owners()
    monkeypatch.setenv("AIRLOCK_BROKER_UID", "airlock")
    with pytest.raises(ValueError, match="AIRLOCK_BROKER_UID"):
        _channel.trusted_owners()


# -- where the broker listens -------------------------------------------------------------------

def _family_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
            return False
    return True


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_a_loopback_listener_holds_both_families(host: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = add_tcp_listeners(server, f"{host}:0", None)  # type: ignore[arg-type]
    assert not _family_free("127.0.0.1", port) and not _family_free("::1", port)
    server.stop(None)


def test_a_squatted_other_family_refuses_start_and_names_the_port() -> None:
    with socket.socket(socket.AF_INET6) as squatter:
        squatter.bind(("::1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        if not _family_free("127.0.0.1", port):
            pytest.fail("the kernel gave the squatter a port busy on IPv4: rerun")
        with pytest.raises(OSError, match=rf"\[::1\]:{port} is held by another process"):
            add_tcp_listeners(grpc.server(futures.ThreadPoolExecutor(1)),  # type: ignore[arg-type]
                              f"127.0.0.1:{port}", None)


def test_the_socket_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(OSError, match="owned by uid 65534"):
        prepare_socket_dir(theirs)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(OSError, match="writable by group or others"):
        prepare_socket_dir(open_dir)
    prepare_socket_dir(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").stat().st_mode & 0o777 == 0o755


def _broker_config(tmp_path: Path, unix_socket: Path | None = None) -> BrokerConfig:
    return BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "spool",
                        pools=PoolSettings(min_warm=0), selftest_on_start=False,
                        unix_socket=unix_socket or tmp_path / "run" / "broker.sock")


def test_a_live_socket_is_not_taken_over_and_a_stale_one_is(tmp_path: Path) -> None:
    config = _broker_config(tmp_path)
    backend = FakeSandbox(config.spool_root, write_safetensors)
    second = _broker_config(tmp_path / "second", unix_socket=config.unix_socket)
    with running_broker(config, backend), \
            pytest.raises(OSError, match="another process is serving"):
        asyncio.run(create_server(second, FakeSandbox(second.spool_root, write_safetensors)))
    assert config.unix_socket is not None
    with _socket_at(config.unix_socket):  # bound, nobody listening: a crashed broker's
        pass
    with running_broker(config, backend), Client(f"unix:{config.unix_socket}") as client:
        assert client.pool_status()


def test_calls_on_the_socket_without_a_ticket_are_refused(tmp_path: Path) -> None:
    config = _broker_config(tmp_path)
    with running_broker(config, FakeSandbox(config.spool_root, write_safetensors)), \
            grpc.insecure_channel(f"unix:{config.unix_socket}") as channel:
        with pytest.raises(grpc.RpcError) as raw:
            pb_grpc.ConversionServiceStub(channel).OpenLocalTransfer(
                pb.OpenLocalTransferRequest(), timeout=10)
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "peer ticket" in (raw.value.details() or "")


def test_a_stopped_brokers_socket_is_unavailable_not_a_fallback(tmp_path: Path) -> None:
    config = _broker_config(tmp_path)
    with running_broker(config, FakeSandbox(config.spool_root, write_safetensors)):
        pass
    assert config.unix_socket is not None and not config.unix_socket.exists()
    with Client(f"unix:{config.unix_socket}", retry_attempts=1) as client, \
            pytest.raises(ServiceUnavailable, match="unix:"):
        client.pool_status()


def test_a_flood_from_many_uids_does_not_push_out_a_ticket_waiting_to_be_redeemed() -> None:
    """At the total bound the oldest of all was dropped: 17 uids of 256 tickets each, issued
    between a genuine client's ticket and its redeem, pushed it out (UNAUTHENTICATED)."""
    tickets = peer_identity.PeerTickets(ttl_seconds=30, per_uid=256, max_total=4096)
    genuine = tickets.issue(1000)
    for uid in range(2000, 2017):
        for _ in range(256):
            tickets.issue(uid)
    for uid in range(3000, 3100):  # and uids that ask once each
        tickets.issue(uid)
    assert len(tickets) == 4096
    assert tickets.redeem(genuine) == 1000


def test_tickets_are_bounded_in_all_and_expire_whatever_uid_they_were_for() -> None:
    """Processes in a user namespace connect as each of a user's 65,536 subordinate uids:
    256 tickets for each would never expire (the old table dropped a uid's expired tickets
    only when that uid asked again) and held GiBs."""
    now = [0.0]
    tickets = peer_identity.PeerTickets(ttl_seconds=30, per_uid=4, max_total=100,
                                        clock=lambda: now[0])
    for uid in range(2000, 2050):  # 50 uids x 4: twice the total bound
        for _ in range(4):
            tickets.issue(uid)
    assert len(tickets) == 100
    genuine = tickets.issue(1000)  # the newest survives the flood behind it
    assert tickets.redeem(genuine) == 1000
    now[0] = 31  # every ticket has expired; one more for another uid
    tickets.issue(4242)
    assert len(tickets) == 1


def test_the_fast_path_socket_is_held_to_the_brokers_socket_rule(tmp_path: Path) -> None:
    """The same-host fast path hands the broker the input and a writable output descriptor
    over the socket the broker names. Only the socket's own directory was checked: a
    directory of root's inside one anyone could write (and rename it in) passed."""
    from airlock_client._local_transfer import LocalTransferUnavailable, check_socket

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone may swap what is in it
    (shared / "run").mkdir(mode=0o755)
    with _socket_at(shared / "run" / "t.sock"), \
            pytest.raises(LocalTransferUnavailable, match="writable by others"):
        check_socket(shared / "run" / "t.sock")
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    with _socket_at(mine / "t.sock"):
        check_socket(mine / "t.sock")
        os.chown(mine / "t.sock", NOBODY, NOBODY)
        with pytest.raises(LocalTransferUnavailable, match="owned by uid 65534"):
            check_socket(mine / "t.sock")

"""The broker's state root (state_dirs.py): each check decided once, each refusal named.

Threat (issue 11 §1, §7): another local user prepares a state directory, file or key before
the broker starts. "Another user" is uid 65534 (nobody); the tests run as root.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from airlock_broker.api.server import create_server
from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.audit import AuditLog
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.sandboxes.workspace import reap_stale
from airlock_broker.security import state_dirs
from airlock_broker.security.keys import SigningKeyError, create_key, load_key
from airlock_broker.security.state_dirs import Problem, StateDirError
from tests.unit.fakes import FakeSandbox

NOBODY = 65534


def _problem(call: object, *args: object) -> Problem:
    with pytest.raises(StateDirError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.problem


def test_a_new_root_is_made_0700_with_its_spool(tmp_path: Path) -> None:
    root = tmp_path / "a" / "state"
    state_dirs.prepare_root(root)
    for path in (root, *(root / sub for sub in state_dirs.SPOOL_DIRS)):
        st = os.lstat(path)
        assert (st.st_mode & 0o777, st.st_uid) == (0o700, os.geteuid())
    state_dirs.prepare_root(root)  # the broker's own: accepted again


@pytest.mark.parametrize("where", ["root", *state_dirs.SPOOL_DIRS])
def test_a_directory_someone_else_made_is_refused_and_named(tmp_path: Path, where: str) -> None:
    root = tmp_path / "state"
    state_dirs.prepare_root(root)
    target = root if where == "root" else root / where
    os.chown(target, NOBODY, NOBODY)
    with pytest.raises(StateDirError) as info:
        state_dirs.prepare_root(root)
    assert info.value.problem is Problem.WRONG_OWNER and info.value.path == target
    assert "uid 65534" in str(info.value) and "chown" in str(info.value)


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o770, 0o777])
def test_group_or_other_bits_are_refused(tmp_path: Path, mode: int) -> None:
    root = tmp_path / "state"
    state_dirs.prepare_root(root)
    os.chmod(root / "slots", mode)
    assert _problem(state_dirs.prepare_root, root) is Problem.OPEN_MODE
    assert os.lstat(root / "slots").st_mode & 0o777 == mode, "never chmod-ed into shape"


def test_links_and_files_in_place_of_directories_are_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    root = tmp_path / "state"
    root.symlink_to(elsewhere)
    assert _problem(state_dirs.prepare_root, root) is Problem.SYMLINK
    root.unlink()
    root.mkdir(mode=0o700)
    (root / "results").write_bytes(b"")
    assert _problem(state_dirs.prepare_root, root) is Problem.NOT_DIRECTORY
    (root / "results").unlink()
    (root / "results").symlink_to(elsewhere)
    assert _problem(state_dirs.prepare_root, root) is Problem.SYMLINK


def test_an_ancestor_another_user_could_rename_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    assert _problem(state_dirs.prepare_root, theirs / "state") is Problem.UNSAFE_ANCESTOR
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    assert _problem(state_dirs.prepare_root, open_dir / "state") is Problem.UNSAFE_ANCESTOR
    sticky = tmp_path / "sticky"  # like /tmp: nobody may rename what is not theirs
    sticky.mkdir()
    sticky.chmod(0o1777)
    state_dirs.prepare_root(sticky / "state")


def test_state_files_are_opened_without_following_links_and_checked(tmp_path: Path) -> None:
    root = tmp_path / "state"
    state_dirs.prepare_root(root)
    canary = tmp_path / "canary"
    canary.write_bytes(b"root's\n")
    mtime = canary.stat().st_mtime_ns
    (root / "audit.jsonl").symlink_to(canary)
    assert _problem(AuditLog, root / "audit.jsonl") is Problem.SYMLINK
    (root / "audit.jsonl").unlink()
    os.link(canary, root / "audit.jsonl")
    assert _problem(AuditLog, root / "audit.jsonl") is Problem.HARD_LINKED
    (root / "audit.jsonl").unlink()
    (root / "audit.jsonl").touch(mode=0o600)
    os.chown(root / "audit.jsonl", NOBODY, NOBODY)
    assert _problem(AuditLog, root / "audit.jsonl") is Problem.WRONG_OWNER
    os.chown(root / "audit.jsonl", 0, 0)
    os.chmod(root / "audit.jsonl", 0o644)
    assert _problem(AuditLog, root / "audit.jsonl") is Problem.OPEN_MODE
    os.chmod(root / "audit.jsonl", 0o600)
    AuditLog(root / "audit.jsonl").close()
    assert canary.read_bytes() == b"root's\n" and canary.stat().st_mtime_ns == mtime


def test_a_signing_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    create_key(path)
    os.chown(path, NOBODY, NOBODY)  # 0600 still: only its owner, the other user, may read it
    with pytest.raises(SigningKeyError, match=r"KEY_WRONG_OWNER.*uid 65534"):
        load_key(path)
    os.chown(path, os.geteuid(), os.getegid())
    load_key(path)


def test_reap_follows_no_link_in_the_spool(tmp_path: Path) -> None:
    root = tmp_path / "state"
    state_dirs.prepare_root(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    (root / "results" / "r1").symlink_to(outside / "keep")
    (root / "uploads" / "u1").symlink_to(outside)
    (root / "slots" / "s1").symlink_to(outside)
    (root / "slots" / "s2").mkdir()
    (root / "slots" / "s2" / "out").symlink_to(outside)
    (root / "slots" / "s2" / "in").symlink_to(outside)
    assert reap_stale(root) == 4
    assert [p for sub in state_dirs.SPOOL_DIRS for p in (root / sub).iterdir()] == []
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]
    assert (outside / "keep").read_bytes() == b"keep"


def test_defaults_and_the_old_spool_setting(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.delenv("AIRLOCK_STATE_DIR", raising=False)
    monkeypatch.delenv("AIRLOCK_SPOOL_DIR", raising=False)
    monkeypatch.delenv("AIRLOCK_PROVENANCE_KEY", raising=False)
    monkeypatch.delenv("AIRLOCK_AUDIT_LOG", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    config = BrokerConfig()
    assert config.state_root == Path("/var/lib/airlock")
    assert config.audit_path == Path("/var/lib/airlock/audit.jsonl")
    assert config.provenance_key_path == Path("/var/lib/airlock/provenance-signing-key.pem")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert BrokerConfig().state_root == tmp_path / "xdg" / "airlock"
    monkeypatch.setenv("AIRLOCK_STATE_DIR", str(tmp_path / "env"))
    assert BrokerConfig().state_root == tmp_path / "env"
    monkeypatch.setenv("AIRLOCK_SPOOL_DIR", "/tmp/airlock-spool")
    with pytest.raises(ValueError, match="AIRLOCK_SPOOL_DIR is no longer read"):
        BrokerConfig()


def test_an_audit_log_elsewhere_has_its_directory_checked(tmp_path: Path) -> None:
    theirs = tmp_path / "log"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    root = tmp_path / "state"
    with pytest.raises(StateDirError) as info:
        state_dirs.prepare(root, (theirs / "audit.jsonl", root / "key.pem"))
    assert info.value.problem is Problem.WRONG_OWNER and info.value.path == theirs
    os.chown(theirs, 0, 0)
    state_dirs.prepare(root, (theirs / "audit.jsonl", root / "key.pem"))


class _EngineGoneAtClose(FakeSandbox):
    async def close(self) -> None:
        raise RuntimeError("the engine went away during shutdown")


def test_a_stopping_broker_removes_slots_left_behind_even_when_closing_fails(
        tmp_path: Path) -> None:
    """Item: output tmpfs mounts outlived their broker (pytest's EBUSY on slots/<id>/out)."""
    config = BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "state",
                          pools=PoolSettings(min_warm=0), selftest_on_start=False)

    async def scenario() -> None:
        broker = await create_server(config, _EngineGoneAtClose(config.spool_root, lambda *_: 0))
        left = config.spool_root / "slots" / "cut-short"
        (left / "in").mkdir(parents=True)
        (left / "in" / "artifact").write_bytes(b"x")
        (left / "out").mkdir()
        with pytest.raises(RuntimeError, match="engine went away"):
            await broker.stop(0.1)
        assert list((config.spool_root / "slots").iterdir()) == []
        again = await create_server(config, FakeSandbox(config.spool_root, lambda *_: 0))
        await again.stop(0.1)  # the lock was released

    asyncio.run(scenario())

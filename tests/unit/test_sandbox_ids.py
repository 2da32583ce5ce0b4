"""Threat: a host account with the sandbox's uid or gid (there is no user-namespace remapping,
so they are the same ids) owns every sandbox and is where an escape lands; a same-uid host
process may attach to a sandbox when ``ptrace_scope`` allows it. The broker refuses to start
on such a host (unless configured to warn, visibly) and its self-test reports both."""

from __future__ import annotations

import asyncio
import logging
import pwd
from dataclasses import replace
from pathlib import Path

import pytest

from airlock_broker.api.server import create_server
from airlock_broker.config import BrokerConfig
from airlock_broker.ops.selftest import SelfTestReport, host_checks, run_selftest
from airlock_broker.sandboxes import sandbox_ids
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.sandboxes.sandbox import Outcome, SandboxUnavailable, Slot
from airlock_sandbox.contract import CONTAINER_GID, CONTAINER_UID, JobSpec
from airlock_sandbox.policy import SandboxPolicy
from tests.unit.fakes import FakeSandbox

POLICY = SandboxPolicy()
WARN = replace(POLICY, host_account_check="warn")


def nobody(_: int) -> str | None:
    return None


def owned_by(name: str, wanted: int) -> sandbox_ids.Lookup:
    return lambda i: name if i == wanted else None


def test_ids_no_host_account_has_are_fine() -> None:
    assert sandbox_ids.shared_ids(POLICY, nobody, nobody) == []
    sandbox_ids.check_at_start(POLICY, nobody, nobody)  # no exception


@pytest.mark.parametrize(("users", "groups", "expected"), [
    (owned_by("svc-build", CONTAINER_UID), nobody,
     f"uid {CONTAINER_UID}, which sandboxes run as, is the host account 'svc-build'"),
    (nobody, owned_by("deploy", CONTAINER_GID),
     f"gid {CONTAINER_GID}, which sandboxes run as, is the host group 'deploy'"),
])
def test_a_host_account_or_group_on_the_sandbox_ids_is_refused(users: sandbox_ids.Lookup,
                                                                groups: sandbox_ids.Lookup,
                                                                expected: str) -> None:
    with pytest.raises(SandboxUnavailable) as info:
        sandbox_ids.check_at_start(POLICY, users, groups)
    assert expected in str(info.value)
    assert '[sandbox] user = "UID:GID"' in str(info.value)  # and what to do about it


@pytest.mark.parametrize("user", ["sandbox:sandbox", "10001", "10001:",
                                  "\uff11\uff10\uff10\uff10\uff11:10001"])  # full-width
def test_ids_the_host_cannot_check_are_refused(user: str) -> None:
    with pytest.raises(SandboxUnavailable, match="not a number the host can check"):
        sandbox_ids.check_at_start(replace(POLICY, user=user), nobody, nobody)


def test_warn_starts_anyway_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="airlock_broker.sandboxes.sandbox_ids"):
        sandbox_ids.check_at_start(WARN, owned_by("svc-build", CONTAINER_UID), nobody)
    assert "svc-build" in caplog.text and "starting anyway" in caplog.text
    assert "host-account-check=warn" in WARN.weakened and POLICY.weakened == ()


def test_the_posture_is_validated() -> None:
    with pytest.raises(ValueError, match="host_account_check"):
        SandboxPolicy(host_account_check="ignore")


def test_the_broker_does_not_start_on_a_host_with_an_account_on_the_sandbox_uid(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = pwd.getpwuid

    def getpwuid(uid: int) -> pwd.struct_passwd:
        if uid == CONTAINER_UID:
            return pwd.struct_passwd(("svc-build", "x", uid, uid, "", "/home/svc-build",
                                      "/bin/bash"))
        return real(uid)

    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    config = BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "spool",
                          pools=PoolSettings(min_warm=0), selftest_on_start=False,
                          provenance_key=tmp_path / "key.pem")

    async def start() -> None:
        broker = await create_server(config, FakeSandbox(config.spool_root, lambda *_: 0))
        await broker.stop(0.1)  # it should never get here

    with pytest.raises(SandboxUnavailable, match="host account 'svc-build'"):
        asyncio.run(start())
    assert not (tmp_path / "key.pem").exists()  # refused before anything was made


@pytest.mark.parametrize("scope", ["1", "2", "3"])
def test_a_ptrace_scope_that_stops_same_uid_attach_passes(scope: str) -> None:
    _, ptrace = host_checks(POLICY, nobody, nobody, lambda: scope)
    assert ptrace.passed and ptrace.source == "host"
    assert f"ptrace_scope = {scope}" in ptrace.detail


@pytest.mark.parametrize("scope", ["0", None])
def test_classic_ptrace_is_reported_and_waived_only_while_no_account_shares_the_uid(
        scope: str | None) -> None:
    ids, ptrace = host_checks(POLICY, nobody, nobody, lambda: scope)
    assert ids.passed
    assert not ptrace.passed and "no host account has the sandbox uid" in ptrace.waived
    assert ("absent" if scope is None else "= 0") in ptrace.detail
    assert SelfTestReport(checks=(ids, ptrace), runtime="runc", image_id="x").passed

    ids, ptrace = host_checks(WARN, owned_by("svc-build", CONTAINER_UID), nobody, lambda: scope)
    assert not ids.passed and "warn" in ids.waived  # the configuration chose to accept it
    assert not ptrace.passed and not ptrace.waived  # but then the account can attach
    report = SelfTestReport(checks=(ids, ptrace), runtime="runc", image_id="x")
    assert not report.passed and report.failures() == [f"host_ptrace_scope: {ptrace.detail}"]


def test_an_account_on_the_sandbox_uid_fails_the_self_test_under_refuse() -> None:
    ids, _ = host_checks(POLICY, owned_by("svc-build", CONTAINER_UID), nobody, lambda: "1")
    assert not ids.passed and not ids.waived and "svc-build" in ids.detail


class _NoProbe(FakeSandbox):
    """The probe does not run (the host checks do not need it)."""

    async def run(self, slot: Slot, spec: JobSpec, deadline_seconds: float) -> Outcome:
        return Outcome(exit_code=1, oom_killed=False, timed_out=False, duration_seconds=0.0,
                       image_id="sha256:fake", runtime="fake")


def test_the_self_test_report_holds_the_host_checks(tmp_path: Path) -> None:
    backend = _NoProbe(tmp_path / "spool", lambda *_: 1)
    report = asyncio.run(run_selftest(backend, POLICY))
    host = {c.name: c for c in report.checks if c.source == "host"}
    assert set(host) == {"sandbox_ids_unshared", "host_ptrace_scope"}
    assert "kernel.yama.ptrace_scope = " in host["host_ptrace_scope"].detail

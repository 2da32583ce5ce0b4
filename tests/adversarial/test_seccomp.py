"""Threat: artifact code inside the sandbox reaches for the kernel interfaces behind container
escapes (security.md §5 B7): new namespaces, mounts, tracing, eBPF, io_uring, the kernel
keyring, userfaultfd. Airlock's seccomp profile (deny by default) must refuse every one with
EPERM, under runc and under gVisor (runsc applies it with --oci-seccomp).

Oracles: the refusals as the payload itself observed them (reported through a validated
output, the only way out); no container left; the broker still serves a benign job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.adversarial.syscall_payload import SYSCALLS, syscall_probe_pickle
from tests.adversarial.test_code_execution_contained import assert_still_serves
from tests.conftest import BrokerProcess, run_cli

pytestmark = pytest.mark.adversarial


def test_escape_syscalls_are_refused_by_seccomp_inside_the_sandbox(broker: BrokerProcess,
                                                                   tmp_path: Path) -> None:
    artifact = syscall_probe_pickle(tmp_path / "probe.pkl")
    out = tmp_path / "report.safetensors"

    done = run_cli("convert", str(artifact), "-o", str(out), "--to", "safetensors", "--json",
                   server=broker.address)

    assert done.returncode == 0, done.stdout + done.stderr  # the payload's own "output"
    with safe_open(str(out), framework="numpy") as report:
        seen = dict(name.split(".", 1) for name in report.keys())  # noqa: SIM118
    assert set(seen) == set(SYSCALLS), seen
    assert seen == dict.fromkeys(SYSCALLS, "EPERM"), f"not refused by seccomp: {seen}"
    assert_still_serves(broker, tmp_path)


def test_selftest_reports_the_seccomp_profile_and_its_refusals(broker: BrokerProcess) -> None:
    done = run_cli("selftest", "--json", server=broker.unix_address)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    for name in ("seccomp_profile", "seccomp_mode", *(f"seccomp_{s}" for s in SYSCALLS),
                 "seccomp_memfd_create", "seccomp_clone3"):
        assert checks[name]["passed"], checks.get(name)

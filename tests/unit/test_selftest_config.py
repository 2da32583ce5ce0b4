"""The broker's reading of a sandbox's configuration catches every weakened setting."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from airlock_broker.selftest import WAIVERS, Check, SelfTestReport, _waive, config_checks
from airlock_sandbox.policy import SandboxPolicy

POLICY = SandboxPolicy()
GOOD: dict[str, Any] = {
    "HostConfig": {
        "NetworkMode": "none", "ReadonlyRootfs": True, "CapDrop": ["ALL"], "CapAdd": None,
        "Privileged": False, "SecurityOpt": ["no-new-privileges"],
        "PidsLimit": POLICY.pids_limit, "Memory": POLICY.memory_bytes,
        "MemorySwap": POLICY.memory_bytes, "NanoCpus": POLICY.nano_cpus,
        "LogConfig": {"Type": "none"}, "Runtime": "runc",
    },
    "Config": {"User": "10001:10001", "Env": ["PATH=/usr/bin", "HOME=/tmp"]},
    "Mounts": [{"Type": "bind", "Source": "/s/in", "Destination": "/airlock/in"},
               {"Type": "bind", "Source": "/s/out", "Destination": "/airlock/out"}],
}


def test_hardened_configuration_passes_every_check() -> None:
    checks = config_checks(GOOD, POLICY)
    assert checks and all(c.passed for c in checks), [c for c in checks if not c.passed]


@pytest.mark.parametrize(("path", "value", "failing"), [
    (("HostConfig", "NetworkMode"), "bridge", "network_none"),
    (("HostConfig", "ReadonlyRootfs"), False, "read_only_rootfs"),
    (("HostConfig", "CapAdd"), ["SYS_ADMIN"], "cap_drop_all"),
    (("HostConfig", "Privileged"), True, "not_privileged"),
    (("HostConfig", "SecurityOpt"), ["seccomp=unconfined"], "seccomp_not_disabled"),
    (("HostConfig", "PidsLimit"), 0, "pids_limit"),
    (("HostConfig", "MemorySwap"), -1, "no_swap"),
    (("HostConfig", "LogConfig"), {"Type": "json-file"}, "logging_off"),
    (("Config", "User"), "0:0", "non_root_user"),
    (("Config", "Env"), ["HTTPS_PROXY=http://p:3128"], "no_proxy_env"),
    (("Mounts",), [{"Type": "bind", "Source": "/var/run/docker.sock", "Destination": "/s"},
                   {"Type": "bind", "Source": "/s/out", "Destination": "/airlock/out"}],
     "only_job_mounts"),
])
def test_each_weakened_setting_fails_its_check(path: tuple[str, ...], value: Any,
                                               failing: str) -> None:
    info = copy.deepcopy(GOOD)
    target = info
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    failed = {c.name for c in config_checks(info, POLICY) if not c.passed}
    assert failing in failed


def test_waivers_apply_only_to_their_runtime() -> None:
    bad = Check("output_noexec", False, "exec exited 0", "sandbox")
    assert _waive(bad, "runsc").waived
    assert not _waive(bad, "runc").waived
    assert not SelfTestReport((_waive(bad, "runc"),), "runc", "").passed
    assert SelfTestReport((_waive(bad, "runsc"),), "runsc", "").passed
    assert all(runtime == "runsc" for runtime, _ in WAIVERS)

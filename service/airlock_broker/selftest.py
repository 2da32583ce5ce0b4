"""The isolation self-test: prove the sandbox is confined before serving anything.

A probe container, created exactly like a job's, reports what it can observe from inside
(user, capabilities, network, read-only paths, noexec, limits, environment); the broker adds
what it reads from the container's configuration. Until every check passes, gRPC health says
NOT_SERVING and jobs are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from airlock_broker.sandbox import SandboxBackend, SandboxUnavailable
from airlock_broker.validation.files import open_regular_file, read_upto
from airlock_sandbox.contract import JobSpec
from airlock_sandbox.formats import PROFILE_LIGHT
from airlock_sandbox.policy import SandboxPolicy

SELFTEST_FILE = "selftest.json"
_MAX_BYTES = 64 * 1024

#: Probe findings accepted for a runtime, with the reason. Data, so that every accepted gap is
#: one visible line: (runtime, check name) -> why it does not weaken the boundary.
WAIVERS: dict[tuple[str, str], str] = {
    ("runsc", "output_noexec"):
        "gVisor (Debian 0.0~20221219) ignores the host's noexec on bind mounts; a binary run "
        "from there still runs inside gVisor's user-space kernel, like the artifact's own code",
    ("runsc", "no_new_privileges"):
        "gVisor does not expose NoNewPrivs in /proc/self/status; the config check covers it",
}


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    source: str  # "sandbox" (observed inside) or "config" (read by the broker)
    waived: str = ""  # why a failed check is accepted on this runtime (see WAIVERS)


@dataclass(frozen=True)
class SelfTestReport:
    checks: tuple[Check, ...]
    runtime: str
    image_id: str

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed or c.waived for c in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not (c.passed or c.waived)]


def config_checks(info: dict[str, Any], policy: SandboxPolicy) -> list[Check]:
    """What ``docker inspect`` says about a sandbox container, against the policy. Pure."""
    host = info.get("HostConfig", {})
    config = info.get("Config", {})
    binds = [m for m in info.get("Mounts", []) if m.get("Type") == "bind"]
    env = [e.split("=", 1)[0] for e in config.get("Env") or []]
    checks = [
        ("network_none", host.get("NetworkMode") == "none", host.get("NetworkMode")),
        ("read_only_rootfs", host.get("ReadonlyRootfs") is True, host.get("ReadonlyRootfs")),
        ("cap_drop_all", host.get("CapDrop") == ["ALL"] and not host.get("CapAdd"),
         f"drop={host.get('CapDrop')} add={host.get('CapAdd')}"),
        ("not_privileged", host.get("Privileged") is False, host.get("Privileged")),
        ("no_new_privileges", "no-new-privileges" in (host.get("SecurityOpt") or []),
         host.get("SecurityOpt")),
        ("seccomp_not_disabled",
         not any("unconfined" in o for o in host.get("SecurityOpt") or []),
         host.get("SecurityOpt")),
        ("pids_limit", (host.get("PidsLimit") or 0) == policy.pids_limit, host.get("PidsLimit")),
        ("memory_limit", host.get("Memory") == policy.memory_bytes, host.get("Memory")),
        ("no_swap", host.get("MemorySwap") == policy.memory_bytes, host.get("MemorySwap")),
        ("cpu_limit", host.get("NanoCpus") == policy.nano_cpus, host.get("NanoCpus")),
        ("logging_off", host.get("LogConfig", {}).get("Type") == "none", host.get("LogConfig")),
        ("runtime", host.get("Runtime") == policy.runtime, host.get("Runtime")),
        ("non_root_user", str(config.get("User", "")).split(":")[0] not in {"", "0", "root"},
         config.get("User")),
        ("only_job_mounts", len(binds) == 2 and all(
            "docker.sock" not in str(m.get("Source")) for m in binds),
         [m.get("Destination") for m in binds]),
        ("no_proxy_env", not any("proxy" in k.lower() for k in env), env),
    ]
    return [Check(name, bool(ok), str(detail)[:200], "config") for name, ok, detail in checks]


async def run_selftest(backend: SandboxBackend, policy: SandboxPolicy,
                       deadline_seconds: float = 120.0) -> SelfTestReport:
    """Run the probe in a fresh sandbox; infrastructure failures raise ``SandboxUnavailable``."""
    slot = await backend.prepare(PROFILE_LIGHT, selftest=True)
    try:
        checks = config_checks(await backend.inspect(slot), policy)
        outcome = await backend.run(slot, JobSpec(job_id="selftest"), deadline_seconds)
        inside = _read_probe(slot.workspace.out_dir / SELFTEST_FILE)
        if outcome.exit_code != 0 or inside is None:
            checks.append(Check("probe_ran", False, f"probe exit {outcome.exit_code}, "
                                f"timed out {outcome.timed_out}", "sandbox"))
        else:
            checks.extend(_waive(c, policy.runtime_family) for c in inside)
        return SelfTestReport(checks=tuple(checks), runtime=outcome.runtime,
                              image_id=outcome.image_id)
    finally:
        await backend.destroy(slot)


def _waive(check: Check, runtime: str) -> Check:
    reason = WAIVERS.get((runtime, check.name), "")
    if check.passed or not reason:
        return check
    return Check(check.name, False, check.detail, check.source, waived=reason)


def _read_probe(path: Any) -> list[Check] | None:
    try:
        handle, st = open_regular_file(path)
    except Exception:
        return None
    with handle:
        if st.st_size > _MAX_BYTES:
            return None
        try:
            doc = json.loads(read_upto(handle, st.st_size))
            return [Check(str(c["name"])[:64], c["passed"] is True, str(c["detail"])[:200],
                          "sandbox") for c in doc["checks"]]
        except (ValueError, KeyError, TypeError):
            return None


__all__ = ["Check", "SandboxUnavailable", "SelfTestReport", "config_checks", "run_selftest"]

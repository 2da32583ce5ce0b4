"""The isolation self-test: prove the sandbox is confined before serving anything.

A probe sandbox, created exactly like a job's, reports what it can observe from inside
(user, capabilities, network, read-only paths, noexec, limits, environment); the broker adds
what the backend reads back of the confinement it applied (``describe``). Until every check
passes, gRPC health says NOT_SERVING and jobs are refused.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from airlock_broker.sandboxes import sandbox_ids, version_gates
from airlock_broker.sandboxes.confinement import AppliedMount, Confinement
from airlock_broker.sandboxes.sandbox import SandboxBackend, SandboxUnavailable
from airlock_broker.sandboxes.version_gates import Observation
from airlock_broker.validation.files import open_regular_file, read_upto
from airlock_sandbox.contract import IN_DIR, OUT_DIR, WORKER_ENTRYPOINT, JobSpec
from airlock_sandbox.formats import PROFILE_LIGHT
from airlock_sandbox.policy import SandboxPolicy, root_in
from airlock_sandbox.seccomp import AIRLOCK as SECCOMP_AIRLOCK
from airlock_sandbox.seccomp import profile_json

#: The host side of the version gates (engine runtimes, the broker's own Python and onnx).
HostVersions = Callable[[], Awaitable[Mapping[str, Observation]]]

SELFTEST_FILE = "selftest.json"
_MAX_BYTES = 64 * 1024

#: Probe findings accepted for a runtime, with the reason. Data, so that every accepted gap is
#: one visible line: (runtime, check name) -> why it does not weaken the boundary.
WAIVERS: dict[tuple[str, str], str] = {
    ("runsc", "output_noexec"):
        "gVisor (Debian 0.0~20221219) does not see the host's noexec on the output bind: a "
        "script there runs (its interpreter is on the read-only root), inside gVisor's kernel "
        "like the artifact's own code; an ELF binary or library there dies of SIGSEGV at its "
        "first executable page, which the host refuses to map",
    ("runsc", "no_new_privileges"):
        "gVisor does not expose NoNewPrivs in /proc/self/status; the config check covers it",
}


#: Host findings accepted, with the reason (see sandbox_ids for why each one matters).
HOST_ACCOUNT_WAIVER = ('the configuration chose host_account_check = "warn" (a visible '
                       'weakening)')
PTRACE_SCOPE_WAIVER = ("no host account has the sandbox uid and each sandbox has its own pid "
                       "namespace: only a process root started as that uid could attach "
                       "(sysctl kernel.yama.ptrace_scope=1 closes that too)")


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    source: str  # "sandbox" (observed inside), "config" (read by the broker), "host"
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


def config_checks(applied: Confinement, policy: SandboxPolicy) -> list[Check]:
    """The confinement the engine applied to a sandbox (``describe``), against the policy."""
    options = applied.security_options
    checks = [
        ("network_none", applied.network == "none", applied.network),
        ("read_only_rootfs", applied.read_only_root is True, applied.read_only_root),
        ("cap_drop_all", applied.cap_drop == ["ALL"] and not applied.cap_add,
         f"drop={applied.cap_drop} add={applied.cap_add}"),
        ("not_privileged", applied.privileged is False, applied.privileged),
        ("no_new_privileges", "no-new-privileges" in options, options),
        ("seccomp_not_disabled", not any("unconfined" in o for o in options),
         [o[:40] for o in options]),
        _seccomp_profile_check(options, policy),
        ("pids_limit", (applied.pids_limit or 0) == policy.pids_limit, applied.pids_limit),
        ("memory_limit", applied.memory_bytes == policy.memory_bytes, applied.memory_bytes),
        ("no_swap", applied.memory_swap_bytes == policy.memory_bytes,
         applied.memory_swap_bytes),
        ("cpu_limit", applied.nano_cpus == policy.nano_cpus, applied.nano_cpus),
        ("logging_off", applied.logging == "none", applied.logging),
        ("runtime", applied.runtime == policy.runtime, applied.runtime),
        ("non_root_user", not root_in(applied.user),
         "; ".join(root_in(applied.user)) or applied.user),
        # The broker sends the worker's arguments only: what runs is the image's entrypoint,
        # and an image that names another program runs it in every sandbox.
        ("worker_entrypoint", applied.entrypoint == list(WORKER_ENTRYPOINT),
         applied.entrypoint or "none"),
        ("only_job_mounts", _only_job_mounts(applied.mounts),
         [f"{m.kind}:{m.destination}{'' if m.writable else ':ro'}" for m in applied.mounts]),
        ("no_proxy_env", not any("proxy" in k.lower() for k in applied.env_names),
         applied.env_names),
        # An image's HEALTHCHECK would have the engine exec into the sandbox (DESIGN §1.2).
        ("no_healthcheck", applied.healthcheck[:1] in ([], ["NONE"]),
         applied.healthcheck or "none"),
    ]
    return [Check(name, bool(ok), str(detail)[:200], "config") for name, ok, detail in checks]


def _only_job_mounts(mounts: list[AppliedMount]) -> bool:
    """The sandbox's mounts are the job's two binds and nothing else, of any kind: an image's
    ``VOLUME`` (an anonymous volume: writable, exec-capable, not capped) fails it too."""
    by_destination = {m.destination: m for m in mounts}
    return (len(mounts) == 2 and set(by_destination) == {IN_DIR, OUT_DIR}
            and all(m.kind == "bind" and "docker.sock" not in m.source for m in mounts)
            and not by_destination[IN_DIR].writable)


def host_checks(policy: SandboxPolicy, users: sandbox_ids.Lookup | None = None,
                groups: sandbox_ids.Lookup | None = None,
                read_scope: sandbox_ids.ReadScope | None = None) -> list[Check]:
    """The host around the sandboxes: no account shares their ids, and ``ptrace_scope``.

    A ptrace_scope that lets a same-uid process attach is waived only while no account has
    the sandbox uid (then only root could run such a process); see sandbox_ids."""
    shared = sandbox_ids.shared_ids(policy, users, groups)
    ids = Check("sandbox_ids_unshared", not shared,
                ("; ".join(shared) or f"no host account or group has {policy.user}")[:200],
                "host", waived=HOST_ACCOUNT_WAIVER
                if shared and policy.host_account_check == "warn" else "")
    scope = (read_scope or sandbox_ids.read_ptrace_scope)()
    safe = scope in sandbox_ids.SAFE_SCOPES
    ptrace = Check("host_ptrace_scope", safe, sandbox_ids.describe_scope(scope), "host",
                   waived=PTRACE_SCOPE_WAIVER if not safe and not shared else "")
    return [ids, ptrace]


def _seccomp_profile_check(security_opt: list[str], policy: SandboxPolicy) -> tuple[str, bool, str]:
    """The container carries exactly the policy's seccomp profile (or, for "docker-default",
    none of its own: the engine's default applies)."""
    want = profile_json(policy.seccomp, policy.runtime_family)
    given = [o.split("=", 1)[1] for o in security_opt if o.startswith("seccomp=")]
    if want is None:
        return "seccomp_profile", not given, f"engine default ({policy.seccomp}, weakened)"
    ok = given == [want]
    return "seccomp_profile", ok, (f"{policy.seccomp} ({len(want)} bytes)" if ok
                                   else f"expected {policy.seccomp}, got {len(given)} profile(s)")


async def run_selftest(backend: SandboxBackend, policy: SandboxPolicy,
                       deadline_seconds: float = 120.0, *,
                       host_versions: HostVersions | None = None) -> SelfTestReport:
    """Run the probe in a fresh sandbox; infrastructure failures raise ``SandboxUnavailable``.

    ``host_versions`` supplies the host side of the version gates; the image side comes from
    the probe. Without it only the image's gates are judged."""
    slot = await backend.prepare(PROFILE_LIGHT, selftest=True)
    try:
        checks = config_checks(await backend.describe(slot), policy) + host_checks(policy)
        outcome = await backend.run(slot, JobSpec(job_id="selftest"), deadline_seconds)
        probe = _read_probe(await backend.output(slot) / SELFTEST_FILE)
        if outcome.exit_code != 0 or probe is None:
            checks.append(Check("probe_ran", False, f"probe exit {outcome.exit_code}, "
                                f"timed out {outcome.timed_out}", "sandbox"))
        else:
            inside, found = probe
            checks.extend(_waive(c, policy) for c in inside)
            observed = dict(version_gates.from_probe(found, "image"))
            if host_versions is not None:
                observed.update(await host_versions())
            checks.extend(version_checks(observed, policy, judge_host=host_versions is not None))
        return SelfTestReport(checks=tuple(checks), runtime=outcome.runtime,
                              image_id=outcome.image_id)
    finally:
        await backend.destroy(slot)


def version_checks(observed: Mapping[str, Observation], policy: SandboxPolicy, *,
                   judge_host: bool = True) -> list[Check]:
    """One check per enforced gate that applies to this policy (version_gates.GATES)."""
    checks = []
    for gate in version_gates.GATES:
        if not gate.enforced or not version_gates.relevant(gate, policy.runtime_family):
            continue
        if gate.where != "image" and not judge_host:
            continue
        verdict = version_gates.evaluate(gate, observed.get(gate.key))
        cves = ", ".join(gate.cves) or "no CVE"
        checks.append(Check(f"version_{gate.component}_{gate.where}", verdict.status == "ok",
                            f"{verdict.found} (want {verdict.wanted}; {cves})"[:200],
                            "sandbox" if gate.where == "image" else "config"))
    return checks


def _waive(check: Check, policy: SandboxPolicy) -> Check:
    reason = WAIVERS.get((policy.runtime_family, check.name), "")
    if not reason and check.name.startswith("seccomp_") and policy.seccomp != SECCOMP_AIRLOCK:
        reason = (f"the configuration chose seccomp = {policy.seccomp!r} instead of Airlock's "
                  "profile (a visible weakening)")
    if check.passed or not reason:
        return check
    return Check(check.name, False, check.detail, check.source, waived=reason)


def _read_probe(path: Any) -> tuple[list[Check], dict[str, str]] | None:
    try:
        handle, st = open_regular_file(path)
    except Exception:
        return None
    with handle:
        if st.st_size > _MAX_BYTES:
            return None
        try:
            doc = json.loads(read_upto(handle, st.st_size))
            checks = [Check(str(c["name"])[:64], c["passed"] is True, str(c["detail"])[:200],
                            "sandbox") for c in doc["checks"]]
            found = doc.get("versions") or {}
            return checks, {str(k)[:64]: str(v)[:64] for k, v in found.items()}
        except (ValueError, KeyError, TypeError):
            return None


__all__ = ["Check", "SandboxUnavailable", "SelfTestReport", "config_checks", "host_checks",
           "run_selftest"]

"""What a sandbox's confinement actually is, read back from the engine that applied it.

The self-test judges this against the policy (ops/selftest.py ``config_checks``), so it holds
the engine's own record, never the request the broker sent. Each backend maps its record onto
these fields: the Docker adapter from ``docker inspect`` (docker_sandbox.py ``confinement_of``),
a pod-per-job backend from the pod spec as the API server stored it (docs/scale-out.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AppliedMount:
    """One filesystem mounted into the sandbox from outside its image's root, whatever made
    it: the broker's binds, an image's ``VOLUME`` (anonymous, writable, exec-capable,
    uncapped), anything else the engine added."""

    #: "bind", "volume", "tmpfs", ... as the engine names it.
    kind: str
    source: str
    destination: str
    writable: bool


@dataclass(frozen=True)
class Confinement:
    """One sandbox's applied settings, in the policy's terms (None: the engine did not say)."""

    #: "none": no interface but loopback.
    network: str | None = None
    read_only_root: bool | None = None
    cap_drop: list[str] | None = None
    cap_add: list[str] | None = None
    privileged: bool | None = None
    #: As the runtime took them: "no-new-privileges", "seccomp=<the profile's JSON>", ...
    security_options: list[str] = field(default_factory=list)
    pids_limit: int | None = None
    memory_bytes: int | None = None
    memory_swap_bytes: int | None = None
    nano_cpus: int | None = None
    #: The log driver ("none": the sandbox's output is kept nowhere).
    logging: str | None = None
    runtime: str | None = None
    user: str = ""
    #: What the sandbox runs, before the broker's arguments: the image's entrypoint unless the
    #: create request named another (empty: none, the command alone runs).
    entrypoint: list[str] = field(default_factory=list)
    #: Every mount the engine lists for the sandbox, of every kind.
    mounts: list[AppliedMount] = field(default_factory=list)
    #: The names of the sandbox's environment variables.
    env_names: list[str] = field(default_factory=list)
    #: The health check the engine runs inside the sandbox, as the engine records it (its
    #: test: ``["CMD", ...]``, ``["CMD-SHELL", ...]``); empty or ``["NONE"]``: none.
    healthcheck: list[str] = field(default_factory=list)

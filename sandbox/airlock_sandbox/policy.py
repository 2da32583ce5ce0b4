"""The sandbox hardening policy as frozen, validated data (DESIGN §1.3).

Every default is the secure one. Weakening the posture means constructing a policy with a
different value in configuration, visibly; there is no code path that relaxes it. The broker's
Docker adapter translates a policy into container-create arguments and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from airlock_sandbox.contract import CONTAINER_USER
from airlock_sandbox.seccomp import AIRLOCK as SECCOMP_AIRLOCK

MiB = 1024**2
GiB = 1024**3

RUNTIMES = frozenset({"runc", "runsc"})

#: Memory a sandbox keeps beside a full output tmpfs: the worker, its imported profile and
#: the tensors it holds while it writes (the input is an mmap, paged in and out).
OUTPUT_HEADROOM_BYTES = 512 * MiB


EXIT_WATCHES = frozenset({"freeze", "pidfd", "engine"})

HOST_ACCOUNT_CHECKS = frozenset({"refuse", "warn"})


def runtime_family(runtime: str) -> str:
    """"runc" or "runsc" for a runtime name: the name itself, or a second registration of the
    same runtime with other flags, named ``runsc-<suffix>`` / ``runc-<suffix>``."""
    return runtime.split("-", 1)[0]


def root_in(user: str) -> list[str]:
    """What in a container ``user`` (``UID``, ``UID:GID``, names in their place) is root, as
    phrases; empty when nothing is. The engine reads a number as an integer (Go's ``Atoi``),
    so ``"00"``, ``"+0"`` and ``"0000:0"`` are id 0 as much as ``"0"``: numbers are compared
    as numbers (``int``, which accepts every spelling ``Atoi`` does), never as strings. No
    user at all is the image's default, root unless the image says otherwise."""
    uid, _, gid = user.partition(":")
    found = [] if uid else ["no user (the image's default)"]
    for kind, text in (("user", uid), ("group", gid)):
        if text == "root":
            found.append(f"the {kind} name 'root'")
            continue
        try:
            number = int(text)
        except ValueError:  # a name (or nothing): resolved by the engine in the image
            continue
        if number == 0:
            found.append(f"{kind} id {number} ({text!r})")
    return found


@dataclass(frozen=True)
class SandboxPolicy:
    """How one sandbox container is confined. Validated on creation."""

    image: str = "airlock-sandbox:latest"
    runtime: str = "runc"
    network_disabled: bool = True
    read_only_root: bool = True
    drop_all_capabilities: bool = True
    no_new_privileges: bool = True
    user: str = CONTAINER_USER
    pids_limit: int = 256
    memory_bytes: int = 4 * GiB
    nano_cpus: int = 1_000_000_000  # one CPU
    tmpfs_bytes: int = 256 * MiB
    #: Files /tmp and /dev/shm may hold. Docker's default is half the host's RAM in pages
    #: (millions): empty files cost no bytes against ``size=`` but host kernel memory each.
    tmpfs_inodes: int = 16384
    #: /dev/shm (POSIX shared memory, semaphores), mounted by us so that it is capped like /tmp.
    shm_bytes: int = 64 * MiB
    #: The job's output: a tmpfs the broker mounts, so RAM, charged to the sandbox's memory
    #: cgroup as the worker writes it. The largest output (a safetensors shard) a job can make;
    #: a bigger one needs this and ``memory_bytes`` raised together (this plus
    #: ``OUTPUT_HEADROOM_BYTES`` at most).
    output_bytes: int = 3 * GiB
    #: The largest output of a job whose output may not fit ``output_bytes`` (a safetensors
    #: shard of many GiB): it gets a disk-backed filesystem on the broker's spool instead,
    #: sized from its input up to this, not charged to the sandbox's memory (the broker's
    #: conversion/output_room.py). 0: never; such outputs are refused as too large.
    disk_output_bytes: int = 64 * GiB
    nofile_limit: int = 256
    deadline_seconds: float = 120.0
    #: Seccomp profile: "airlock" (deny by default, fitted to the worker; airlock_sandbox/seccomp),
    #: "docker-default" (the engine's own, weaker) or a path to a JSON profile. Never unconfined.
    seccomp: str = SECCOMP_AIRLOCK
    #: Extra ``--security-opt`` entries (AppArmor, SELinux labels). Seccomp goes in ``seccomp``.
    security_opts: tuple[str, ...] = field(default_factory=tuple)
    #: How the broker learns that a sandbox is done: "freeze" (runc: a worker that succeeded
    #: says so and waits; the broker freezes its cgroup and reads the output without waiting
    #: for the slow exit; anything else as "pidfd"), "pidfd" (the death, from the kernel, on
    #: kernels that give a reaped process's exit status through a pidfd; the engine otherwise)
    #: or "engine" (always Docker's ``wait``, 40-60 ms later). Not a confinement setting: in
    #: every mode the output is read only once nothing in the container can run.
    exit_watch: str = "freeze"
    #: Warm containers import and wait at the lowest CPU weight; a job that takes one warmed
    #: up runs at the default, ahead of the refills (docs/operations.md has the figures).
    #: runc with the kernel exit watch only; the broker's sandboxes/cpu_weight.py. Not a
    #: confinement setting either.
    warm_low_priority: bool = True
    #: A host account or group with the sandbox's uid or gid (there is no user-namespace
    #: remapping: they are the same ids) would own every sandbox and be where an escape lands.
    #: "refuse": the broker does not start; "warn": it starts and logs it (weakened).
    host_account_check: str = "refuse"

    def __post_init__(self) -> None:
        if runtime_family(self.runtime) not in RUNTIMES:
            raise ValueError(f"runtime must be one of {sorted(RUNTIMES)} (or <runtime>-<suffix>, "
                             f"another registration of one), not {self.runtime!r}")
        if root := root_in(self.user):
            raise ValueError(f"the sandbox never runs as root, nor in its group: user "
                             f"{self.user!r} has {', '.join(root)}")
        for name in ("pids_limit", "memory_bytes", "nano_cpus", "tmpfs_bytes", "tmpfs_inodes",
                     "shm_bytes", "output_bytes", "nofile_limit"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (an unlimited sandbox is not offered)")
        if self.disk_output_bytes < 0:
            raise ValueError("disk_output_bytes must not be negative (0: no disk-backed output)")
        if self.deadline_seconds <= 0:
            raise ValueError("deadline_seconds must be positive")
        if self.memory_bytes < 64 * MiB:
            raise ValueError("memory_bytes below 64 MiB cannot start Python")
        if self.output_bytes + OUTPUT_HEADROOM_BYTES > self.memory_bytes:
            raise ValueError(
                f"output_bytes ({self.output_bytes}) plus {OUTPUT_HEADROOM_BYTES // MiB} MiB for "
                f"the worker exceeds memory_bytes ({self.memory_bytes}): the output tmpfs is "
                "charged to the sandbox's memory, so a full one would get the worker killed. "
                "Raise memory_bytes with output_bytes")
        if any("unconfined" in opt for opt in self.security_opts) or "unconfined" in self.seccomp:
            raise ValueError("security_opts may not disable seccomp or AppArmor")
        if any(opt.startswith("seccomp") for opt in self.security_opts):
            raise ValueError("set the seccomp profile with `seccomp`, not in security_opts")
        if not self.seccomp:
            raise ValueError("seccomp must name a profile")
        if self.exit_watch not in EXIT_WATCHES:
            raise ValueError(f"exit_watch must be one of {sorted(EXIT_WATCHES)}, "
                             f"not {self.exit_watch!r}")
        if self.host_account_check not in HOST_ACCOUNT_CHECKS:
            raise ValueError(f"host_account_check must be one of {sorted(HOST_ACCOUNT_CHECKS)}, "
                             f"not {self.host_account_check!r}")

    @property
    def runtime_family(self) -> str:
        return runtime_family(self.runtime)

    @property
    def weakened(self) -> tuple[str, ...]:
        """The secure defaults this policy gives up, for logs and the audit record."""
        gaps = []
        if not self.network_disabled:
            gaps.append("network")
        if not self.read_only_root:
            gaps.append("writable-root")
        if not self.drop_all_capabilities:
            gaps.append("capabilities")
        if not self.no_new_privileges:
            gaps.append("new-privileges")
        if self.seccomp != SECCOMP_AIRLOCK:
            gaps.append(f"seccomp={self.seccomp}")
        if self.host_account_check != "refuse":
            gaps.append(f"host-account-check={self.host_account_check}")
        return tuple(gaps)

"""The frozen ``SandboxPolicy`` as docker-py arguments (DESIGN §1.3), and back: the engine's
record of a container (``docker inspect``) as the ``Confinement`` the self-test judges.

Pure functions, unit-tested; docker_sandbox.py is the one that talks to the engine.
"""

from __future__ import annotations

import functools
from typing import Any

from docker.types import LogConfig, Mount, Ulimit

from airlock_broker.sandboxes.confinement import AppliedMount, Confinement
from airlock_broker.sandboxes.workspace import JobWorkspace
from airlock_sandbox.contract import IDLE_POLL_MS, IN_DIR, OUT_DIR
from airlock_sandbox.policy import SandboxPolicy
from airlock_sandbox.seccomp import profile_json


def no_healthcheck() -> dict[str, list[str]]:
    """The health check every sandbox gets: none. An image's ``HEALTHCHECK`` is inherited by
    each container made from it, and the engine would then ``exec`` its command into every
    sandbox on a timer, while the sandbox holds an artifact (DESIGN §1.2: never exec)."""
    return {"test": ["NONE"]}


def worker_args(policy: SandboxPolicy, profile: str) -> list[str]:
    """The worker's command line: its profile, and how often it looks for its job spec once
    idle, for this runtime (contract.IDLE_POLL_MS)."""
    idle = IDLE_POLL_MS.get(policy.runtime_family)
    return ["--profile", profile, *(["--idle-poll-ms", str(idle)] if idle else [])]


def create_kwargs(policy: SandboxPolicy, workspace: JobWorkspace, profile: str,
                  labels: dict[str, str], *, selftest: bool = False,
                  image: str = "") -> dict[str, Any]:
    """The hardening profile of DESIGN §1.3 as docker-py arguments. Pure; unit-tested.
    ``image``: the image id the backend checked (``DockerSandbox.check``), so that the
    container runs the image its provenance names even when the tag moved since; the
    policy's tag when none was checked."""
    security_opt = list(policy.security_opts)
    seccomp = seccomp_json(policy)
    if seccomp is not None:
        # docker-py passes the profile's content, not a path (the engine reads no client files).
        security_opt.append(f"seccomp={seccomp}")
    if policy.no_new_privileges:
        security_opt.append("no-new-privileges")
    return {
        "image": image or policy.image,
        "command": ["--selftest"] if selftest else worker_args(policy, profile),
        "user": policy.user,
        "labels": labels,
        "detach": True,
        "environment": {},
        # docker-py would otherwise copy the client's proxy settings into the container.
        "use_config_proxy": False,
        "hostname": "sandbox",
        "working_dir": "/tmp",
        "network_mode": "none" if policy.network_disabled else "bridge",
        # And no network from the engine at all. With "none" alone the engine still builds a
        # libnetwork sandbox for the container (a namespace file under /var/run/docker/netns,
        # a "none" endpoint), has runc run a prestart hook that re-executes dockerd
        # (libnetwork-setkey), and tears both down at removal. With NetworkDisabled it does
        # neither: runc makes the new network namespace itself, loopback only, which is all
        # "none" gave. Measured here (Docker 20.10, runc; create, start, wait, remove of
        # ``python3 -c pass``, 15 each way, alternating, three rounds): 287-302 ms of the
        # machine's CPU and 268-277 ms of wall time per container without it, 145-172 ms and
        # 146-164 ms with it; inside, the same under runc and runsc (a namespace of its own,
        # ``lo`` only, "Network is unreachable").
        "network_disabled": policy.network_disabled,
        "read_only": policy.read_only_root,
        "cap_drop": ["ALL"] if policy.drop_all_capabilities else [],
        "security_opt": security_opt,
        "pids_limit": policy.pids_limit,
        "mem_limit": policy.memory_bytes,
        "memswap_limit": policy.memory_bytes,  # = memory: no swap
        "nano_cpus": policy.nano_cpus,
        "ulimits": [Ulimit(name="nofile", soft=policy.nofile_limit, hard=policy.nofile_limit),
                    Ulimit(name="core", soft=0, hard=0)],
        # nr_inodes: an inode fill would otherwise cost host kernel memory, not tmpfs bytes.
        "tmpfs": {
            "/tmp": (f"rw,noexec,nosuid,nodev,size={policy.tmpfs_bytes},"
                     f"nr_inodes={policy.tmpfs_inodes},mode=1777"),
            "/dev/shm": (f"rw,noexec,nosuid,nodev,size={policy.shm_bytes},"
                         f"nr_inodes={policy.tmpfs_inodes},mode=1777"),
        },
        "mounts": [
            Mount(target=IN_DIR, source=str(workspace.in_dir), type="bind", read_only=True),
            # A broker-owned noexec,nosuid,nodev tmpfs; the bind keeps those flags.
            Mount(target=OUT_DIR, source=str(workspace.out_dir), type="bind", read_only=False),
        ],
        "log_config": LogConfig(type="none"),
        "healthcheck": no_healthcheck(),
        "runtime": policy.runtime,
        "ipc_mode": "private",
        "stdin_open": False,
        "tty": False,
    }


def seccomp_json(policy: SandboxPolicy) -> str | None:
    """The policy's seccomp profile text for ``security_opt``; None: the engine's default."""
    return _seccomp_json(policy.seccomp, policy.runtime_family)


@functools.lru_cache(maxsize=8)
def _seccomp_json(name: str, family: str) -> str | None:
    """Read once per profile (every container create needs it)."""
    return profile_json(name, family)


def probe_kwargs(policy: SandboxPolicy, source: str, labels: dict[str, str], *,
                 image: str = "") -> dict[str, Any]:
    """A throwaway container running ``python3 -c source`` in the policy's image (``image``:
    the id checked, as for ``create_kwargs``), confined like a sandbox (no network,
    read-only, no capabilities, the seccomp profile): how the image's versions are read
    without importing anything from it on the host. ``labels``: a sandbox's
    (owners.sandbox_labels), so that an orphaned probe is reaped like one."""
    return {
        "image": image or policy.image, "entrypoint": ["python3", "-c", source],
        "user": policy.user, "environment": {}, "use_config_proxy": False,
        "network_mode": "none", "network_disabled": True, "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": [*policy.security_opts, "no-new-privileges"]
        + ([f"seccomp={p}"] if (p := seccomp_json(policy)) else []),
        "pids_limit": policy.pids_limit, "mem_limit": policy.memory_bytes,
        "runtime": policy.runtime, "detach": True, "healthcheck": no_healthcheck(),
        "labels": labels,
    }


def confinement_of(info: dict[str, Any]) -> Confinement:
    """``docker inspect``'s record of a container, in the policy's terms."""
    host = info.get("HostConfig", {})
    config = info.get("Config", {})
    return Confinement(
        network=host.get("NetworkMode"),
        read_only_root=host.get("ReadonlyRootfs"),
        cap_drop=host.get("CapDrop"),
        cap_add=host.get("CapAdd"),
        privileged=host.get("Privileged"),
        security_options=list(host.get("SecurityOpt") or []),
        pids_limit=host.get("PidsLimit"),
        memory_bytes=host.get("Memory"),
        memory_swap_bytes=host.get("MemorySwap"),
        nano_cpus=host.get("NanoCpus"),
        logging=(host.get("LogConfig") or {}).get("Type"),
        runtime=host.get("Runtime"),
        user=str(config.get("User", "")),
        entrypoint=[str(a) for a in config.get("Entrypoint") or []],
        # All of them: an image's VOLUME is listed as "volume" (the tmpfs mounts made from
        # HostConfig.Tmpfs are not listed at all; ``tmpfs`` in create_kwargs owns them).
        mounts=[AppliedMount(kind=str(m.get("Type")), source=str(m.get("Source")),
                             destination=str(m.get("Destination")), writable=m.get("RW") is True)
                for m in info.get("Mounts") or []],
        env_names=[e.split("=", 1)[0] for e in config.get("Env") or []],
        healthcheck=[str(t) for t in (config.get("Healthcheck") or {}).get("Test") or []],
    )

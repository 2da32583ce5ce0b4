"""The Docker adapter: the only module that imports ``docker``.

It turns a frozen ``SandboxPolicy`` into container-create arguments, runs single-use
containers, enforces the wall-clock deadline itself with ``kill`` (docker-py's
``wait(timeout=)`` is only an HTTP timeout), and maps Docker's errors to
``SandboxUnavailable`` in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.types import LogConfig, Mount, Ulimit

from airlock_broker.sandboxes.exit_watch import ExitWatch
from airlock_broker.sandboxes.sandbox import Outcome, SandboxUnavailable, Slot
from airlock_broker.sandboxes.version_gates import Observation, engine_observations
from airlock_broker.sandboxes.workspace import JobWorkspace, WorkspaceError
from airlock_broker.tracing import NO_TRACE, Trace
from airlock_sandbox.contract import CONTAINER_GID, CONTAINER_UID, IN_DIR, OUT_DIR, JobSpec
from airlock_sandbox.policy import SandboxPolicy
from airlock_sandbox.seccomp import DOCKER_DEFAULT, profile_json

log = logging.getLogger(__name__)

T = TypeVar("T")

LABEL_MANAGED = "airlock.managed"
LABEL_BROKER = "airlock.broker"
LABEL_SLOT = "airlock.slot"
LABEL_PROFILE = "airlock.profile"

_INFRA_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


def broker_identity() -> str:
    """``host:pid:starttime`` — survives PID reuse, so orphans are told apart from the living."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks, or "0" if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return "0"
    if len(fields) < 20 or fields[0] in {b"Z", b"X"}:  # dead, not yet reaped by its parent
        return "0"
    return fields[19].decode()


def _is_alive(identity: str) -> bool:
    host, _, rest = identity.partition(":")
    pid_s, _, start = rest.partition(":")
    if host != socket.gethostname():
        return True  # not ours to judge
    try:
        pid = int(pid_s)
    except ValueError:
        return False
    return _start_time(pid) == start and start != "0"


def _binary_version(path: str) -> str | None:
    """``runsc --version`` -> "0.0~20221219.0"; None if it cannot be run."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (done.stdout.splitlines() or [""])[0]
    return first.rsplit(" ", 1)[-1] or None


def create_kwargs(policy: SandboxPolicy, workspace: JobWorkspace, profile: str,
                  labels: dict[str, str], *, selftest: bool = False) -> dict[str, Any]:
    """The hardening profile of DESIGN §1.3 as docker-py arguments. Pure; unit-tested."""
    security_opt = list(policy.security_opts)
    seccomp = seccomp_json(policy)
    if seccomp is not None:
        # docker-py passes the profile's content, not a path (the engine reads no client files).
        security_opt.append(f"seccomp={seccomp}")
    if policy.no_new_privileges:
        security_opt.append("no-new-privileges")
    return {
        "image": policy.image,
        "command": ["--selftest"] if selftest else ["--profile", profile],
        "user": policy.user,
        "labels": labels,
        "detach": True,
        "environment": {},
        # docker-py would otherwise copy the client's proxy settings into the container.
        "use_config_proxy": False,
        "hostname": "sandbox",
        "working_dir": "/tmp",
        "network_mode": "none" if policy.network_disabled else "bridge",
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


class DockerSandbox:
    """A ``SandboxBackend`` on the local Docker engine."""

    def __init__(self, policy: SandboxPolicy, spool_root: Path, *, threads: int = 16,
                 client: docker.DockerClient | None = None, trace: Trace = NO_TRACE) -> None:
        self.policy = policy
        self.trace = trace
        self.spool_root = spool_root
        self.identity = broker_identity()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="docker")
        self._client = client
        #: Whether the client was made here from the environment (and a fresh one can be).
        self._own_client = client is None
        self._image_id = ""
        #: Slot ids of the slots this backend owns now: added before the create call, dropped
        #: when the slot is destroyed. A container with this broker's label and a slot id not
        #: in here is a stray (a create whose answer was lost, a removal that failed while the
        #: engine was away): ``reap_orphans`` removes it.
        self._owned: set[str] = set()

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = docker.from_env(version="auto", max_pool_size=32, timeout=60)
            except _INFRA_ERRORS as exc:
                raise SandboxUnavailable(f"Docker engine unreachable: {exc}") from exc
        return self._client

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except docker.errors.ImageNotFound as exc:
            raise SandboxUnavailable(
                f"sandbox image {self.policy.image} not found: run 'make image'") from exc
        except _INFRA_ERRORS as exc:
            raise SandboxUnavailable(f"Docker engine error: {exc}") from exc

    # -- SandboxBackend ---------------------------------------------------------------------

    async def check(self) -> None:
        await self._call(self._ping_fresh)
        image = await self._call(self.client.images.get, self.policy.image)
        self._image_id = str(image.id)
        runtimes = await self._call(self._runtimes)
        if self.policy.runtime not in runtimes:
            raise SandboxUnavailable(
                f"OCI runtime {self.policy.runtime!r} is not registered with the Docker engine")
        args = runtimes[self.policy.runtime].get("runtimeArgs") or []
        if (self.policy.runtime_family == "runsc" and self.policy.seccomp != DOCKER_DEFAULT
                and "--oci-seccomp" not in args):
            # Without it runsc drops the container's seccomp profile: no filter at all.
            raise SandboxUnavailable(
                f"OCI runtime {self.policy.runtime!r} is registered without --oci-seccomp, so "
                "the sandbox's seccomp profile would not apply: run scripts/ensure-docker.sh "
                "(make docker) to update the registration")

    def _ping_fresh(self) -> None:
        """Ping over a new connection. A stopping engine closes its listener first but goes on
        answering on connections already open (the client's pool holds some), so a ping over
        those would say all is well while the engine kills every container."""
        if not self._own_client:  # a client given to us (tests): its own ping is the probe
            self.client.ping()
            return
        probe = docker.APIClient(version=self.client.api.api_version, timeout=10,
                                 **docker.utils.kwargs_from_env())
        try:
            probe.ping()
        finally:
            probe.close()

    def _runtimes(self) -> dict[str, dict[str, Any]]:
        info: dict[str, Any] = self.client.info()
        return dict(info.get("Runtimes", {}))

    async def engine_versions(self) -> dict[str, Observation]:
        """The OCI runtimes' versions, for the version gates (runc as the engine reports it,
        runsc from the binary registered for the policy's runtime, or for "runsc")."""
        version: dict[str, Any] = await self._call(self.client.version)
        info: dict[str, Any] = await self._call(self.client.info)
        runtimes = info.get("Runtimes", {})
        name = self.policy.runtime if self.policy.runtime_family == "runsc" else "runsc"
        path = runtimes.get(name, {}).get("path")
        runsc_version = await asyncio.get_running_loop().run_in_executor(
            self._pool, _binary_version, path) if path else None
        return engine_observations(version.get("Components") or [], runsc_version)

    async def probe_image(self, source: str, timeout: float = 60.0) -> str:
        """Run ``python3 -c source`` in a throwaway container of the policy's image, confined
        like a sandbox (no network, read-only, no capabilities, the seccomp profile), and
        return its stdout. For ``make audit``: the image's versions are read inside it."""
        kwargs: dict[str, Any] = {
            "image": self.policy.image, "entrypoint": ["python3", "-c", source],
            "user": self.policy.user, "environment": {}, "use_config_proxy": False,
            "network_mode": "none", "read_only": True, "cap_drop": ["ALL"],
            "security_opt": [*self.policy.security_opts, "no-new-privileges"]
            + ([f"seccomp={p}"] if (p := seccomp_json(self.policy)) else []),
            "pids_limit": self.policy.pids_limit, "mem_limit": self.policy.memory_bytes,
            "runtime": self.policy.runtime, "detach": True,
            "labels": {LABEL_BROKER: self.identity},
        }
        container = await self._call(self.client.containers.create, **kwargs)
        try:
            await self._call(container.start)
            await self._call(container.wait, timeout=timeout)
            out: bytes = await self._call(container.logs, stdout=True, stderr=False)
            return out.decode(errors="replace")
        finally:
            with contextlib.suppress(SandboxUnavailable):
                await self._call(container.remove, force=True)

    @property
    def image_id(self) -> str:
        return self._image_id

    async def inspect(self, slot: Slot) -> dict[str, Any]:
        info: dict[str, Any] = await self._call(self.client.api.inspect_container,
                                                slot.container_id)
        return info

    async def prepare(self, profile: str, *, selftest: bool = False) -> Slot:
        with self.trace.span("container_prepare"):
            return await self._prepare(profile, selftest=selftest)

    async def _prepare(self, profile: str, *, selftest: bool) -> Slot:
        slot_id = uuid.uuid4().hex
        try:
            workspace = JobWorkspace.create(self.spool_root, slot_id, uid=CONTAINER_UID,
                                            gid=CONTAINER_GID,
                                            output_bytes=self.policy.output_bytes)
        except (OSError, WorkspaceError) as exc:
            raise SandboxUnavailable(str(exc)) from exc
        labels = {LABEL_MANAGED: "true", LABEL_BROKER: self.identity, LABEL_SLOT: slot_id,
                  LABEL_PROFILE: profile}
        self._owned.add(slot_id)
        create = asyncio.ensure_future(self._call(
            self.client.containers.create,
            **create_kwargs(self.policy, workspace, profile, labels, selftest=selftest)))
        try:
            container = await asyncio.shield(create)
        except asyncio.CancelledError:
            # The create goes on in its thread after we are cancelled: wait for it, remove
            # what it made, then give up, so a cancelled job leaves no container behind.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                made = await create
                await self._call(self.client.api.remove_container, made.id, force=True)
            workspace.destroy()
            self._owned.discard(slot_id)
            raise
        except BaseException:
            workspace.destroy()
            self._owned.discard(slot_id)
            raise
        return Slot(slot_id=slot_id, profile=profile, workspace=workspace,
                    container_id=str(container.id))

    async def start(self, slot: Slot) -> None:
        with self.trace.span("container_start"):
            await self._start(slot)

    async def _start(self, slot: Slot) -> None:
        await self._call(self.client.api.start, slot.container_id)
        slot.started = True
        if self.policy.exit_watch == "pidfd" and self.policy.runtime_family == "runc":
            info = await self._call(self.client.api.inspect_container, slot.container_id)
            slot.exit_watch = ExitWatch.open(int(info["State"].get("Pid") or 0),
                                             slot.container_id)

    async def is_running(self, slot: Slot) -> bool:
        if slot.exit_watch is not None:
            return not slot.exit_watch.exited()
        info = await self._call(self.client.api.inspect_container, slot.container_id)
        return bool(info["State"].get("Running"))

    async def current_image_id(self) -> str:
        image = await self._call(self.client.images.get, self.policy.image)
        self._image_id = str(image.id)
        return self._image_id

    async def run(self, slot: Slot, spec: JobSpec, deadline_seconds: float) -> Outcome:
        with self.trace.span("spec"):
            slot.workspace.write_job_spec(spec)
        began = time.monotonic()
        began_wall = int(time.time()) - 1
        if not slot.started:
            await self.start(slot)
        timed_out = False
        try:
            async with asyncio.timeout(deadline_seconds):
                if slot.exit_watch is not None and await slot.exit_watch.wait() == 0:
                    # Every process of the container is gone and it exited 0: the engine
                    # would say the same, 40-60 ms later (exit_watch.py).
                    return Outcome(exit_code=0, oom_killed=False, timed_out=False,
                                   duration_seconds=time.monotonic() - began,
                                   image_id=self._image_id, runtime=self.policy.runtime,
                                   exit_seen_by="kernel")
                # The status code is read from inspect below, together with OOMKilled.
                await self._call(self.client.api.wait, slot.container_id)
        except TimeoutError:
            timed_out = True
            await self._kill(slot)
            # A container with thousands of processes can take a while to die; if it is still
            # not dead, the forced removal in ``destroy`` finishes it. The verdict stands: the
            # broker's deadline fired.
            with contextlib.suppress(SandboxUnavailable):
                await self._call(self.client.api.wait, slot.container_id, timeout=30)
        duration = time.monotonic() - began
        state = (await self._call(self.client.api.inspect_container, slot.container_id))["State"]
        exit_code = None if timed_out else int(state.get("ExitCode", -1))
        killed_by = ""
        if exit_code is not None and exit_code > 128 and not state.get("OOMKilled"):
            killed_by = await self._kill_recorded(slot, began_wall)
        return Outcome(
            exit_code=exit_code,
            killed_by=killed_by,
            oom_killed=bool(state.get("OOMKilled", False)),
            timed_out=timed_out,
            duration_seconds=duration,
            image_id=self._image_id,
            runtime=self.policy.runtime,
        )

    async def _kill_recorded(self, slot: Slot, since: int) -> str:
        """The engine's event log: did anyone send this container a signal? (The broker kills
        only at the deadline, and then it does not ask.)"""
        def kills() -> list[dict[str, Any]]:
            return list(self.client.api.events(
                since=since, until=f"{time.time():.6f}", decode=True,
                filters={"container": slot.container_id, "event": "kill"}))

        try:
            events = await self._call(kills)
        except SandboxUnavailable as exc:
            log.warning("could not read the engine's events for %s: %s",
                        slot.container_id[:12], exc)
            return ""
        signals = sorted({str(e.get("Actor", {}).get("Attributes", {}).get("signal", "?"))
                          for e in events})
        if not signals:
            return ""
        return f"signal {', '.join(signals)} sent through the Docker engine: docker kill, " \
               "docker stop or the engine shutting down"

    async def _kill(self, slot: Slot, attempts: int = 3) -> None:
        """SIGKILL at the deadline. The engine may answer 500 ("tried to kill container, but
        did not receive an exit event") when a fork bomb's thousands of processes take longer
        to die than it waits: that is the artifact's doing, not an outage, so try again and
        then let ``destroy`` force the removal. Only an unreachable engine raises."""
        for attempt in range(1, attempts + 1):
            try:
                await self._call(self.client.api.kill, slot.container_id)
                return
            except SandboxUnavailable as exc:
                if "is not running" in str(exc):
                    return
                if not isinstance(exc.__cause__, docker.errors.APIError):
                    raise
                log.warning("kill of sandbox %s not confirmed (attempt %d of %d): %s",
                            slot.container_id[:12], attempt, attempts, exc)

    async def destroy(self, slot: Slot) -> None:
        if slot.exit_watch is not None:
            slot.exit_watch.close()
        try:
            await self._call(self.client.api.remove_container, slot.container_id, force=True,
                             v=True)
        except SandboxUnavailable as exc:
            if "No such container" not in str(exc):
                log.error("could not remove container %s (the sweep will): %s",
                          slot.container_id[:12], exc)
        finally:
            self._owned.discard(slot.slot_id)
            slot.workspace.destroy()

    async def reap_orphans(self) -> int:
        """Remove containers of dead brokers, and this broker's strays (see ``_owned``)."""
        containers = await self._call(self.client.api.containers, all=True,
                                      filters={"label": f"{LABEL_MANAGED}=true"})
        reaped = 0
        for info in containers:
            labels = info.get("Labels") or {}
            owner = labels.get(LABEL_BROKER, "")
            if owner == self.identity:
                if labels.get(LABEL_SLOT, "") in self._owned:
                    continue
                log.warning("removing stray container %s (a slot this broker no longer owns)",
                            info["Id"][:12])
            elif _is_alive(owner):
                continue
            try:
                await self._call(self.client.api.remove_container, info["Id"], force=True, v=True)
                reaped += 1
            except SandboxUnavailable as exc:
                log.warning("could not reap orphan %s: %s", info["Id"][:12], exc)
        if reaped:
            log.info("reaped %d orphaned sandbox container(s)", reaped)
        return reaped

    async def close(self) -> None:
        """Remove every container this broker started, then release the engine connection."""
        try:
            mine = await self._call(self.client.api.containers, all=True,
                                    filters={"label": f"{LABEL_BROKER}={self.identity}"})
            for info in mine:
                await self._call(self.client.api.remove_container, info["Id"], force=True, v=True)
        except SandboxUnavailable as exc:
            log.error("could not remove this broker's containers on close: %s", exc)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self._client is not None:
                self._client.close()

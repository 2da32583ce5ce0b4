"""The Docker adapter: a ``SandboxBackend`` on the local engine (with docker_hardening.py, the
only modules that import ``docker``).

It runs single-use containers made from the frozen ``SandboxPolicy`` (docker_hardening.py),
enforces the wall-clock deadline itself with ``kill`` (docker-py's ``wait(timeout=)`` is only
an HTTP timeout), and maps Docker's errors to ``SandboxUnavailable`` in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from airlock_broker.sandboxes.confinement import Confinement
from airlock_broker.sandboxes.cpu_weight import CpuWeight
from airlock_broker.sandboxes.docker_hardening import confinement_of, create_kwargs, probe_kwargs
from airlock_broker.sandboxes.exit_watch import FROZEN, ExitWatch
from airlock_broker.sandboxes.freezer import LINGER_SECONDS, thaw_container
from airlock_broker.sandboxes.owners import (
    LABEL_BROKER,
    LABEL_MANAGED,
    LABEL_SLOT,
    PROBE_PROFILE,
    broker_identity,
    is_alive,
    sandbox_labels,
)
from airlock_broker.sandboxes.sandbox import Outcome, SandboxUnavailable, Slot
from airlock_broker.sandboxes.version_gates import (
    Observation,
    binary_version,
    engine_observations,
    from_probe,
)
from airlock_broker.sandboxes.workspace import JobWorkspace, WorkspaceError, slot_spool
from airlock_broker.tracing import NO_TRACE, Trace
from airlock_sandbox.contract import (
    CONTAINER_GID,
    CONTAINER_UID,
    DONE_NAME,
    DOORBELL_RUNTIME_FAMILIES,
    JobSpec,
)
from airlock_sandbox.policy import SandboxPolicy
from airlock_sandbox.seccomp import DOCKER_DEFAULT

log = logging.getLogger(__name__)

T = TypeVar("T")

_INFRA_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)
#: How long a container killed by SIGKILL that no one sent through the engine is looked for
#: among the engine's ``oom`` events, which may come after its exit (``_engine_record``):
#: what an artifact that kills itself waits for its failure, not a job that succeeds.
OOM_EVENT_GRACE_SECONDS = 2.0


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

    async def check(self) -> str:
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
        return self._image_id

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

    async def versions(self, *, image: bool = False) -> dict[str, Observation]:
        """The OCI runtimes' versions (runc as the engine reports it, runsc from the binary
        registered for the policy's runtime, or for "runsc"); with ``image``, the image's
        (``airlock_sandbox/versions.py`` run in a confined throwaway container)."""
        version: dict[str, Any] = await self._call(self.client.version)
        info: dict[str, Any] = await self._call(self.client.info)
        runtimes = info.get("Runtimes", {})
        name = self.policy.runtime if self.policy.runtime_family == "runsc" else "runsc"
        path = runtimes.get(name, {}).get("path")
        runsc_version = await asyncio.get_running_loop().run_in_executor(
            self._pool, binary_version, path) if path else None
        found = engine_observations(version.get("Components") or [], runsc_version)
        if image:
            source = resources.files("airlock_sandbox").joinpath("versions.py").read_text()
            raw = (await self._probe_image(source)).strip()
            found.update(from_probe(json.loads(raw.splitlines()[-1]) if raw else {}, "image"))
        return found

    async def _probe_image(self, source: str, timeout: float = 60.0) -> str:
        """Run ``python3 -c source`` in a throwaway confined container; its stdout. Labelled
        and owned like a slot while it runs: this broker's sweep leaves it alone, and a later
        broker's reaps it if this one dies first."""
        slot_id = uuid.uuid4().hex
        labels = sandbox_labels(self.identity, slot_id, PROBE_PROFILE)
        self._owned.add(slot_id)
        try:
            container = await self._call(self.client.containers.create,
                                         **probe_kwargs(self.policy, source, labels,
                                                        image=self._image_id))
            try:
                await self._call(container.start)
                await self._call(container.wait, timeout=timeout)
                out: bytes = await self._call(container.logs, stdout=True, stderr=False)
                return out.decode(errors="replace")
            finally:
                with contextlib.suppress(SandboxUnavailable):
                    await self._call(container.remove, force=True)
        finally:
            self._owned.discard(slot_id)

    @property
    def image_id(self) -> str:
        return self._image_id

    async def describe(self, slot: Slot) -> Confinement:
        info: dict[str, Any] = await self._call(self.client.api.inspect_container,
                                                slot.container_id)
        return confinement_of(info)

    async def prepare(self, profile: str, *, selftest: bool = False,
                      disk_output_bytes: int = 0, on_disk: bool = False) -> Slot:
        with self.trace.span("container_prepare"):
            return await self._prepare(profile, selftest=selftest,
                                       disk_output_bytes=disk_output_bytes, on_disk=on_disk)

    async def _prepare(self, profile: str, *, selftest: bool, disk_output_bytes: int,
                       on_disk: bool) -> Slot:
        slot_id = uuid.uuid4().hex
        # The slot beside its input (RAM or disk spool); a disk-backed output's image on the
        # disk spool, wherever the slot is.
        make = functools.partial(
            JobWorkspace.create, slot_spool(self.spool_root, on_disk=on_disk), slot_id,
            uid=CONTAINER_UID, gid=CONTAINER_GID,
            output_bytes=disk_output_bytes or self.policy.output_bytes,
            image_root=self.spool_root if disk_output_bytes else None)
        try:
            # mkfs and mount run as processes: not on the event loop.
            workspace = await _made_off_loop(make) if disk_output_bytes else make()
        except (OSError, WorkspaceError) as exc:
            raise SandboxUnavailable(str(exc)) from exc
        if not selftest and self.policy.runtime_family in DOORBELL_RUNTIME_FAMILIES:
            try:
                workspace.make_doorbell()
            except OSError as exc:  # a speed, never a reason to fail: the worker polls
                log.warning("slot %s gets no doorbell: %s", slot_id, exc)
        labels = sandbox_labels(self.identity, slot_id, profile)
        self._owned.add(slot_id)
        create = asyncio.ensure_future(self._call(
            self.client.containers.create,
            **create_kwargs(self.policy, workspace, profile, labels, selftest=selftest,
                            image=self._image_id)))
        try:
            container = await asyncio.shield(create)
        except asyncio.CancelledError:
            # The create goes on in its thread after we are cancelled: wait for it (through
            # further cancellations), remove what it made, then give up, so a cancelled job
            # leaves no container behind.
            made = await _despite_cancels(create)
            if made is not None:
                await _despite_cancels(asyncio.ensure_future(self._call(
                    self.client.api.remove_container, made.id, force=True)))
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
        if self.policy.exit_watch != "engine" and self.policy.runtime_family == "runc":
            info = await self._call(self.client.api.inspect_container, slot.container_id)
            watch = ExitWatch.open(int(info["State"].get("Pid") or 0), slot.container_id,
                                   freeze=self.policy.exit_watch == "freeze")
            slot.exit_watch = watch
            if watch is not None and self.policy.warm_low_priority and not slot.assigned:
                # A warm container waits (and imports) at the lowest weight (cpu_weight.py).
                weight = CpuWeight.of(watch.cgroups, slot.container_id)
                with contextlib.suppress(OSError):
                    if weight is not None:
                        weight.lower()
                        slot.cpu_weight = weight

    async def is_running(self, slot: Slot) -> bool:
        if slot.exit_watch is not None:
            return not slot.exit_watch.exited()
        info = await self._call(self.client.api.inspect_container, slot.container_id)
        return bool(info["State"].get("Running"))

    def warmed_up(self, slot: Slot) -> bool:
        return slot.workspace.worker_ready()

    def let_import(self, slot: Slot) -> None:
        weight = slot.cpu_weight
        if weight is None:
            return
        try:
            weight.let_import()
        except OSError as exc:  # it only imports later (gone by now, or a broken cgroupfs)
            log.debug("could not raise the CPU weight of container %s (%s): %s",
                      slot.container_id[:12], weight.path, exc)

    def hasten(self, slot: Slot) -> None:
        weight, slot.cpu_weight = slot.cpu_weight, None
        if weight is None:
            return
        try:
            weight.restore()
        except OSError as exc:  # it only runs slower (a dead one fails its job anyway)
            log.warning("could not restore the CPU weight of container %s (%s): %s",
                        slot.container_id[:12], weight.path, exc)

    async def hand_over(self, slot: Slot, artifact: Path | Slot, sample: bytes = b"") -> None:
        slot.assigned = True
        if sample:
            slot.workspace.write_sample(sample)
        if isinstance(artifact, Slot):  # the same inode: one upload, two readers
            slot.workspace.link_artifact(artifact.workspace.artifact)
            slot.workspace.share_sample(artifact.workspace)
        else:
            slot.workspace.adopt_artifact(artifact)

    async def output(self, slot: Slot) -> Path:
        return slot.workspace.out_dir

    async def append_only_output(self, slot: Slot, name: str) -> int | None:
        # gVisor's gofer opens a host file for writing without O_APPEND, which the kernel
        # refuses for an append-only one: under runsc the output is hashed once it is whole.
        if self.policy.runtime_family != "runc":
            return None
        try:
            return slot.workspace.append_only_output(name)
        except OSError as exc:  # a speed, never a reason to fail the job
            log.warning("cannot give slot %s an append-only output: %s", slot.slot_id, exc)
            return None

    async def run(self, slot: Slot, spec: JobSpec, deadline_seconds: float) -> Outcome:
        slot.assigned = True  # started here (a cold job, the self-test): at the default weight
        watch = slot.exit_watch
        if watch is not None and watch.freezer is not None:
            # It waits after its report, to be frozen rather than awaited (freezer.py).
            spec = replace(spec, linger_seconds=LINGER_SECONDS)
        with self.trace.span("spec"):
            slot.workspace.write_job_spec(spec)
        try:
            return await self._until_done(slot, deadline_seconds)
        finally:  # nothing in it runs any more: the worker's signals are not outputs
            slot.workspace.forget_marks()

    async def _until_done(self, slot: Slot, deadline_seconds: float) -> Outcome:
        watch = slot.exit_watch
        began = time.monotonic()
        began_wall = int(time.time()) - 1
        if not slot.started:
            await self.start(slot)
        timed_out = False
        try:
            async with asyncio.timeout(deadline_seconds):
                ended = None if watch is None else await watch.wait(
                    slot.workspace.out_dir / DONE_NAME)
                if ended == 0 or ended == FROZEN:
                    # Every process of the container is gone and it exited 0 (the engine
                    # would say the same, 40-60 ms later: exit_watch.py), or it reported and
                    # is frozen: nothing in it runs again (freezer.py).
                    return Outcome(exit_code=0, oom_killed=False, timed_out=False,
                                   duration_seconds=time.monotonic() - began,
                                   image_id=self._image_id, runtime=self.policy.runtime,
                                   exit_seen_by="freezer" if ended == FROZEN else "kernel")
                # The status code is read from inspect below, together with OOMKilled.
                await self._call(self.client.api.wait, slot.container_id)
        except TimeoutError:
            timed_out = True
            if watch is not None:
                # The deadline may have cut a freeze short: frozen tasks ignore the kill.
                watch.kill_and_thaw()
            await self._kill(slot)
            # A container with thousands of processes can take a while to die; if it is still
            # not dead, the forced removal in ``destroy`` finishes it. The verdict stands: the
            # broker's deadline fired.
            with contextlib.suppress(SandboxUnavailable):
                await self._call(self.client.api.wait, slot.container_id, timeout=30)
        duration = time.monotonic() - began
        state = (await self._call(self.client.api.inspect_container, slot.container_id))["State"]
        exit_code = None if timed_out else int(state.get("ExitCode", -1))
        oom_killed, killed_by = bool(state.get("OOMKilled", False)), ""
        if exit_code is not None and exit_code > 128 and not oom_killed:
            oom_killed, killed_by = await self._engine_record(slot, began_wall, exit_code)
        return Outcome(
            exit_code=exit_code,
            killed_by=killed_by,
            oom_killed=oom_killed,
            timed_out=timed_out,
            duration_seconds=duration,
            image_id=self._image_id,
            runtime=self.policy.runtime,
        )

    async def _engine_record(self, slot: Slot, since: int, exit_code: int) -> tuple[bool, str]:
        """What the engine's event log says of a container that died of a signal: whether the
        kernel's OOM killer took it, and who else sent it one (``killed_by``; the broker kills
        only at the deadline, and then it does not ask).

        The engine sets ``OOMKilled`` only if the OOM came before the exit, but logs its
        ``oom`` event whenever it comes; gVisor's shim finds an OOM by polling the cgroup, and
        on a busy machine that came after the exit (a memory bomb under runsc was reported as
        exit 137, ``OOMKilled`` false). So a SIGKILL that no one sent through the engine is
        looked for again, for ``OOM_EVENT_GRACE_SECONDS``."""
        ends = time.monotonic() + OOM_EVENT_GRACE_SECONDS
        while True:
            try:
                events = await self._call(functools.partial(
                    self._events, slot.container_id, since, ("kill", "oom")))
            except SandboxUnavailable as exc:
                log.warning("could not read the engine's events for %s: %s",
                            slot.container_id[:12], exc)
                return False, ""
            if any(e.get("Action", e.get("status")) == "oom" for e in events):
                return True, ""
            signals = sorted({str(e.get("Actor", {}).get("Attributes", {}).get("signal", "?"))
                              for e in events})
            if signals:
                return False, (f"signal {', '.join(signals)} sent through the Docker engine: "
                               "docker kill, docker stop or the engine shutting down")
            if exit_code != 128 + 9 or time.monotonic() >= ends:
                return False, ""
            await asyncio.sleep(0.1)

    def _events(self, container_id: str, since: int,
                kinds: tuple[str, ...]) -> list[dict[str, Any]]:
        return list(self.client.api.events(
            since=since, until=f"{time.time():.6f}", decode=True,
            filters={"container": container_id, "event": list(kinds)}))

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
            # Unmounting and unlinking a slot of GiB (its input on disk, an output image)
            # takes a second or more: off the loop, which serves every other call meanwhile.
            await asyncio.get_running_loop().run_in_executor(None, slot.workspace.destroy)

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
            elif is_alive(owner):
                continue
            try:
                await self._force_remove(info)
                reaped += 1
            except SandboxUnavailable as exc:
                log.warning("could not reap orphan %s: %s", info["Id"][:12], exc)
        if reaped:
            log.info("reaped %d orphaned sandbox container(s)", reaped)
        return reaped

    async def _force_remove(self, info: dict[str, Any]) -> None:
        """Remove a listed container, killing and thawing it first if it may be frozen (a
        frozen one would never die of the engine's kill)."""
        if info.get("State") == "running":
            state = (await self._call(self.client.api.inspect_container, info["Id"]))["State"]
            thaw_container(int(state.get("Pid") or 0), info["Id"])
        await self._call(self.client.api.remove_container, info["Id"], force=True, v=True)

    async def close(self) -> None:
        """Remove every container this broker started, then release the engine connection."""
        try:
            mine = await self._call(self.client.api.containers, all=True,
                                    filters={"label": f"{LABEL_BROKER}={self.identity}"})
            for info in mine:
                await self._force_remove(info)
        except SandboxUnavailable as exc:
            log.error("could not remove this broker's containers on close: %s", exc)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self._client is not None:
                self._client.close()


async def _made_off_loop(make: Callable[[], JobWorkspace]) -> JobWorkspace:
    """``make()`` in a thread. Cancelled meanwhile, the thread goes on (mkfs, a loop mount):
    what it made is destroyed before the cancellation is raised, so a call given up while its
    disk-backed output was being prepared leaves no mount, image or slot behind, however
    often it is cancelled again while it waits for the thread (bounded: each tool has a
    timeout, workspace._run_tool)."""
    making = asyncio.get_running_loop().run_in_executor(None, make)
    try:
        return await asyncio.shield(making)
    except asyncio.CancelledError:
        made = await _despite_cancels(making)
        if made is not None:
            await _despite_cancels(asyncio.ensure_future(asyncio.to_thread(made.destroy)))
        raise


async def _despite_cancels(work: asyncio.Future[T]) -> T | None:
    """``work``'s result once it is done, waiting through any cancellation of the caller (the
    thread behind it goes on regardless, and what it makes must still be undone); None if it
    failed (logged: cleanup never raises)."""
    while not work.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(work)
    if work.cancelled() or work.exception() is not None:
        log.warning("preparing or removing the slot of a cancelled call failed: %r",
                    "cancelled" if work.cancelled() else work.exception())
        return None
    return work.result()

"""A fake sandbox backend for unit tests of the broker's logic (never for integration tests).

``behaviour(spec, artifact_bytes, out_dir)`` plays the worker: it may write files into the
output directory and returns the exit code the fake container "exited" with, or ``None`` to
simulate a container that never finishes (the broker's deadline must then fire).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airlock_broker.api.server import Broker, create_server
from airlock_broker.config import BrokerConfig
from airlock_broker.sandboxes.confinement import Confinement
from airlock_broker.sandboxes.sandbox import Outcome, SandboxUnavailable, Slot
from airlock_broker.sandboxes.version_gates import Observation
from airlock_broker.sandboxes.workspace import JobWorkspace, slot_spool
from airlock_broker.security.state_dirs import ensure_dir
from airlock_sandbox.contract import JobSpec

Behaviour = Callable[[JobSpec, bytes, Path], int | None]


@dataclass
class FakeSandbox:
    spool_root: Path
    behaviour: Behaviour
    unavailable: bool = False
    prepared: int = 0
    live: set[str] = field(default_factory=set)
    specs: list[JobSpec] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)
    image_id: str = "sha256:fake"
    #: slot ids of every job ever run, in order (to prove no slot serves twice)
    ran: list[str] = field(default_factory=list)
    #: the ``disk_output_bytes`` of every prepare, in order (0: the tmpfs)
    disk_outputs: list[int] = field(default_factory=list)
    #: the spool each prepared slot is on, in order (the RAM spool or the disk's)
    slot_spools: list[Path] = field(default_factory=list)
    #: the deadline of every run, in order
    deadlines: list[float] = field(default_factory=list)
    #: slot ids given their default CPU weight back by the pools (``hasten``), in order
    hastened: list[str] = field(default_factory=list)
    #: slot ids let import in their batch by the pools (``let_import``), in order
    let_import_ids: list[str] = field(default_factory=list)

    async def describe(self, slot: Slot) -> Confinement:
        return Confinement()

    async def versions(self, *, image: bool = False) -> dict[str, Observation]:
        return {}

    async def hand_over(self, slot: Slot, artifact: Path | Slot, sample: bytes = b"") -> None:
        if sample:
            slot.workspace.write_sample(sample)
        if isinstance(artifact, Slot):
            slot.workspace.link_artifact(artifact.workspace.artifact)
            slot.workspace.share_sample(artifact.workspace)
        else:
            slot.workspace.adopt_artifact(artifact)

    async def output(self, slot: Slot) -> Path:
        return slot.workspace.out_dir

    async def append_only_output(self, slot: Slot, name: str) -> int | None:
        return None  # the fake's output is a plain directory: hashed once it is whole

    async def prepare(self, profile: str, *, selftest: bool = False,
                      disk_output_bytes: int = 0, on_disk: bool = False) -> Slot:
        if self.unavailable:
            raise SandboxUnavailable("fake engine is down")
        slot_id = uuid.uuid4().hex
        slots = slot_spool(self.spool_root, on_disk=on_disk) / "slots"  # as the real one
        slots.parent.mkdir(parents=True, exist_ok=True)
        ensure_dir(slots)
        root = slots / slot_id
        (root / "in").mkdir(parents=True)
        (root / "out").mkdir()
        self.prepared += 1
        self.disk_outputs.append(disk_output_bytes)
        self.slot_spools.append(slots.parent)
        self.live.add(slot_id)
        ws = JobWorkspace(root=root, uid=os.getuid(), gid=os.getgid())
        return Slot(slot_id=slot_id, profile=profile, workspace=ws, container_id=slot_id)

    async def start(self, slot: Slot) -> None:
        if self.unavailable:
            raise SandboxUnavailable("fake engine is down")
        slot.started = True

    def warmed_up(self, slot: Slot) -> bool:
        return slot.workspace.worker_ready()  # a test plays the worker by writing the mark

    def hasten(self, slot: Slot) -> None:
        self.hastened.append(slot.slot_id)

    def let_import(self, slot: Slot) -> None:
        self.let_import_ids.append(slot.slot_id)

    async def is_running(self, slot: Slot) -> bool:
        return slot.slot_id in self.live and slot.slot_id not in self.dead

    async def run(self, slot: Slot, spec: JobSpec, deadline_seconds: float) -> Outcome:
        assert slot.slot_id not in self.ran, "a slot was handed to a second job"
        self.ran.append(slot.slot_id)
        slot.workspace.write_job_spec(spec)
        self.specs.append(spec)
        self.deadlines.append(deadline_seconds)
        code = self.behaviour(spec, slot.workspace.artifact.read_bytes(), slot.workspace.out_dir)
        timed_out = code is None
        if timed_out:
            await asyncio.sleep(deadline_seconds)
        return Outcome(exit_code=code, oom_killed=code == 137, timed_out=timed_out,
                       duration_seconds=0.01, image_id=self.image_id, runtime="fake")

    async def destroy(self, slot: Slot) -> None:
        self.live.discard(slot.slot_id)
        slot.workspace.destroy()

    async def check(self) -> str:
        if self.unavailable:
            raise SandboxUnavailable("fake engine is down")
        return self.image_id

    async def reap_orphans(self) -> int:
        return 0

    async def close(self) -> None:
        self.live.clear()


@contextmanager
def running_broker(config: BrokerConfig, backend: FakeSandbox) -> Iterator[Broker]:
    """A real gRPC broker on 127.0.0.1:<free port>, on its own event loop in a thread."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Broker] = {}

    def _run() -> None:
        asyncio.set_event_loop(loop)
        holder["broker"] = loop.run_until_complete(create_server(config, backend))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=_run, daemon=True)
    thread.start()
    assert started.wait(10), "broker did not start"
    broker = holder["broker"]
    try:
        yield broker
    finally:
        asyncio.run_coroutine_threadsafe(broker.stop(1.0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def threads_calling(monkeypatch: Any, owner: Any, name: str) -> list[threading.Thread]:
    """Wrap ``owner.name`` so that each call records the thread it ran on: for the checks that
    something slow (a large unlink) runs off the event loop's thread."""
    seen: list[threading.Thread] = []
    original = getattr(owner, name)

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return seen


class FakeEngine:
    """``docker.DockerClient`` as ``DockerSandbox`` uses it, at a fake low-level ``api``: the
    Docker API calls a test plays (``wait``, ``inspect_container``, ``events``...)."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def close(self) -> None:
        pass


def run_at_engine(api: Any, slot: Slot, spool: Path, deadline_seconds: float) -> Outcome:
    """``slot``'s job run by a ``DockerSandbox`` whose engine is ``api`` (``FakeEngine``), its
    thread pool shut down after."""
    from airlock_broker.sandboxes.docker_sandbox import DockerSandbox
    from airlock_sandbox.policy import SandboxPolicy

    sandbox = DockerSandbox(SandboxPolicy(), spool, client=FakeEngine(api))

    async def run() -> Outcome:
        try:
            return await sandbox.run(slot, JobSpec(job_id="j"), deadline_seconds=deadline_seconds)
        finally:
            sandbox._pool.shutdown(wait=False)

    return asyncio.run(run())

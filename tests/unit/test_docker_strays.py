"""The Docker adapter, at a fake Docker API: the sweep (dead brokers' orphans and this broker's
strays go, the rest stays) and the deadline kill.

A stray is a container with this broker's label whose slot the broker no longer owns: a create
whose answer was lost, or a removal that failed while the engine was away. A fake Docker API
client stands at the seam (only the two calls the sweep makes).
"""

from __future__ import annotations

import asyncio
import os
import types
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import requests

from airlock_broker.sandboxes.docker_sandbox import DockerSandbox
from airlock_broker.sandboxes.owners import LABEL_BROKER, LABEL_SLOT, broker_identity
from airlock_sandbox.policy import SandboxPolicy
from tests.unit.fakes import FakeEngine, run_at_engine


class FakeApi:
    def __init__(self, containers: list[dict[str, Any]]) -> None:
        self.listed = containers
        self.removed: list[str] = []

    def containers(self, all: bool, filters: dict[str, str]) -> list[dict[str, Any]]:
        return self.listed

    def remove_container(self, container_id: str, force: bool, v: bool) -> None:
        self.removed.append(container_id)


def _container(cid: str, owner: str, slot: str) -> dict[str, Any]:
    return {"Id": cid, "Labels": {"airlock.managed": "true", LABEL_BROKER: owner,
                                  LABEL_SLOT: slot}}


def test_sweep_removes_strays_and_dead_brokers_orphans_only(tmp_path: Path) -> None:
    me = broker_identity()
    alive_other = broker_identity(1)  # PID 1 lives
    dead = me.rsplit(":", 2)[0] + ":999999999:12345"
    api = FakeApi([
        _container("owned", me, "slot-owned"),
        _container("stray", me, "slot-lost"),
        _container("orphan", dead, "x"),
        _container("neighbour", alive_other, "y"),
    ])
    sandbox = DockerSandbox(SandboxPolicy(), tmp_path, client=FakeEngine(api))  # type: ignore[arg-type]
    sandbox._owned.add("slot-owned")

    async def sweep() -> int:
        try:
            return await sandbox.reap_orphans()
        finally:
            await sandbox.close()

    assert asyncio.run(sweep()) == 2
    assert sorted(api.removed[:2]) == ["orphan", "stray"]


def test_identity_is_this_process() -> None:
    assert broker_identity().split(":")[1] == str(os.getpid())


# -- the deadline kill ---------------------------------------------------------------------------


class SlowToDieApi(FakeApi):
    """A container that outlives the deadline, and an engine whose first kills time out."""

    def __init__(self, failed_kills: int) -> None:
        super().__init__([])
        self.failed_kills = failed_kills
        self.kills = 0

    def start(self, container_id: str) -> None:
        pass

    def wait(self, container_id: str, timeout: float | None = None) -> dict[str, int]:
        if self.kills <= self.failed_kills:
            import time
            time.sleep(0.5 if timeout else 5)  # still running
            raise requests.exceptions.ReadTimeout("read timed out")
        return {"StatusCode": 137}

    def kill(self, container_id: str) -> None:
        self.kills += 1
        if self.kills <= self.failed_kills:
            response = requests.Response()
            response.status_code = 500
            raise docker.errors.APIError(
                "500 Server Error", response=response,
                explanation="Cannot kill container: tried to kill container, but did not "
                            "receive an exit event")

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        return {"State": {"Running": False, "ExitCode": 137, "OOMKilled": False}}


def test_a_kill_the_engine_could_not_confirm_is_still_a_timeout(tmp_path: Path) -> None:
    from airlock_broker.sandboxes.sandbox import Slot
    from airlock_broker.sandboxes.workspace import JobWorkspace

    root = tmp_path / "slot"
    (root / "in").mkdir(parents=True)
    slot = Slot(slot_id="s", profile="sklearn", container_id="c", started=True,
                workspace=JobWorkspace(root=root, uid=os.getuid(), gid=os.getgid()))
    api = SlowToDieApi(failed_kills=2)  # a fork bomb: the engine gives up waiting twice
    outcome = run_at_engine(api, slot, tmp_path, deadline_seconds=0.2)
    assert outcome.timed_out and api.kills == 3


def test_a_slots_files_are_removed_off_the_event_loop(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot of GiB (an input on the disk spool, an output image) takes the kernel a second
    or more to unlink: ``destroy`` does it on a worker thread, and the loop serves on."""
    import threading

    from airlock_broker.sandboxes.sandbox import Slot
    from airlock_broker.sandboxes.workspace import JobWorkspace
    from tests.unit.fakes import threads_calling

    root = tmp_path / "slots" / "s"
    (root / "in").mkdir(parents=True)
    (root / "in" / "artifact").write_bytes(b"weights")
    slot = Slot(slot_id="s", profile="torch", container_id="c", started=True,
                workspace=JobWorkspace(root=root, uid=os.getuid(), gid=os.getgid()))
    removed_on = threads_calling(monkeypatch, JobWorkspace, "destroy")
    api = FakeApi([])
    sandbox = DockerSandbox(SandboxPolicy(), tmp_path, client=FakeEngine(api))  # type: ignore[arg-type]

    async def run() -> None:
        try:
            await sandbox.destroy(slot)
        finally:
            sandbox._pool.shutdown(wait=False)

    asyncio.run(run())
    assert api.removed == ["c"] and not root.exists()
    assert removed_on and threading.main_thread() not in removed_on, removed_on


def test_a_call_given_up_while_its_disk_output_is_made_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mkfs and the loop mount go on in their thread after the call is cancelled: what they
    made is destroyed (before: a mount, an image and a slot stayed until the broker's next
    start)."""
    import threading

    from airlock_broker.sandboxes import docker_sandbox

    started, proceed, destroyed = threading.Event(), threading.Event(), threading.Event()

    class Made:
        def destroy(self) -> None:
            destroyed.set()

    def slow_create(*args: Any, **kwargs: Any) -> Made:
        started.set()
        proceed.wait(60)  # mkfs taking its time
        return Made()

    monkeypatch.setattr(docker_sandbox.JobWorkspace, "create", slow_create)
    sandbox = DockerSandbox(SandboxPolicy(), tmp_path, client=FakeEngine(FakeApi([])))  # type: ignore[arg-type]

    async def run() -> None:
        try:
            task = asyncio.ensure_future(sandbox.prepare("torch", disk_output_bytes=1 << 30))
            assert await asyncio.to_thread(started.wait, 60)
            task.cancel()
            proceed.set()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            sandbox._pool.shutdown(wait=False)

    asyncio.run(run())
    assert destroyed.wait(60)


def test_marks_the_sandbox_made_directories_of_do_not_fail_the_job(tmp_path: Path) -> None:
    """A payload can ``mkdir /airlock/out/worker.done``: forgetting the marks after the run
    must not raise (it was an internal error, which clients retry)."""
    from airlock_broker.sandboxes.workspace import JobWorkspace
    from airlock_sandbox.contract import DONE_NAME, READY_NAME

    workspace = JobWorkspace(root=tmp_path, uid=os.getuid(), gid=os.getgid())
    workspace.out_dir.mkdir()
    (workspace.out_dir / DONE_NAME).mkdir()
    (workspace.out_dir / READY_NAME).mkdir()
    workspace.forget_marks()
    (workspace.out_dir / DONE_NAME).rmdir()
    (workspace.out_dir / READY_NAME).rmdir()
    (workspace.out_dir / DONE_NAME).write_bytes(b"")  # as the worker makes them
    (workspace.out_dir / READY_NAME).write_bytes(b"")
    workspace.forget_marks()
    assert list(workspace.out_dir.iterdir()) == []


def test_a_call_cancelled_twice_while_its_disk_output_is_made_still_leaves_nothing(
        tmp_path: Path) -> None:
    """A second cancellation (the client's cancel, then the server's shutdown) while the first
    waits for mkfs used to escape the cleanup: the thread's workspace, a mounted image, was
    never destroyed. Now the cleanup waits through it, and the call still ends cancelled."""
    import threading

    from airlock_broker.sandboxes import docker_sandbox

    started, proceed, destroyed = threading.Event(), threading.Event(), threading.Event()

    class Made:
        def destroy(self) -> None:
            destroyed.set()

    def slow_make() -> Made:
        started.set()
        assert proceed.wait(60)  # mkfs taking its time
        return Made()

    async def run() -> None:
        task = asyncio.ensure_future(docker_sandbox._made_off_loop(slow_make))  # type: ignore[arg-type]
        assert await asyncio.to_thread(started.wait, 60)
        task.cancel()
        for _ in range(5):  # no clock involved: the task takes the first cancellation
            await asyncio.sleep(0)
        assert not task.done()
        task.cancel()
        for _ in range(5):  # and is waiting for the thread again
            await asyncio.sleep(0)
        proceed.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert destroyed.wait(60)


def test_a_prepare_cancelled_twice_while_its_container_is_created_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for the container: the create goes on in its thread through both
    cancellations, and what it made is removed at once (before: the second cancellation
    escaped, and the container stayed until the sweep found it a stray)."""
    import threading

    from airlock_broker.sandboxes import docker_sandbox
    from airlock_broker.sandboxes.workspace import JobWorkspace

    workspace = JobWorkspace(root=tmp_path / "slot", uid=os.getuid(), gid=os.getgid())
    workspace.in_dir.mkdir(parents=True)
    monkeypatch.setattr(docker_sandbox.JobWorkspace, "create",
                        lambda *args, **kwargs: workspace)
    started, proceed = threading.Event(), threading.Event()
    removed: list[str] = []

    def slow_create(**kwargs: Any) -> Any:
        started.set()
        assert proceed.wait(60)  # an engine under load
        return types.SimpleNamespace(id="made")

    api = types.SimpleNamespace(remove_container=lambda cid, force: removed.append(cid))
    client = types.SimpleNamespace(api=api, containers=types.SimpleNamespace(create=slow_create),
                                   close=lambda: None)
    sandbox = DockerSandbox(SandboxPolicy(), tmp_path, client=client)  # type: ignore[arg-type]

    async def run() -> None:
        try:
            task = asyncio.ensure_future(sandbox.prepare("light"))
            assert await asyncio.to_thread(started.wait, 60)
            task.cancel()
            for _ in range(5):  # no clock involved: the task takes the first cancellation
                await asyncio.sleep(0)
            assert not task.done()
            task.cancel()
            for _ in range(5):
                await asyncio.sleep(0)
            proceed.set()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            sandbox._pool.shutdown(wait=False)

    asyncio.run(run())
    assert removed == ["made"]
    assert not workspace.root.exists() and not sandbox._owned


# -- the version probe's container -----------------------------------------------------------


class _ListingApi(FakeApi):
    """The engine's list, with the label filter applied as the engine does."""

    def containers(self, all: bool, filters: dict[str, str]) -> list[dict[str, Any]]:
        key, _, value = filters["label"].partition("=")
        return [c for c in self.listed if (c.get("Labels") or {}).get(key) == value]

    def remove_container(self, container_id: str, force: bool, v: bool) -> None:
        super().remove_container(container_id, force, v)
        self.listed = [c for c in self.listed if c["Id"] != container_id]


class _ProbeEngine(FakeEngine):
    """``containers.create`` of a probe whose broker dies before its removal reaches the
    engine: the probe stays listed, with the labels it was created with."""

    def __init__(self) -> None:
        super().__init__(_ListingApi([]))
        self.containers = types.SimpleNamespace(create=self._create)
        #: Whether the broker owned the probe's slot while the probe ran.
        self.owned_while_running: bool | None = None
        self.owner: DockerSandbox | None = None

    def _create(self, **kwargs: Any) -> Any:
        info = {"Id": f"probe{len(self.api.listed)}", "Labels": dict(kwargs["labels"]),
                "State": "exited"}
        self.api.listed.append(info)

        def wait(timeout: float) -> dict[str, int]:
            assert self.owner is not None
            self.owned_while_running = info["Labels"].get(LABEL_SLOT, "") in self.owner._owned
            return {"StatusCode": 0}

        return types.SimpleNamespace(start=lambda: None, wait=wait, logs=lambda **kw: b"{}\n",
                                     remove=lambda force: None)


def test_a_probe_left_by_a_dead_broker_is_reaped_by_the_next(tmp_path: Path) -> None:
    """The image's version probe carried only ``airlock.broker``: the sweep lists
    ``airlock.managed`` containers, so a probe orphaned by a broker that died while it ran
    was never reaped. It carries a sandbox's labels now, and its slot is owned while it runs
    (so its own broker's sweep does not take it for a stray)."""
    engine = _ProbeEngine()
    dead = broker_identity().rsplit(":", 2)[0] + ":999999999:12345"
    first = DockerSandbox(SandboxPolicy(), tmp_path, client=engine)  # type: ignore[arg-type]
    first.identity = dead  # the broker that will have died
    engine.owner = first
    later = DockerSandbox(SandboxPolicy(), tmp_path, client=engine)  # type: ignore[arg-type]

    async def run() -> int:
        try:
            await first._probe_image("print('{}')")
            return await later.reap_orphans()
        finally:
            first._pool.shutdown(wait=False)
            later._pool.shutdown(wait=False)

    assert asyncio.run(run()) == 1
    assert engine.api.removed == ["probe0"] and engine.api.listed == []
    assert engine.owned_while_running is True and not first._owned

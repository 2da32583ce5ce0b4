"""The seam between a job and whatever runs sandboxes (Docker today; a fake in unit tests).

A ``Slot`` is one container with its own fresh workspace, used for exactly one job and then
destroyed (DESIGN §1.2). The cold path prepares a slot when a job needs it; a warm pool
prepares and starts slots ahead of time. Either way the job does the same thing: put the
artifact and the job spec into ``slot.workspace``, ``run`` it, read the outcome, ``destroy`` it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from airlock_broker.sandboxes.exit_watch import ExitWatch
from airlock_broker.sandboxes.workspace import JobWorkspace
from airlock_sandbox.contract import JobSpec


class SandboxUnavailable(RuntimeError):
    """The sandbox infrastructure is down or misconfigured (engine unreachable, image missing)."""


@dataclass
class Slot:
    """One single-use container and its workspace. Owned by one job at a time."""

    slot_id: str
    profile: str
    workspace: JobWorkspace
    container_id: str
    started: bool = False
    #: The kernel's view of the container's death (runc, recent kernels); None: ask the engine.
    exit_watch: ExitWatch | None = None


@dataclass(frozen=True)
class Outcome:
    """What the broker observed itself: never what the container said about itself."""

    exit_code: int | None
    oom_killed: bool
    timed_out: bool
    duration_seconds: float
    image_id: str
    runtime: str
    #: Set when the engine recorded a kill the broker did not send (``docker kill``, ``docker
    #: stop``, an engine shutdown): which signal, through what. Empty otherwise.
    killed_by: str = ""
    #: Who reported the end: "kernel" (a clean exit seen through a pidfd, exit_watch.py),
    #: "freezer" (a report, then the container frozen: freezer.py) or "engine" (Docker's wait
    #: and inspect).
    exit_seen_by: str = "engine"


class SandboxBackend(Protocol):
    """Runs single-use sandboxes. Infrastructure failures raise ``SandboxUnavailable``."""

    async def prepare(self, profile: str, *, selftest: bool = False) -> Slot:
        """Create (not start) a container with a fresh workspace (or the isolation probe)."""
        ...

    async def inspect(self, slot: Slot) -> dict[str, Any]:
        """The engine's view of the slot's container configuration (``docker inspect``)."""
        ...

    async def start(self, slot: Slot) -> None:
        """Start a prepared slot before any job is assigned (warm pools)."""
        ...

    async def is_running(self, slot: Slot) -> bool:
        """Whether a started slot's container is still alive (a warm one may have died)."""
        ...

    async def current_image_id(self) -> str:
        """The id the configured image tag points at now (it changes after ``make image``)."""
        ...

    async def run(self, slot: Slot, spec: JobSpec, deadline_seconds: float) -> Outcome:
        """Hand ``spec`` to the slot, start it if needed, wait for death or kill at the deadline."""
        ...

    async def destroy(self, slot: Slot) -> None:
        """Remove the container and the workspace. Never raises."""
        ...

    async def check(self) -> None:
        """Raise ``SandboxUnavailable`` unless the engine answers and the image exists."""
        ...

    async def reap_orphans(self) -> int:
        """Remove containers that carry Airlock's labels but no live broker owns."""
        ...

    async def close(self) -> None:
        """Remove every container this backend started and release its resources."""
        ...

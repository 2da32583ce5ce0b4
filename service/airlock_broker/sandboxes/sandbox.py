"""The seam between a job and whatever runs sandboxes (Docker today; a fake in unit tests).

A ``Slot`` is one container with its own fresh workspace, used for exactly one job and then
destroyed (DESIGN §1.2). The cold path prepares a slot when a job needs it; a warm pool
prepares and starts slots ahead of time. Either way the job does the same thing: put the
artifact and the job spec into ``slot.workspace``, ``run`` it, read the outcome, ``destroy`` it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from airlock_broker.sandboxes.confinement import Confinement
from airlock_broker.sandboxes.cpu_weight import CpuWeight
from airlock_broker.sandboxes.exit_watch import ExitWatch
from airlock_broker.sandboxes.version_gates import Observation
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
    #: Set by ``hand_over`` and ``run``: a job (or the self-test) has it.
    assigned: bool = False
    #: While it waits in a pool at the lowest CPU weight: its control (cpu_weight.py).
    cpu_weight: CpuWeight | None = None


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
    """Runs single-use sandboxes. Infrastructure failures raise ``SandboxUnavailable``; what a
    payload does (a crash, a timeout, an OOM kill) comes back as an ``Outcome``.

    A job: ``prepare`` (and ``start``, ahead of time, for a warm pool), ``hand_over`` the
    artifact, perhaps an ``append_only_output`` to follow, ``run`` the spec, read ``output``
    once it is dead, ``destroy``. Upkeep:
    ``is_running``, ``warmed_up``, ``hasten``, ``let_import``, ``check``, ``reap_orphans``,
    ``close``. The self-test and the version gates: ``describe``, ``versions``. Nothing above
    this interface knows which engine runs the sandboxes (docs/scale-out.md maps each verb
    onto a Kubernetes pod per job).
    """

    async def prepare(self, profile: str, *, selftest: bool = False,
                      disk_output_bytes: int = 0, on_disk: bool = False) -> Slot:
        """A fresh, single-use sandbox for ``profile``, created but not started (with
        ``selftest``: the isolation probe instead of a worker). ``disk_output_bytes``: its
        output is a disk-backed filesystem of that size instead of the policy's tmpfs (an
        output too large for RAM; its image is on the disk spool). Its slot is on the RAM
        spool when one is mounted, unless ``on_disk`` (an input spooled on disk) says
        otherwise (workspace.slot_spool)."""
        ...

    async def start(self, slot: Slot) -> None:
        """Start a prepared slot before any job is assigned (warm pools): its worker imports
        its profile's libraries and waits for a job spec."""
        ...

    def hasten(self, slot: Slot) -> None:
        """Give a started slot that waits at a low CPU priority (a warm container:
        cpu_weight.py) the default one; nothing when it has it. The pools call it when they
        hand out a warmed-up slot, before its job is handed over. Cheap, never raises."""
        ...

    def let_import(self, slot: Slot) -> None:
        """Raise a started slot that waits at the lowest CPU priority to the one its batch of
        refills imports at (import_batches.py, cpu_weight.py); nothing when its priority is
        not the broker's to set, and nothing once ``hasten`` gave it the default (a job's
        container is never lowered). Cheap, never raises."""
        ...

    def warmed_up(self, slot: Slot) -> bool:
        """Whether a started slot's worker says it has imported and primed its profile and
        waits for a job. The sandbox's word: a hint for pool status, for a CPU weight and for
        which of a pool's identical slots a job gets first (speeds), never for a decision on
        what runs where (a slot that never says so serves jobs all the same). Cheap, never
        raises."""
        ...

    async def hand_over(self, slot: Slot, artifact: Path | Slot, sample: bytes = b"") -> None:
        """Put the artifact in the slot, read-only to the sandbox: a spooled file (moved in:
        the slot owns it from here), or the artifact already in another slot of the same job
        (shared, for the integrity extraction, with that slot's parity sample if any).
        ``sample``: the caller's parity sample, written beside it (contract.SAMPLE_NAME)."""
        ...

    async def append_only_output(self, slot: Slot, name: str) -> int | None:
        """Before ``run``: an empty output file ``name`` its sandbox can only append to, and
        a read-only descriptor for the broker to follow it by as it is written (the caller
        closes it); None where the runtime or the output's filesystem cannot give one."""
        ...

    async def run(self, slot: Slot, spec: JobSpec, deadline_seconds: float) -> Outcome:
        """Hand ``spec`` to the slot (last), start it if needed, and return once every process
        of it is gone, killing it at the deadline."""
        ...

    async def output(self, slot: Slot) -> Path:
        """The directory the dead sandbox wrote its output in, for the broker to validate as
        hostile data. Only after ``run`` has returned; bounded by the policy's output cap."""
        ...

    async def destroy(self, slot: Slot) -> None:
        """Nothing of the slot remains (sandbox, workspace, output). Never raises."""
        ...

    async def is_running(self, slot: Slot) -> bool:
        """Whether a started slot is still alive (a warm one may have died)."""
        ...

    async def check(self) -> str:
        """Raise ``SandboxUnavailable`` unless the engine answers and can run the policy's
        image; return the id the image's tag points at now (it changes after ``make
        image``)."""
        ...

    async def reap_orphans(self) -> int:
        """Remove sandboxes that carry Airlock's labels but no live broker owns."""
        ...

    async def close(self) -> None:
        """Remove every sandbox this backend started and release its resources."""
        ...

    async def describe(self, slot: Slot) -> Confinement:
        """The confinement the engine actually applied to a prepared slot, read back from it
        (never from the policy): what the self-test's configuration checks judge."""
        ...

    async def versions(self, *, image: bool = False) -> dict[str, Observation]:
        """The sandbox runtime's versions for the version gates (version_gates.py); with
        ``image``, also the image's, read by a probe run in a sandbox confined like a job's."""
        ...

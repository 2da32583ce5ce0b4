"""A warm container's CPU weight: the lowest while it imports and waits in a pool, the
default once a job takes it warmed up.

A pool's refill imports its profile's libraries, about 0.5 CPU-second for a sklearn container
(bench.profile). Back-to-back jobs run in warm containers beside the refills they set off, and
the kernel shares the CPU between runnable cgroups by their weights. With equal weights, on
this project's 2-core machine, a job that found a warmed-up container took 70-300 ms in it
instead of 20-30 (bench.profile --phases S1b): the refills took the CPU. So a warm container
starts at the lowest weight the kernel offers (cgroup v1 ``cpu.shares`` 2, v2 ``cpu.weight``
1), and the pools write the default back when they hand one that says it is warmed up to a
job, before its spec exists (pools.py ``_take_warm``). A container a job takes while it still
imports stays among the refills at their weight: raising it alone made each job wait for one
container's imports on one core while the others stood still, so that every job after a
burst's stock waited ~0.6 s, where equal refills get ready together and serve the next jobs
at once (measured in stop 40: docs/operations.md). A weight never changes what a container
may do (its ``nano_cpus`` cap holds either way): it only orders who runs first when the CPU
is short. Nothing about the weight is the container's to change: it cannot write cgroupfs.

Between the two, a refill that the pools let import in its batch (import_batches.py) runs
at a middle weight, ahead of the refills held for the next batch.

On by default (``[sandbox] warm_low_priority``). Only for runc with the kernel exit watch: the
cgroup is found in ``/proc/PID/cgroup`` read while a pidfd proved the container's init alive,
as the freezer's is (exit_watch.py, cgroup_paths.py).
"""

from __future__ import annotations

from pathlib import Path

from airlock_broker.sandboxes.cgroup_paths import CGROUP_ROOT, container_cgroups, write_control

#: (control file, lowest, importing, default) for cgroup v1 and v2. Importing: a warm
#: container let import its libraries in its batch (import_batches.py), 8 times the weight of
#: one held for the next batch and a 64th (v2: a 12th) of a job's.
_V1 = ("cpu.shares", b"2", b"16", b"1024")
_V2 = ("cpu.weight", b"1", b"8", b"100")


class CpuWeight:
    """One container's CPU weight control file."""

    def __init__(self, path: Path, lowest: bytes, importing: bytes, default: bytes) -> None:
        self.path = path
        self.lowest = lowest
        self.importing = importing
        self.default = default

    @classmethod
    def of(cls, cgroups: str, container_id: str, root: Path = CGROUP_ROOT) -> CpuWeight | None:
        """The weight of the process whose ``/proc/PID/cgroup`` is ``cgroups``, if its path
        names ``container_id`` and the control file exists; else None."""
        for controllers, path in container_cgroups(cgroups, container_id):
            if "cpu" in controllers.split(","):  # v1: mounted as "cpu" or "cpu,cpuacct"
                for mount in (controllers, "cpu"):
                    control = root / mount / path / _V1[0]
                    if control.is_file():
                        return cls(control, *_V1[1:])
            elif controllers == "":
                control = root / path / _V2[0]
                if control.is_file():
                    return cls(control, *_V2[1:])
        return None

    def lower(self) -> None:
        """The lowest weight. Raises OSError."""
        self._write(self.lowest)

    def let_import(self) -> None:
        """The importing weight (above the lowest, far below the default). Raises OSError."""
        self._write(self.importing)

    def restore(self) -> None:
        """The default weight. Raises OSError."""
        self._write(self.default)

    def _write(self, value: bytes) -> None:
        write_control(self.path, value)

"""A warm container's CPU weight: the lowest while it waits in a pool behind older refills,
the default once a job takes it or it is among the pool's oldest importing ones.

A pool's refill imports its profile's libraries, about 1.4 CPU-seconds for a sklearn
container (bench.profile). Back-to-back jobs run in warm containers beside those refills, and
the kernel shares the CPU between runnable cgroups by their weights. With equal weights, on
this project's 2-core machine, a burst served from a stock of 16 warm containers still waited
100-600 ms a job (the refills it set off took the CPU), and the job after the stock waited
10 s: sixteen refills shared two cores and all got ready at once, at the end. So a warm
container starts at the lowest weight the kernel offers (cgroup v1 ``cpu.shares`` 2, v2
``cpu.weight`` 1), and the broker writes the default back when a job takes it (``hand_over``,
before its spec exists) and when it becomes one of its pool's oldest importing containers,
one per core (pools.py ``_give_lanes``): refills get ready one after another, in the order
they started. A weight never changes what a container may do (its ``nano_cpus`` cap holds
either way): it only orders who runs first when the CPU is short. Nothing about the weight is
the container's to change: it cannot write cgroupfs.

Off by default (``[sandbox] warm_low_priority``): a burst that runs the pool dry pays for it
(docs/operations.md). Only for runc with the kernel exit watch: the cgroup is found in
``/proc/PID/cgroup`` read while a pidfd proved the container's init alive, as the freezer's is
(exit_watch.py, cgroup_paths.py).
"""

from __future__ import annotations

from pathlib import Path

from airlock_broker.sandboxes.cgroup_paths import CGROUP_ROOT, container_cgroups, write_control

#: (control file, lowest, default) for cgroup v1 and v2.
_V1 = ("cpu.shares", b"2", b"1024")
_V2 = ("cpu.weight", b"1", b"100")


class CpuWeight:
    """One container's CPU weight control file."""

    def __init__(self, path: Path, lowest: bytes, default: bytes) -> None:
        self.path = path
        self.lowest = lowest
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

    def restore(self) -> None:
        """The default weight. Raises OSError."""
        self._write(self.default)

    def _write(self, value: bytes) -> None:
        write_control(self.path, value)

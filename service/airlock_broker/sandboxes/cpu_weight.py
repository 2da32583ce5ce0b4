"""A warm container's CPU weight: the lowest while it waits in a pool, the default once a job
takes it.

A pool's refill imports its profile's libraries, about 1.4 CPU-seconds for a sklearn
container (bench.profile). Back-to-back jobs run in warm containers beside those refills,
and the kernel shares the CPU between runnable cgroups by their weights: with equal weights,
two refills on this project's 2-core machine took most of it from the job being answered, so
a burst served entirely from warm containers still waited 100-600 ms a job (bench S1b2). A
refill's progress matters only once no warm container is left, so it runs at the lowest
weight the kernel offers (cgroup v1 ``cpu.shares`` 2, v2 ``cpu.weight`` 1); the broker writes
the default back when a job takes the container (``hand_over``, before its spec exists), so
a job, and a container a job waits for, runs at full weight. A weight never changes what a
container may do: it only orders who runs first when the CPU is short. Nothing about the
weight is the container's to change: it cannot write cgroupfs.

Only for runc with the kernel exit watch (``[sandbox] warm_low_priority``): the cgroup is found
in ``/proc/PID/cgroup`` read while a pidfd proved the container's init alive, as the
freezer's is (exit_watch.py). Elsewhere warm containers keep the default weight.
"""

from __future__ import annotations

import os
from pathlib import Path

from airlock_broker.sandboxes.cgroup_paths import CGROUP_ROOT, container_cgroups

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
        # O_TRUNC as a shell's ">" opens it (kernfs ignores it; a test's plain file needs it).
        fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)

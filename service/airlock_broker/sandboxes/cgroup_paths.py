"""A container's cgroups, from its init's ``/proc/PID/cgroup`` (read while a pidfd proved that
process alive: exit_watch.py): the controls the broker writes itself (freezer.py,
cpu_weight.py) are found here and nowhere else."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def container_cgroups(cgroups: str, container_id: str) -> Iterator[tuple[str, str]]:
    """``(controllers, path)`` of each line whose path names ``container_id`` and does not
    climb (``..``): ``controllers`` as the line has it (``"cpu,cpuacct"``; ``""`` on cgroup
    v2), ``path`` relative (no leading ``/``)."""
    for line in cgroups.splitlines():
        _hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if container_id in path and ".." not in path.split("/"):
            yield controllers, path.lstrip("/")


def write_control(path: Path, value: bytes) -> None:
    """Write ``value`` into one cgroup control file, as a shell's ``>`` would (``O_TRUNC``:
    kernfs ignores it, a test's plain file needs it), never through a symbolic link. Raises
    OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, value)
    finally:
        os.close(fd)

"""Which filesystem a descriptor lives on, found without asking that filesystem.

Why: a peer of the same-host fast path can hand the broker a file on a FUSE (or network)
filesystem whose daemon never answers. Every read of it then blocks a broker thread in the
kernel for ever, and so does ``close`` (FUSE sends FLUSH and waits). The broker accepts
descriptors only on local filesystems from an allowlist.

Not ``fstatfs``: on FUSE it sends STATFS to the daemon and waits (seen: a stalled daemon
blocks it until the connection is aborted), so the check itself would hang. The kernel's own
tables answer instead: ``/proc/self/fdinfo/<fd>`` gives the descriptor's mount id, and a
``mountinfo`` table gives that mount's filesystem type. Neither reaches the filesystem. Mount
ids are unique on the host while the mount exists (and the descriptor keeps it alive), so a
mount the broker cannot see in its own namespace is looked up in the peer's (a client in a
container); one found nowhere (a detached mount, a ``memfd``, a pipe) is refused.

The types are those of ``mountinfo`` (``ext4``, ``fuse.sshfs``, ``nfs4``...). An overlay
whose lower layer is on FUSE still says ``overlay``: the allowlist is the first bound, the
fast path's own bounded threads and deadlines (peer_io.py) are the second.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

#: Local, kernel-backed filesystems whose reads end: ext2/3/4 (one driver), xfs, btrfs,
#: tmpfs, overlay (container roots). Extend it in ``[local_transfer] allowed_filesystems``
#: (e.g. "zfs", "f2fs"); never with FUSE or network filesystems.
DEFAULT_ALLOWED = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay"})

_PROC = Path("/proc")


def mount_id(fd: int, proc: Path = _PROC) -> int:
    """The id of the mount ``fd`` was opened on (``mnt_id`` of its fdinfo, Linux >= 3.15)."""
    for line in (proc / "self" / "fdinfo" / str(fd)).read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "mnt_id":
            return int(value)
    raise OSError(f"no mnt_id in the fdinfo of descriptor {fd}")


def mount_types(mountinfo: str) -> dict[int, str]:
    """``mount id -> filesystem type`` from a ``mountinfo`` table (proc(5)): the id is the
    first field, the type the first after the `` - `` separator (mount points are escaped,
    ``\\040`` for a space, so the separator is unambiguous)."""
    types: dict[int, str] = {}
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split(" ", 1)
        if not sep or not tail or not fields[0].isdigit():
            continue
        types[int(fields[0])] = tail.split(" ", 1)[0]
    return types


def filesystem_of(fd: int, peer_pid: int | None = None, proc: Path = _PROC) -> str | None:
    """The filesystem type of ``fd``, or None if its mount is in no table the broker can read
    (its own mount namespace's, then the peer's)."""
    mnt = mount_id(fd, proc)
    tables = [proc / "self" / "mountinfo"]
    if peer_pid is not None and peer_pid > 0:
        tables.append(proc / str(peer_pid) / "mountinfo")
    for table in tables:
        with contextlib.suppress(OSError):  # the peer may be gone: then only ours counts
            found = mount_types(table.read_text()).get(mnt)
            if found is not None:
                return found
    return None

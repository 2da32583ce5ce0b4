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

Both are read as far as needed and no further: a table is read line by line up to the
mount, at most ``MAX_TABLE_BYTES`` (an unprivileged user can stack thousands of mounts with
long names in a namespace of their own: a 408 MB table, read whole twice per hand-over, took
the broker to 941 MiB), and a descriptor's fdinfo only its first lines (an epoll or inotify
descriptor's runs to megabytes).

An output is written by the broker's own thread, so on a memory-backed filesystem (tmpfs,
or an overlay whose upper layer may be one) its pages are charged to the broker's memory,
and stay charged for as long as the user keeps the file: outputs are accepted on disk
filesystems only (``DEFAULT_OUTPUTS``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

#: Local, kernel-backed filesystems whose reads end: ext2/3/4 (one driver), xfs, btrfs,
#: tmpfs, overlay (container roots). Extend it in ``[local_transfer] allowed_filesystems``
#: (e.g. "zfs", "f2fs", and in ``output_filesystems`` too for outputs there); never with
#: FUSE or network filesystems.
DEFAULT_ALLOWED = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay"})

#: Where an output may be written by the broker: disk filesystems (see above).
DEFAULT_OUTPUTS = DEFAULT_ALLOWED - {"tmpfs", "overlay"}
#: The most of one mount table read (about 28,000 mounts of 150 bytes); past it the mount is
#: not looked for further, and the descriptor is refused.
MAX_TABLE_BYTES = 4 * 1024**2
#: The longest line of a mount table taken as one: a longer one makes the table unreadable
#: (the descriptor is refused, its client streams) rather than split, since a piece cut from
#: it could read as another mount's line.
_MAX_LINE = 64 * 1024
#: How much of a descriptor's fdinfo is read: ``mnt_id`` is on its third line.
_FDINFO_HEAD = 4096

_PROC = Path("/proc")


def mount_id(fd: int, proc: Path = _PROC) -> int:
    """The id of the mount ``fd`` was opened on (``mnt_id`` of its fdinfo, Linux >= 3.15)."""
    with open(proc / "self" / "fdinfo" / str(fd), "rb") as fdinfo:
        head = fdinfo.read(_FDINFO_HEAD).decode("ascii", "replace")
    for line in head.splitlines():
        key, _, value = line.partition(":")
        if key == "mnt_id":
            return int(value)
    raise OSError(f"no mnt_id in the fdinfo of descriptor {fd}")


def mount_types(mountinfo: str) -> dict[int, str]:
    """``mount id -> filesystem type`` from a ``mountinfo`` table (proc(5))."""
    types: dict[int, str] = {}
    for line in mountinfo.splitlines():
        if (found := _parse(line)) is not None:
            types[found[0]] = found[1]
    return types


def _parse(line: str) -> tuple[int, str] | None:
    """A table line's mount id and filesystem type: the id is the first field, the type the
    first after the `` - `` separator (mount points are escaped, ``\\040`` for a space, so
    the separator is unambiguous)."""
    head, sep, tail = line.partition(" - ")
    fields = head.split(" ", 1)
    if not sep or not tail or not fields[0].isdigit():
        return None
    return int(fields[0]), tail.split(" ", 1)[0]


def mount_type(table: Path, mnt: int, limit: int = MAX_TABLE_BYTES) -> str | None:
    """The filesystem type of mount ``mnt`` in the table at ``table``, read line by line up
    to it; None if it is not there within ``limit`` bytes (or a line is longer than any
    mount's). Raises ``OSError``."""
    read = 0
    with open(table, "rb", buffering=1 << 16) as lines:  # /proc's own block is 1 KiB
        while read <= limit and (raw := lines.readline(_MAX_LINE + 1)):
            read += len(raw)
            if len(raw) > _MAX_LINE:
                return None
            found = _parse(raw.decode("utf-8", "replace").rstrip("\n"))
            if found is not None and found[0] == mnt:
                return found[1]
    return None


def filesystem_of(fd: int, peer_pid: int | None = None, proc: Path = _PROC) -> str | None:
    """The filesystem type of ``fd``, or None if its mount is in no table the broker can read
    (its own mount namespace's, then the peer's)."""
    mnt = mount_id(fd, proc)
    tables = [proc / "self" / "mountinfo"]
    if peer_pid is not None and peer_pid > 0:
        tables.append(proc / str(peer_pid) / "mountinfo")
    for table in tables:
        with contextlib.suppress(OSError):  # the peer may be gone: then only ours counts
            found = mount_type(table, mnt)
            if found is not None:
                return found
    return None

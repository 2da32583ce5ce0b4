"""Where a job's input is spooled, RAM or disk, and so where its sandboxes' slots live: decided
once, before the first byte is written.

Every artifact is written once on the host (its spool file), then renamed into its sandbox's
slot and hard-linked into the integrity reader's (sandboxes/workspace.py): three names, one
inode, so all three must be on one filesystem. On a disk that writes ~215 MB/s that one write
is most of what a multi-GiB shard costs beyond the conversion. The RAM spool is a tmpfs the
broker mounts at ``<state root>/ram/`` (``workspace.mount_ram_spool``) of ``[spool]
ram_bytes``: an input goes there when its size is known before the upload (the declared
size: the Python client always declares it, on both transfer paths; the intake refuses any
byte beyond it) and that many bytes are free in it, after what the uploads in progress may
still write. Otherwise it goes to the disk spool, as before the RAM spool existed.

Warm containers get their slot when they are created, long before a job's size is known: they
live on the RAM spool (an empty slot costs nothing there). A job whose input is on disk while
the RAM spool is on therefore takes the cold path, its slots prepared on the disk spool, as a
job with a disk-backed output does (output_room.py). That output's image is on the disk
whichever spool its slot is on (workspace.py): a shard too large for the output tmpfs still
has its input in RAM when it fits, which spares the disk one write of its size and the job
as much temporary disk.

What is claimed. The tmpfs's own free space (``statvfs``) counts what finished uploads and
live slots hold; a claim adds the declared size of an upload until it is written (released in
the pipeline's ``finally``), so that two uploads in flight never both count on the same free
bytes (an upload half written counts twice meanwhile: the error is on the safe side). The
tmpfs is ``ram_bytes`` plus ``RAM_SLACK_BYTES`` for the small files written after a claim (job
specs, parity samples of at most 1 MiB); a claim leaves that slack free. The disk spool's
reserve (spool_space.py) is not charged for a RAM upload; the answer, on disk, still is.

One caller's inputs claim at most ``[upload] spool_share_per_caller`` (half) of the budget,
its first one included, from the upload's start to its job's end; beyond, its input goes to
disk (``why: share``). A claim is made before a byte arrives and lasts the whole upload, which
a caller may send at the minimum rate: one upload as large as the budget, at 1 MiB/s, sent
every other caller's input to disk, and so every job of theirs to the cold path (a container
started for it), for an hour; so did inputs sent whole whose jobs waited for a run slot or
slept until their deadline (found in review). A caller is a principal
(``Principal.quota``), as on the disk.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airlock_broker.conversion.upload_limits import GiB
from airlock_broker.sandboxes.workspace import RAM_SLACK_BYTES

#: The default budget's ceiling (a quarter of the host's memory below 32 GiB).
DEFAULT_MAX_RAM_BYTES = 8 * GiB


def default_ram_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """A quarter of the host's memory, at most ``DEFAULT_MAX_RAM_BYTES``; 0 (off) when the
    host does not say how much it has."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return min(int(line.split()[1]) * 1024 // 4, DEFAULT_MAX_RAM_BYTES)
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass(frozen=True)
class SpoolSettings:
    """``[spool]``."""

    #: The RAM spool's budget: inputs up to this many bytes in all are spooled in a tmpfs
    #: instead of on disk (RAM or swap while a job holds them; nothing while it is empty).
    #: Default: a quarter of the host's memory, at most 8 GiB. 0: off, every input on disk.
    ram_bytes: int = field(default_factory=default_ram_bytes)

    def __post_init__(self) -> None:
        if self.ram_bytes < 0:
            raise ValueError("[spool] ram_bytes must be >= 0 (0: every input on disk)")


@dataclass(eq=False)
class InputRoom:
    """One job's input room: the spool its upload is written to (and its slots live on).
    ``written`` once the upload is written (or failed): from then on its bytes count in the
    tmpfs's own used space; ``release`` once the job is done (until then they count in its
    caller's share)."""

    #: The spool root of the upload: ``<state root>/ram`` or the state root itself.
    root: Path
    ram: bool
    #: What the upload may write, as claimed: its declared size (0: unknown).
    bytes: int
    #: Why the input is on disk ("" when in RAM), for the audit record.
    why: str = ""
    #: The job's slots must be prepared on the disk spool (cold): warm ones are in RAM.
    disk_slots: bool = False
    #: Whose upload it is (``Principal.quota``; "" for nobody's): its share is counted.
    owner: str = ""
    #: Its upload is over: its bytes are the tmpfs's own, no longer a claim on it.
    done: bool = False
    _spool: RamSpool | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        """The audit record's ``input_room``."""
        room: dict[str, Any] = {"ram": self.ram, "bytes": self.bytes}
        if self.why:
            room["why"] = self.why
        return room

    def written(self) -> None:
        self.done = True

    def release(self) -> None:
        if self._spool is not None:
            self._spool.release(self)
            self._spool = None


class RamSpool:
    """The RAM spool's budget and the claims of the uploads in progress. ``root`` None: not
    mounted (``[spool] ram_bytes = 0``, or a broker that may not mount): every input on disk.
    Thread-safe (claims are cheap; the lock is for the fast path's threads, should they ask)."""

    def __init__(self, disk_root: Path, root: Path | None, budget: int,
                 statvfs: Callable[[Path], os.statvfs_result] = os.statvfs, *,
                 share: float = 1.0) -> None:
        self.disk_root = disk_root
        self.root = root if budget > 0 else None
        self.budget = budget
        #: What one caller's claims may hold together, of the budget (1.0: all of it).
        self.share = share
        self._statvfs = statvfs
        self._lock = threading.Lock()
        self._claims: set[InputRoom] = set()

    @property
    def on(self) -> bool:
        return self.root is not None

    def room(self, declared: int, *, owner: str = "") -> InputRoom:
        """The room of an upload of ``declared`` bytes (0: not declared) for ``owner``."""
        if self.root is None:
            return InputRoom(self.disk_root, ram=False, bytes=declared, why="off")
        why = ("undeclared" if declared <= 0 else "over_budget" if declared > self.budget
               else "")
        with self._lock:
            if not why and self._free() - self._claimed() - RAM_SLACK_BYTES < declared:
                why = "full"
            if not why and owner and self.share < 1 and (
                    self._claimed(owner) + declared > int(self.share * self.budget)):
                why = "share"
            if why:
                return InputRoom(self.disk_root, ram=False, bytes=declared, why=why,
                                 disk_slots=True, owner=owner)
            room = InputRoom(self.root, ram=True, bytes=declared, owner=owner, _spool=self)
            self._claims.add(room)
        return room

    def release(self, room: InputRoom) -> None:
        with self._lock:
            self._claims.discard(room)

    def status(self) -> dict[str, int]:
        """For operators: the budget, what the tmpfs holds, what uploads have claimed."""
        if self.root is None:
            return {"budget": 0, "used": 0, "claimed": 0}
        with self._lock:
            st = self._statvfs(self.root)
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
            return {"budget": self.budget, "used": used, "claimed": self._claimed()}

    def _free(self) -> int:
        assert self.root is not None
        st = self._statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _claimed(self, owner: str = "") -> int:
        """What the uploads in progress may still write; with ``owner``: what that caller's
        inputs may hold, written or not, until their jobs are done (its share)."""
        if owner:
            return sum(c.bytes for c in self._claims if c.owner == owner)
        return sum(c.bytes for c in self._claims if not c.done)

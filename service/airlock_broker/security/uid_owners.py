"""Whose a uid is, for the broker's per-user bounds: a user's subordinate uids are theirs.

A user may own a range of subordinate uids (``/etc/subuid``; Debian's ``adduser`` gives each
user 65,536 where ``uidmap`` is installed), and processes in that user's namespaces connect
to the broker's sockets as any of them (``SO_PEERCRED`` shows the host uid). Bounds kept per
uid (identity tickets, fast-path hand-overs) would then be 65,536 times as wide for that user.
``UidOwners.owner`` maps a subordinate uid to its owner's uid, so each bound holds per user.

Read once, when the broker starts (a range added later counts from the next start); at most
``MAX_BYTES`` and ``MAX_RANGES``, a malformed line skipped with a warning. Lines are
``OWNER:START:COUNT``, the owner a name or a uid; a name this host does not know owns its
range under a key of its own (``-1 - n``, never a real uid).
"""

from __future__ import annotations

import bisect
import logging
import pwd
from pathlib import Path

log = logging.getLogger(__name__)

SUBUID = Path("/etc/subuid")
MAX_BYTES = 1 << 20
MAX_RANGES = 65536


class UidOwners:
    """Subordinate uid ranges, sorted by start: ``owner(uid)`` in O(log n)."""

    def __init__(self, ranges: list[tuple[int, int, int]] | None = None) -> None:
        #: (start, end exclusive, owner), sorted, not overlapping (a later overlap is dropped).
        self._ranges: list[tuple[int, int, int]] = []
        for start, end, owner in sorted(ranges or []):
            if self._ranges and start < self._ranges[-1][1]:
                log.warning("subordinate uids %d-%d overlap another range: ignored",
                            start, end - 1)
                continue
            self._ranges.append((start, end, owner))
        self._starts = [r[0] for r in self._ranges]

    @classmethod
    def load(cls, path: Path = SUBUID) -> UidOwners:
        """The ranges of ``path``; none if it is missing or unreadable (said in the log)."""
        try:
            with path.open("rb") as fh:
                raw = fh.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            log.warning("cannot read %s (%s): subordinate uids count as users of their own",
                        path, exc)
            return cls()
        if len(raw) > MAX_BYTES:
            log.warning("%s is larger than %d bytes: only its start is read", path, MAX_BYTES)
        ranges: list[tuple[int, int, int]] = []
        unknown: dict[str, int] = {}
        for number, line in enumerate(raw[:MAX_BYTES].decode("utf-8", "replace").splitlines(),
                                      1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parsed = _parse(line, unknown)
            if parsed is None:
                log.warning("%s line %d is not OWNER:START:COUNT: skipped", path, number)
                continue
            ranges.append(parsed)
            if len(ranges) >= MAX_RANGES:
                log.warning("%s has more than %d ranges: the rest are ignored", path, MAX_RANGES)
                break
        return cls(ranges)

    def owner(self, uid: int) -> int:
        """The user a subordinate ``uid`` belongs to; any other uid is its own."""
        at = bisect.bisect_right(self._starts, uid) - 1
        if at >= 0:
            start, end, owner = self._ranges[at]
            if start <= uid < end:
                return owner
        return uid

    def __len__(self) -> int:
        return len(self._ranges)


def _parse(line: str, unknown: dict[str, int]) -> tuple[int, int, int] | None:
    parts = line.strip().split(":")
    if len(parts) != 3 or not parts[0]:
        return None
    name, start_text, count_text = parts
    try:
        start, count = int(start_text), int(count_text)
    except ValueError:
        return None
    if start < 0 or count <= 0 or start + count > 2**32:
        return None
    if name.isdigit():
        owner = int(name)
    else:
        try:
            owner = pwd.getpwnam(name).pw_uid
        except KeyError:
            owner = unknown.setdefault(name, -1 - len(unknown))
    return start, start + count, owner

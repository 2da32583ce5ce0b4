"""What a zip's end records claim, checked against a budget before any reader parses the
central directory (issue 11 §2).

A zip announces its central directory twice: in the classic end record and, when a Zip64
locator precedes that record, in the Zip64 record. Readers disagree about which to believe
(CPython 3.11's ``zipfile`` takes the Zip64 record that sits just before the locator whenever
a locator is there, saturated classic fields or not; newer readers and miniz, which
``torch.load`` uses, follow the locator's offset). A file whose classic record says one
entry and whose Zip64 record says millions is the bomb. So every record any of those readers
could pick is read here, and the largest claim of each kind must fit the budget; only then
may ``zipfile`` or ``torch`` list the archive. This reads at most a few kilobytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import IO

_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIG = b"PK\x05\x06"
_Z64_LOCATOR = struct.Struct("<4sLQL")
_Z64_LOCATOR_SIG = b"PK\x06\x07"
_Z64_EOCD = struct.Struct("<4sQ2H2L4Q")
_Z64_EOCD_SIG = b"PK\x06\x06"
_MAX_COMMENT = 0xFFFF


@dataclass(frozen=True)
class ZipBudget:
    """How much central directory the worker lets a reader parse. Checks itself on creation."""

    #: Entries: a large PyTorch checkpoint has one per storage (thousands); an npz one per
    #: array. 100,000 is far beyond any model and parses in well under a second.
    max_entries: int = 100_000
    #: Bytes of central directory (read into memory whole, then parsed entry by entry): a
    #: 46-byte header plus name and extra field per entry; 8 MiB holds 100,000 entries with
    #: 40-byte names, and costs at most ~80 MB of parsed records in the sandbox.
    max_directory_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1 <= self.max_entries <= 10_000_000:
            raise ValueError(f"max_entries {self.max_entries} is outside 1..10,000,000")
        if not 46 <= self.max_directory_bytes <= 1024**3:
            raise ValueError(f"max_directory_bytes {self.max_directory_bytes} is outside "
                             "46..1 GiB")


DEFAULT_BUDGET = ZipBudget()


class ZipOverBudget(ValueError):
    """The end records claim more than the budget allows; the message has the numbers."""


@dataclass(frozen=True)
class Claim:
    """The largest entry count and central-directory size any end record claims."""

    entries: int
    directory_bytes: int


def claims(source: str | os.PathLike[str] | IO[bytes]) -> Claim | None:
    """The largest claims of every end record a reader could pick; None if there is none
    (not a zip: the reader will say so itself)."""
    records = end_records(source)
    if not records:
        return None
    return Claim(max(r.entries for r in records), max(r.directory_bytes for r in records))


def directory_offsets(source: str | os.PathLike[str] | IO[bytes]) -> set[int]:
    """Where the central directory starts, by every end record a reader could pick, as the
    record says (miniz, which ``torch.load`` uses, takes that offset as it stands; CPython's
    ``zipfile`` shifts it by any bytes found before the archive)."""
    return {r.directory_offset for r in end_records(source) if r.directory_offset is not None}


def check(source: str | os.PathLike[str] | IO[bytes],
          budget: ZipBudget = DEFAULT_BUDGET) -> None:
    """Raise :class:`ZipOverBudget` if any end record claims more than ``budget``."""
    claim = claims(source)
    if claim is None:
        return
    if claim.entries > budget.max_entries:
        raise ZipOverBudget(
            f"the zip's end records claim {claim.entries} entries; the sandbox lists at most "
            f"{budget.max_entries} (a Zip64 record may claim more than the classic one)")
    if claim.directory_bytes > budget.max_directory_bytes:
        raise ZipOverBudget(
            f"the zip's end records claim a {claim.directory_bytes}-byte central directory; "
            f"the sandbox reads at most {budget.max_directory_bytes} bytes of it")


@dataclass(frozen=True)
class EndRecord:
    """What one end record (classic or Zip64) a reader could pick says of the directory."""

    entries: int
    directory_bytes: int
    #: None: saturated in a classic record, which defers to its Zip64 record.
    directory_offset: int | None


def end_records(source: str | os.PathLike[str] | IO[bytes]) -> list[EndRecord]:
    """Every end record a reader could pick (empty: not a zip). A saturated classic field
    means "see the Zip64 record" and is no claim when there is one; without one it is."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            return _end_records(fh)
    here = source.tell()
    try:
        return _end_records(source)
    finally:
        source.seek(here)


def _end_records(fh: IO[bytes]) -> list[EndRecord]:
    size = fh.seek(0, os.SEEK_END)
    tail_len = min(size, _EOCD.size + _MAX_COMMENT)
    tail_at = size - tail_len
    fh.seek(tail_at)
    tail = fh.read(tail_len)
    # zipfile first tries a comment-less record at the very end, then the last signature.
    starts = {tail.rfind(_EOCD_SIG)}
    if tail[-_EOCD.size:][:4] == _EOCD_SIG:
        starts.add(len(tail) - _EOCD.size)
    found = []
    for start in starts:
        if start < 0 or start + _EOCD.size > len(tail):
            continue
        fields = _EOCD.unpack_from(tail, start)
        zip64 = _zip64_records(fh, size, tail_at + start)
        entries = max([n for n in fields[3:5] if n != 0xFFFF or not zip64], default=0)
        size_ = None if fields[5] == 0xFFFFFFFF and zip64 else fields[5]
        offset = None if fields[6] == 0xFFFFFFFF and zip64 else fields[6]
        found.append(EndRecord(entries, size_ or 0, offset))
        found.extend(zip64)
    return found


def _zip64_records(fh: IO[bytes], size: int, eocd_at: int) -> list[EndRecord]:
    """Each Zip64 record a reader could take for the end record at ``eocd_at``: the one
    just before the locator, and the one the locator points to."""
    locator_at = eocd_at - _Z64_LOCATOR.size
    if locator_at < 0:
        return []
    fh.seek(locator_at)
    raw = fh.read(_Z64_LOCATOR.size)
    if len(raw) != _Z64_LOCATOR.size:
        return []
    sig, _, pointed_at, _ = _Z64_LOCATOR.unpack(raw)
    if sig != _Z64_LOCATOR_SIG:
        return []
    found = []
    for record_at in sorted({locator_at - _Z64_EOCD.size, pointed_at}):
        if not 0 <= record_at <= size - _Z64_EOCD.size:
            continue
        fh.seek(record_at)
        record = _Z64_EOCD.unpack(fh.read(_Z64_EOCD.size))
        if record[0] == _Z64_EOCD_SIG:
            found.append(EndRecord(max(record[6], record[7]), record[8], record[9]))
    return found

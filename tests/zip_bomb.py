"""A central-directory bomb (issue 11 §2), built in the tests, never checked in.

The classic end record claims ``classic_entries`` entries and a small central directory; a
Zip64 locator and record just before it claim ``claimed`` entries and the full directory,
which holds ``present`` real 46-byte headers (empty names, no data) after one genuine
``MLmodel`` member. CPython 3.11's ``zipfile`` believes the Zip64 record and parses every
header (~450 bytes and ~11 µs each on the host that does it); a reader that believes the
classic record sees one member. With ``claimed == present`` and saturated classic fields it
is an honest Zip64 archive instead.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s4B4H3L5H2L")
_Z64_EOCD = struct.Struct("<4sQ2H2L4Q")
_Z64_LOCATOR = struct.Struct("<4sLQL")
_EOCD = struct.Struct("<4s4H2LH")
MLMODEL = b"flavors: {sklearn: {pickled_model: model.pkl}}\n"


def _central(name: bytes, size: int, crc: int, offset: int) -> bytes:
    return _CENTRAL.pack(b"PK\x01\x02", 45, 3, 45, 0, 0, 0, 0, 0x21, crc, size, size,
                         len(name), 0, 0, 0, 0, 0o100644 << 16, offset) + name


def write(path: Path, *, present: int, claimed: int, classic_entries: int = 1,
          saturate_classic: bool = False) -> Path:
    """Write the archive to ``path``; returns it."""
    crc = zlib.crc32(MLMODEL)
    local = _LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, 0x21, crc, len(MLMODEL), len(MLMODEL),
                        len(b"MLmodel"), 0) + b"MLmodel" + MLMODEL
    first = _central(b"MLmodel", len(MLMODEL), crc, 0)
    empty = _central(b"", 0, 0, 0)
    directory_bytes = len(first) + len(empty) * (present - 1)
    cd_at = len(local)
    z64_at = cd_at + directory_bytes
    with open(path, "wb") as fh:
        fh.write(local)
        fh.write(first)
        block = empty * 65536
        left = present - 1
        while left:
            n = min(left, 65536)
            fh.write(block if n == 65536 else empty * n)
            left -= n
        fh.write(_Z64_EOCD.pack(b"PK\x06\x06", _Z64_EOCD.size - 12, 45, 45, 0, 0,
                                claimed, claimed, directory_bytes, cd_at))
        fh.write(_Z64_LOCATOR.pack(b"PK\x06\x07", 0, z64_at, 1))
        if saturate_classic:
            fh.write(_EOCD.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
        else:
            fh.write(_EOCD.pack(b"PK\x05\x06", 0, 0, classic_entries, classic_entries,
                                len(first), cd_at, 0))
    return path

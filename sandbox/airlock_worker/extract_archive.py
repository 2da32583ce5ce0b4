"""A PyTorch zip checkpoint opened once for the integrity extraction (:mod:`.extract`):
entries checked for duplicates, overlaps and bounds before any is read; stored records served
from one read-only mmap, deflated ones inflated under a ratio cap and a total cap."""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
import zipfile

from . import zip_budget
from .detect import MAX_ZIP_ENTRIES
from .errors import describe
from .extract_errors import Refused

#: A deflated record may inflate at most this much (a zip bomb goes far beyond it)...
MAX_INFLATE_RATIO = 100
#: ...and all inflated records together at most this many bytes (stored records are mmapped
#: and cost nothing; torch.save never compresses).
MAX_INFLATED_BYTES = 4 * 1024**3

class Archive:
    """The zip, opened once: entries checked for duplicates, overlaps and bounds; stored
    records served from one read-only mmap, deflated ones inflated under caps."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._mm: mmap.mmap | None = None
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._zip = zipfile.ZipFile(self._file)
            infos = self._zip.infolist()
            named = zip_budget.directory_offsets(self._file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            self.close()
            raise Refused(f"unreadable zip archive: {describe(exc)}") from None
        self.inflated = 0
        self._data_offsets: dict[str, int] = {}
        try:
            _one_directory(named, self._zip.start_dir)
            self._index(infos)
        except BaseException:
            self.close()
            raise

    def _index(self, infos: list[zipfile.ZipInfo]) -> None:
        if not infos:
            raise Refused("empty zip archive")
        if len(infos) > MAX_ZIP_ENTRIES:
            raise Refused(f"{len(infos)} zip entries (limit {MAX_ZIP_ENTRIES})")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names) or len({n.casefold() for n in names}) != len(names):
            raise Refused("duplicate zip entry names")  # readers disagree on which one wins
        # torch finds a record as miniz does: by the bytes of its name (the UTF-8 flag is not
        # looked at) and ignoring ASCII case. A name "byteorder" never finds "BYTEORDER"
        # here, and a flagged "é" and an unflagged "├⌐" are two names here but one there
        # (the same bytes): each reader would read another record. So records are indexed
        # and found the way miniz finds them, and two that miniz cannot tell apart refuse.
        raw = [_raw_name(i) for i in infos]
        folded = {_ascii_fold(r) for r in raw}
        if len(folded) != len(raw):
            raise Refused("zip entry names that torch's reader cannot tell apart")
        first = raw[0]
        if b"/" not in first:
            raise Refused("the archive's records are not in a folder")
        # torch's reader takes the folder of the first record as the prefix of all lookups.
        self._prefix_raw = first.split(b"/", 1)[0] + b"/"
        self.prefix = self._prefix_raw.decode("utf-8", "replace")
        self._infos = {_ascii_fold(r): i for r, i in zip(raw, infos, strict=True)}
        spans = []
        for info in infos:
            start = self._data_offset(info)
            spans.append((info.header_offset, start + info.compress_size, info.filename))
        spans.sort()
        for (_, end, name), (begin, _, other) in itertools.pairwise(spans):
            if begin < end:
                raise Refused(f"zip entries overlap ({name[:80]!r}, {other[:80]!r})")

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        assert self._mm is not None
        at = info.header_offset
        if at < 0 or at + 30 > self.size:
            raise Refused(f"zip entry {info.filename[:80]!r} lies outside the file")
        header = self._mm[at:at + 30]
        if header[:4] != b"PK\x03\x04":
            raise Refused(f"zip entry {info.filename[:80]!r} has no local header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        local_name = self._mm[at + 30:at + 30 + name_len]
        if local_name != _raw_name(info):
            raise Refused(f"zip entry {info.filename[:80]!r}: local and central names differ")
        start = at + 30 + name_len + extra_len
        if start + info.compress_size > self.size:
            raise Refused(f"zip entry {info.filename[:80]!r} runs past the end of the file")
        if info.flag_bits & 0x1:
            raise Refused(f"zip entry {info.filename[:80]!r} is encrypted")
        self._data_offsets[info.filename] = start
        return start

    def record(self, name: str) -> zipfile.ZipInfo | None:
        """The record torch's reader finds for ``name`` (under the archive's folder)."""
        try:
            wanted = self._prefix_raw + name.encode("utf-8")
        except UnicodeEncodeError:  # torch cannot pass such a name to its reader either
            return None
        return self._infos.get(_ascii_fold(wanted))

    def check(self, info: zipfile.ZipInfo, limit: int | None = None) -> None:
        """Refuse a record before reading it: over ``limit``, stored with two sizes,
        compressed other than deflate, or inflating more than :data:`MAX_INFLATE_RATIO`."""
        size = info.file_size
        if limit is not None and size > limit:
            raise Refused(f"{info.filename[:80]!r} is {size} bytes (limit {limit})")
        if info.compress_type == zipfile.ZIP_STORED:
            if size != info.compress_size:
                raise Refused(f"{info.filename[:80]!r}: stored size {info.compress_size} is "
                              f"not the declared {size}")
            return
        if info.compress_type != zipfile.ZIP_DEFLATED:
            raise Refused(f"{info.filename[:80]!r}: unsupported compression "
                          f"{info.compress_type}")
        if size > MAX_INFLATE_RATIO * max(info.compress_size, 1):
            raise Refused(f"{info.filename[:80]!r} would inflate {size} bytes from "
                          f"{info.compress_size}, more than {MAX_INFLATE_RATIO}x (zip bomb)")
        if size > MAX_INFLATED_BYTES:
            raise Refused(f"{info.filename[:80]!r} would inflate to {size} bytes")

    def record_bytes(self, info: zipfile.ZipInfo, limit: int | None = None) -> memoryview:
        """The record's bytes: a view of the mmap if stored, inflated under caps if not."""
        assert self._mm is not None
        self.check(info, limit)
        size = info.file_size
        if info.compress_type == zipfile.ZIP_STORED:
            start = self._data_offsets[info.filename]
            return memoryview(self._mm)[start:start + size]
        if self.inflated + size > MAX_INFLATED_BYTES:
            raise Refused(f"inflated records exceed {MAX_INFLATED_BYTES} bytes")
        self.inflated += size
        try:
            with self._zip.open(info) as f:
                data = f.read(size + 1)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # incl. bad CRC
            raise Refused(f"{info.filename[:80]!r}: {describe(exc)}") from None
        if len(data) != size:
            raise Refused(f"{info.filename[:80]!r} inflates to {len(data)} bytes, "
                          f"not the declared {size}")
        return memoryview(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._zip.close()
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # views still alive: the GC closes it
                self._mm.close()
        self._file.close()


def _one_directory(named: set[int], read_at: int) -> None:
    """The central directory ``zipfile`` read must be the only one the end records name,
    where they name it. Otherwise ``torch.load`` (miniz) may list another archive of the same
    file: one with bytes before it (``zipfile`` shifts every offset past them, miniz does
    not), or whose classic and Zip64 records disagree. The reading would then answer for
    weights torch never loads."""
    if named != {read_at}:
        shown = ", ".join(str(n) for n in sorted(named)[:3]) or "no offset"
        raise Refused(f"the zip's end records place its central directory at {shown}, but "
                      f"it begins at byte {read_at}: bytes before the archive, or end records "
                      "that disagree, let readers list different archives")


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """The name's bytes as stored (``zipfile`` decoded them as its flag says)."""
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")


_ASCII_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


def _ascii_fold(name: bytes) -> bytes:
    """A name as miniz compares it when torch looks a record up: ASCII letters folded to
    lower case, every other byte as is (``mz_zip_reader_locate_file`` without
    ``MZ_ZIP_FLAG_CASE_SENSITIVE``)."""
    return name.translate(_ASCII_LOWER)

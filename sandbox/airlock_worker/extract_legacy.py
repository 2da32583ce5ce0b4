"""A legacy PyTorch checkpoint (``torch.save`` before 1.6, or ``_use_new_zipfile_serialization
=False``) read for the integrity extraction (:mod:`.extract`) without executing anything.

The layout, as torch's ``_legacy_load`` reads it: five pickles one after the other - the magic
number, the protocol version (1001), a system-info dict (byte order, type sizes), the object
(its storages are persistent ids ``("storage", type, key, location, numel, view)``), the list
of storage keys - then, for each key in that list's order, an int64 element count followed by
the storage's raw bytes. Every pickle goes through the same :class:`RestrictedUnpickler` as a
zip checkpoint's ``data.pkl``; storages are spans of one read-only mmap, checked against what
the pickle declared before any tensor is built from them.

What torch would read differently is refused or left format-safe only: a big-endian file, a
storage *view* (the sixth field; written only by torch before 0.4), a pickled module
(``"module"`` ids: its code decides its weights), a storage the key list does not name (torch
would leave its memory uninitialised), a count that disagrees with the pickle, and a file
whose first block is also a valid tar header (torch tries its older tar layout first).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import tarfile
from typing import Any

from airlock_sandbox.formats import TORCH_LEGACY_MAGIC

from .errors import WorkerError, describe
from .extract_errors import NOT_EXTRACTABLE, Refused, Unextractable
from .extract_stand_ins import Storage
from .extract_unpickler import Poison, RestrictedUnpickler, check_storage_id

PROTOCOL_VERSION = 1001
#: The pickles before the storages: a checkpoint's is ~100 bytes per tensor.
MAX_PICKLE_BYTES = 256 * 1024**2
#: Storage keys listed at most (a model with a million tensors is far beyond any real one).
MAX_STORAGES = 1_000_000
_COUNT = struct.Struct("<q")


class _Window:
    """The part of the mmap the pickles may read: ``read``/``readline`` as a file's, never
    past ``limit`` (so a pickle cannot make us copy the whole file into memory)."""

    def __init__(self, mm: mmap.mmap, limit: int) -> None:
        self._mm = mm
        self.pos = 0
        self._limit = min(limit, len(mm))

    def read(self, n: int = -1) -> bytes:
        end = self._limit if n < 0 else self.pos + n
        if end > self._limit:
            if self._limit < len(self._mm):
                raise Refused(f"the checkpoint's pickles exceed {MAX_PICKLE_BYTES} bytes")
            end = self._limit
        data = self._mm[self.pos:end]
        self.pos = end
        return data

    def readline(self) -> bytes:
        end = self._mm.find(b"\n", self.pos, self._limit)
        return self.read((self._limit if end < 0 else end + 1) - self.pos)


class LegacyFile:
    """The checkpoint, mmapped once; storages are ``(offset, nbytes)`` spans of it."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            try:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise Refused(f"unreadable checkpoint: {describe(exc)}") from None

    def record_bytes(self, span: tuple[int, int]) -> memoryview:
        offset, nbytes = span
        return memoryview(self._mm)[offset:offset + nbytes]

    def read(self) -> tuple[Any, list[str]]:
        """The object and the globals it named that were not called (poisoned)."""
        if _tar_header(self._mm[:tarfile.BLOCKSIZE]):
            raise Refused("the checkpoint's first block is also a tar header: torch.load "
                          "would read it as its older tar layout, not as this one")
        window = _Window(self._mm, MAX_PICKLE_BYTES)
        # One unpickler per pickle, as torch: no memo carries over from one to the next.
        magic = _load(_PlainUnpickler(window, self), "magic number")
        if magic != TORCH_LEGACY_MAGIC:
            raise Refused("not a legacy PyTorch checkpoint (wrong magic number)")
        if _load(_PlainUnpickler(window, self), "protocol version") != PROTOCOL_VERSION:
            raise Unextractable(f"{NOT_EXTRACTABLE}: a legacy protocol other than "
                                f"{PROTOCOL_VERSION}")
        info = _load(_PlainUnpickler(window, self), "system info")
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise Unextractable("integrity extraction supports little-endian checkpoints only")
        unpickler = LegacyUnpickler(window, self)
        obj = _load(unpickler, "object")
        keys = _load(_PlainUnpickler(window, self), "storage key list")
        self._place(unpickler.storages, keys, window.pos)
        return obj, unpickler.poisoned

    def _place(self, storages: dict[str, Storage], keys: Any, offset: int) -> None:
        """Give each storage its span, in the key list's order, as torch reads them."""
        if not isinstance(keys, list) or len(keys) > MAX_STORAGES:
            raise Refused(f"the storage key list is not a list of at most {MAX_STORAGES}")
        placed: set[str] = set()
        for key in keys:
            storage = storages.get(key) if isinstance(key, str) else None
            if storage is None or key in placed:
                raise Refused(f"the key list names storage {str(key)[:80]!r}, which the "
                              "object does not use (or names it twice)")
            if offset + _COUNT.size > self.size:
                raise Refused(f"the file ends before storage {key[:80]}")
            (count,) = _COUNT.unpack_from(self._mm, offset)
            if count < 0 or count * storage.dtype.itemsize != storage.nbytes:
                raise Refused(f"storage {key[:80]} holds {count} elements, the pickle says "
                              f"{storage.nbytes // max(storage.dtype.itemsize, 1)}")
            offset += _COUNT.size
            if offset + storage.nbytes > self.size:
                raise Refused(f"storage {key[:80]} runs past the end of the file")
            storage.record = (offset, storage.nbytes)
            offset += storage.nbytes
            placed.add(key)
        missing = sorted(set(storages) - placed)
        if missing:
            raise Refused(f"storage {missing[0][:80]} has no data in the file")

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # views still alive: the GC closes it
            self._mm.close()


def _load(unpickler: RestrictedUnpickler, what: str) -> Any:
    try:
        return unpickler.load()
    except WorkerError:
        raise
    except RecursionError:
        raise Refused(f"the {what} nests too deeply") from None
    except Exception as exc:  # malformed: UnpicklingError, EOFError, TypeError...
        raise Refused(f"the {what} could not be read: {describe(exc)}") from None


class _PlainUnpickler(RestrictedUnpickler):
    """The pickles around the object: plain values, no storages (torch reads them with no
    ``persistent_load``)."""

    def persistent_load(self, pid: Any) -> Any:
        raise Refused("a persistent id outside the object's pickle")


class LegacyUnpickler(RestrictedUnpickler):
    """The restricted unpickler over the legacy stream; its storages wait for their spans."""

    def __init__(self, window: _Window, source: LegacyFile) -> None:
        super().__init__(window, source)
        self.storages: dict[str, Storage] = {}

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] in ("module", b"module"):
            # torch hands back the module's class; ours is poison, so its tensors (if any)
            # sit inside an unknown object and are not guessed.
            if isinstance(pid[1], type) and issubclass(pid[1], Poison):
                return pid[1]
            raise Refused("a module id that names no class")
        if not isinstance(pid, tuple) or len(pid) != 6:
            raise Refused("unknown persistent id in the legacy pickle")
        storage_type, key, nbytes = check_storage_id(pid[:5])
        if pid[5] is not None:
            raise Unextractable(f"{NOT_EXTRACTABLE}: a storage view (written by torch < 0.4)")
        cached = self.storages.get(key)
        if cached is not None:  # as torch: the first reference defines the storage
            return cached
        storage = Storage(self._archive, key, storage_type.dtype, nbytes, None)
        self.storages[key] = storage
        return storage


__all__ = ["LegacyFile"]


def _tar_header(block: bytes) -> bool:
    """Whether ``block`` is a tar header ``tarfile`` accepts (its checksum holds): torch's
    legacy loader tries the tar layout first and reads such a file as that."""
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True

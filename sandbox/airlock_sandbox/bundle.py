"""The MLflow bundle: a model directory packed by the client as a STORED zip, ``MLmodel`` at
its root. Shared rules (pure stdlib) for the broker, which only lists member names, and the
worker, which re-checks every member inside the sandbox before reading one.

The broker lists names only after reading the zip's end-of-central-directory record itself,
so a forged archive announcing millions of entries is never parsed on the host: it stays a
plain ``ZIP`` and the sandbox refuses it.
"""

from __future__ import annotations

import os
import posixpath
import stat
import struct
import unicodedata
import zipfile
from collections.abc import Iterable

from airlock_sandbox.formats import PROFILE_SKLEARN, PROFILE_TORCH

MLMODEL = "MLmodel"
MAX_MLMODEL_BYTES = 1024 * 1024
MAX_MEMBERS = 10_000
MAX_NAME_BYTES = 1024
MAX_COMPONENT_BYTES = 255
MAX_DEPTH = 32
#: The host reads at most this much central directory (MAX_MEMBERS names of ~100 bytes).
MAX_CENTRAL_DIRECTORY_BYTES = 4 * 1024 * 1024

_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIG = b"PK\x05\x06"
_Z64_LOCATOR = struct.Struct("<4sLQL")
_Z64_EOCD = struct.Struct("<4sQ2H2L4Q")
_MAX_COMMENT = 0xFFFF
#: Member names that make a bundle a PyTorch job (the torch profile imports torch up front).
_TORCH_SUFFIXES = (".pth", ".pt", ".pt2", ".bin")


class BundleError(ValueError):
    """A bundle (or one of its member names) breaks a rule; the message says which."""


def check_member_name(name: str) -> None:
    """A relative POSIX path of plain components: nothing an extractor could misplace."""
    if not name or name.startswith("/") or len(name.encode("utf-8", "surrogatepass")) \
            > MAX_NAME_BYTES:
        raise BundleError(f"member {name[:80]!r} is empty, absolute or too long")
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        raise BundleError(f"member {name[:80]!r} is nested deeper than {MAX_DEPTH}")
    for part in parts:
        if part in {"", ".", ".."} or "\\" in part or (len(part) >= 2 and part[1] == ":"):
            raise BundleError(f"member {name[:80]!r} could escape the model root")
        if any(unicodedata.category(c) in {"Cc", "Cs"} for c in part):
            raise BundleError(f"member {name[:80]!r} has a control or undecodable character")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise BundleError(f"member {name[:80]!r} has an over-long component")


def check_members(infos: Iterable[zipfile.ZipInfo], archive_size: int,
                  max_total_bytes: int) -> dict[str, zipfile.ZipInfo]:
    """Every rule a member must pass before any member is read; returns them by name."""
    members: dict[str, zipfile.ZipInfo] = {}
    folded: set[str] = set()
    total = 0
    for info in infos:
        if len(members) >= MAX_MEMBERS:
            raise BundleError(f"more than {MAX_MEMBERS} members")
        name = info.filename
        check_member_name(name)
        key = unicodedata.normalize("NFC", name).casefold()
        if name in members or key in folded:
            raise BundleError(f"member {name[:80]!r} appears twice (or differs only in case)")
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no type recorded (not unix)
        if info.is_dir() or kind not in (0, stat.S_IFREG):
            raise BundleError(f"member {name[:80]!r} is not a regular file (link, directory "
                              "or special file)")
        if info.flag_bits & 0x1:
            raise BundleError(f"member {name[:80]!r} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise BundleError(f"member {name[:80]!r} is compressed; bundles are stored")
        total += info.file_size
        if total > max_total_bytes or total > archive_size:
            raise BundleError("members add up to more bytes than allowed (or than the "
                              "archive holds: overlapping members)")
        members[name] = info
        folded.add(key)
    if MLMODEL not in members:
        raise BundleError(f"no {MLMODEL} at the bundle's root")
    return members


def contained(path: str) -> str:
    """A path named in ``MLmodel``, normalised; raise if it leaves the model root."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise BundleError(f"{MLMODEL} names a path {str(path)[:80]!r} outside the model")
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        raise BundleError(f"{MLMODEL} names a path {path[:80]!r} outside the model")
    return normal


# -- host side: names only ------------------------------------------------------------------


def central_directory(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(entries, bytes) of a zip's central directory from its end records, or None."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        tail_len = min(size, _EOCD.size + _MAX_COMMENT)
        fh.seek(size - tail_len)
        tail = fh.read(tail_len)
        pos = tail.rfind(_EOCD_SIG)
        if pos < 0 or pos + _EOCD.size > len(tail):
            return None
        fields = _EOCD.unpack_from(tail, pos)
        entries, cd_size, cd_offset = fields[4], fields[5], fields[6]
        if entries != 0xFFFF and cd_size != 0xFFFFFFFF and cd_offset != 0xFFFFFFFF:
            return entries, cd_size
        locator_at = size - tail_len + pos - _Z64_LOCATOR.size
        if locator_at < 0:
            return None
        fh.seek(locator_at)
        sig, _, z64_offset, _ = _Z64_LOCATOR.unpack(fh.read(_Z64_LOCATOR.size))
        if sig != b"PK\x06\x07" or z64_offset + _Z64_EOCD.size > size:
            return None
        fh.seek(z64_offset)
        record = _Z64_EOCD.unpack(fh.read(_Z64_EOCD.size))
        if record[0] != b"PK\x06\x06":
            return None
        return record[7], record[8]


def member_names(path: str | os.PathLike[str]) -> list[str] | None:
    """The member names of a zip, if its central directory is small enough to read on the
    host; None otherwise (or if it is not a readable zip). Reads no member data."""
    try:
        bounds = central_directory(path)
        if bounds is None:
            return None
        entries, cd_bytes = bounds
        if entries > MAX_MEMBERS or cd_bytes > MAX_CENTRAL_DIRECTORY_BYTES:
            return None
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, struct.error):
        return None


def is_bundle(names: Iterable[str]) -> bool:
    return MLMODEL in set(names)


def profile_for_bundle(names: Iterable[str]) -> str:
    """Torch for a PyTorch model (``data/model.pth``, ``data/model.pt2``...), else sklearn.
    Decided from names alone: the broker never parses ``MLmodel``."""
    return PROFILE_TORCH if any(n.endswith(_TORCH_SUFFIXES) for n in names) \
        else PROFILE_SKLEARN

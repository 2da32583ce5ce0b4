"""An MLflow model directory, checked on the host and packed into one "bundle" for the sandbox.

A model directory is a code bundle (``loader_module``, ``code/``, ``pickle_module_info.txt``,
pickles): the client never imports or unpickles anything in it. It only walks the tree with
``lstat``, reads ``MLmodel`` with ``yaml.safe_load`` under a size cap, and copies bytes.

Refused, each with a reason: symlinks, hard links (a file with more than one link may be the
same inode as something outside the model), FIFOs, sockets and devices, names that could
escape the root or confuse an extractor, paths in ``MLmodel`` that point outside the root, and
trees over the file-count or byte caps.

The bundle is a deterministic STORED zip: members sorted, ``MLmodel`` first, fixed timestamps
and modes, no directory entries. Stored (not deflated) members cannot be a compression bomb,
and the same directory always gives the same bytes, hence the same sha256. The broker opens
no archive: it takes the bundle for one because the client declares ``mlflow``, and picks the
sandbox by the flavor hint (:attr:`ModelDir.flavor_hint`); the worker, inside the sandbox,
re-checks every member before it reads one and refuses a bundle that is not what was declared
(it trusts nothing this module did).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import posixpath
import stat
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from airlock_client._errors import ModelSourceError
from airlock_sandbox.bundle import (
    MAX_MEMBERS,
    MAX_MLMODEL_BYTES,
    MLMODEL,
    BundleError,
    check_member_name,
    convertible_flavor,
    serialization_hint,
)

MAX_FILES = MAX_MEMBERS
MAX_TOTAL_BYTES = 4 * 1024**3
#: Fixed member timestamp (the zip epoch) so the bundle's bytes depend on content only.
EPOCH = (1980, 1, 1, 0, 0, 0)
COPY_BYTES = 1024 * 1024
UNSAFE = "UNSAFE_MODEL_DIR"
NOT_A_MODEL = "NOT_A_MODEL_DIR"
#: Flavor keys that hold a path inside the model directory.
PATH_KEYS = frozenset({"pickled_model", "model_data", "data", "model_path", "python_model",
                       "code"})


@dataclass(frozen=True)
class ModelFile:
    name: str  # relative POSIX path inside the model directory
    path: Path
    size: int
    device: int
    inode: int


@dataclass(frozen=True)
class ModelDir:
    """A checked model directory: its regular files and its parsed ``MLmodel``."""

    root: Path
    files: tuple[ModelFile, ...]
    total_bytes: int
    mlmodel: dict[str, Any]

    @property
    def flavors(self) -> tuple[str, ...]:
        flavors = self.mlmodel.get("flavors")
        return tuple(str(k) for k in flavors) if isinstance(flavors, dict) else ()

    @property
    def flavor_hint(self) -> str:
        """The flavor the sandbox will convert this model as ("" if none can be): sent to the
        broker, which opens no archive, so that it picks the right kind of sandbox."""
        flavors = self.mlmodel.get("flavors")
        return (convertible_flavor(flavors) or "") if isinstance(flavors, dict) else ""

    @property
    def serialization_hint(self) -> str:
        """How an estimator flavor's model file is stored ("pickle", "cloudpickle", "skops",
        "text"; "" for other flavors): sent beside the flavor, so that the broker reads a
        pickled estimator first and gives a skops or booster file no second sandbox."""
        flavors = self.mlmodel.get("flavors")
        if not isinstance(flavors, dict):
            return ""
        return serialization_hint(flavors, self.flavor_hint)


def refuse(message: str) -> ModelSourceError:
    return ModelSourceError(UNSAFE, message)


def check_name(name: str) -> None:
    """A relative POSIX path with plain components only: the worker's own rule, applied early."""
    try:
        check_member_name(name)
    except BundleError as exc:
        raise refuse(str(exc)) from None


def inspect(root: str | os.PathLike[str], *, max_files: int = MAX_FILES,
            max_total_bytes: int = MAX_TOTAL_BYTES) -> ModelDir:
    """Walk ``root`` without following anything; raise :class:`ModelSourceError` if unsafe."""
    base = Path(root)
    try:
        top = os.stat(base)  # the root itself may be a link the user made; nothing below it
    except OSError as exc:
        raise ModelSourceError(NOT_A_MODEL, f"{base}: {exc.strerror}") from None
    if not stat.S_ISDIR(top.st_mode):
        raise ModelSourceError(NOT_A_MODEL, f"{base} is not a directory")
    base = Path(os.path.realpath(base))
    files: list[ModelFile] = []
    total = seen = 0
    # Each directory with what it was when looked at (device, inode): listed through a
    # descriptor proved to be that directory, never by its path (see ``opened_as``).
    pending: list[tuple[Path, str, tuple[int, int]]] = [(base, "", (top.st_dev, top.st_ino))]
    while pending:
        directory, prefix, ident = pending.pop()
        fd = opened_as(directory, ident, prefix or ".")
        try:
            entries = listed(fd, max_files - seen, prefix or ".")
            seen += len(entries)  # directories too: a tree of empty ones is no smaller to walk
            if seen > max_files:
                raise refuse(f"more than {max_files} files and directories")
            for entry in entries:  # stat-ed through ``fd`` (fstatat): it stays open
                name = f"{prefix}{entry.name}"
                found = checked_entry(entry, name)
                if found is None:
                    st = entry.stat(follow_symlinks=False)
                    pending.append((directory / entry.name, f"{name}/",
                                    (st.st_dev, st.st_ino)))
                    continue
                found = replace(found, path=directory / entry.name)
                files.append(found)
                total += found.size
                if total > max_total_bytes:
                    raise refuse(f"more than {max_total_bytes} bytes in total")
        finally:
            os.close(fd)
    folded = [unicodedata.normalize("NFC", f.name).casefold() for f in files]
    if len(set(folded)) != len(folded):
        raise refuse("two paths differ only in case or Unicode normalisation")
    by_name = {f.name: f for f in files}
    if MLMODEL not in by_name:
        raise ModelSourceError(NOT_A_MODEL, f"{base} has no {MLMODEL} file at its root")
    mlmodel = read_mlmodel(by_name[MLMODEL])
    check_references(mlmodel)
    files.sort(key=lambda f: (f.name != MLMODEL, f.name))
    return ModelDir(root=base, files=tuple(files), total_bytes=total, mlmodel=mlmodel)


def opened_as(directory: Path, ident: tuple[int, int], shown: str) -> int:
    """A descriptor of ``directory``, which must still be the directory ``ident`` names
    (device, inode), to list it through. A directory is checked (``checked_entry``) and
    listed later: in between, whoever may write its parent can swap it, or a directory above
    it, for a link to a directory of the caller's, whose files would be listed as the
    model's (and pass ``open_checked``, which proves a file is the one listed). Such a swap
    is refused (``UNSAFE_MODEL_DIR``)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise refuse(f"{shown} changed while being read: {exc.strerror}") from None
    info = os.fstat(fd)
    if (info.st_dev, info.st_ino) != ident:
        os.close(fd)
        raise refuse(f"{shown} changed while being read (another directory is at its name)")
    return fd


def listed(directory: Path | int, limit: int, shown: str) -> list[os.DirEntry[str]]:
    """The entries of ``directory`` by name, at most ``limit + 1`` of them: reading stops
    there, and more than ``limit`` is the caller's to refuse."""
    try:
        with os.scandir(directory) as scan:
            entries = list(itertools.islice(scan, max(limit, 0) + 1))
    except OSError as exc:
        raise refuse(f"cannot list {shown}: {exc.strerror}") from None
    return sorted(entries, key=lambda e: e.name)


def checked_entry(entry: os.DirEntry[str], name: str) -> ModelFile | None:
    """The regular file ``entry`` is (``name`` inside the root), or None for a directory.

    Raises :class:`ModelSourceError` for an unsafe name, a symbolic link, a hard link or a
    special file; nothing is followed."""
    check_name(name)
    info = entry.stat(follow_symlinks=False)
    if stat.S_ISLNK(info.st_mode):
        raise refuse(f"{name} is a symbolic link")
    if stat.S_ISDIR(info.st_mode):
        return None
    if not stat.S_ISREG(info.st_mode):
        raise refuse(f"{name} is not a regular file (a FIFO, socket or device)")
    if info.st_nlink != 1:
        raise refuse(f"{name} is a hard link ({info.st_nlink} links)")
    return ModelFile(name, Path(entry.path), info.st_size, info.st_dev, info.st_ino)


def read_mlmodel(entry: ModelFile) -> dict[str, Any]:
    if entry.size > MAX_MLMODEL_BYTES:
        raise refuse(f"{MLMODEL} is {entry.size} bytes (limit {MAX_MLMODEL_BYTES})")
    raw = read_exact(entry, MAX_MLMODEL_BYTES)
    import yaml  # only model directories need it: a plain file's conversion does not load it

    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise refuse(f"{MLMODEL} is not valid YAML: {str(exc)[:200]}") from None
    except RecursionError:  # a few KB of nested brackets
        raise refuse(f"{MLMODEL} nests too deeply to be read") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("flavors"), dict):
        raise refuse(f"{MLMODEL} has no 'flavors' mapping")
    return doc


def check_references(mlmodel: dict[str, Any]) -> None:
    """Every path a flavor names must stay inside the model directory."""
    for flavor, conf in mlmodel["flavors"].items():
        if not isinstance(conf, dict):
            continue
        for key in PATH_KEYS & set(conf):
            value = conf[key]
            if value is None:
                continue
            if not isinstance(value, str):
                raise refuse(f"{MLMODEL}: flavors.{flavor}.{key} is not a path")
            normal = posixpath.normpath(value)
            if value.startswith("/") or "\\" in value or normal == ".." \
                    or normal.startswith("../"):
                raise refuse(f"{MLMODEL}: flavors.{flavor}.{key} = {value[:80]!r} points "
                             "outside the model directory")


def pack(model: ModelDir, dest: str | os.PathLike[str]) -> int:
    """Write the bundle to ``dest`` (which must not exist); returns its size in bytes."""
    with open(dest, "xb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED,
                                                  allowZip64=True) as zf:
        for entry in model.files:
            info = zipfile.ZipInfo(entry.name, date_time=EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # unix, so external_attr's mode bits are meaningful
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.file_size = entry.size
            with zf.open(info, "w", force_zip64=entry.size >= zipfile.ZIP64_LIMIT) as out:
                _copy_checked(entry, out)
    return os.stat(dest).st_size


def open_checked(entry: ModelFile) -> int:
    """Open without following a link, and prove it is still the file that was inspected."""
    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise refuse(f"{entry.name} changed while being read: {exc.strerror}") from None
    info = os.fstat(fd)
    if (not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_ino != entry.inode
            or info.st_dev != entry.device or info.st_size != entry.size):
        os.close(fd)
        raise refuse(f"{entry.name} changed while being read")
    return fd


@contextlib.contextmanager
def pinned(entry: ModelFile) -> Iterator[str]:
    """A path that names the very file inspected while the block runs: ``/proc/self/fd/N``
    of a descriptor opened without following a link and checked (:func:`open_checked`), so
    that whatever is put at its name meanwhile (a link to a file its owner may read and the
    directory's author may not, a FIFO) is not what is read. Where there is no ``/proc``,
    its name, checked."""
    fd = open_checked(entry)
    try:
        by_fd = f"/proc/self/fd/{fd}"
        yield by_fd if os.path.exists(by_fd) else str(entry.path)
    finally:
        os.close(fd)


def check_unchanged(entry: ModelFile) -> None:
    """Raise :class:`ModelSourceError` unless ``entry`` is still the regular file inspected."""
    os.close(open_checked(entry))


def read_exact(entry: ModelFile, cap: int) -> bytes:
    """The whole file, which must still be the one inspected and at most ``cap`` bytes."""
    fd = open_checked(entry)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(cap + 1)
    if len(data) != entry.size:
        raise refuse(f"{entry.name} changed while being read")
    return data


def _copy_checked(entry: ModelFile, out: Any) -> None:
    fd = open_checked(entry)
    copied = 0
    with os.fdopen(fd, "rb") as fh:
        while block := fh.read(min(COPY_BYTES, entry.size - copied + 1)):
            copied += len(block)
            if copied > entry.size:
                break
            out.write(block)
    if copied != entry.size:
        raise refuse(f"{entry.name} changed while being read")

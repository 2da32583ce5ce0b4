"""Verify a converted model directory as a whole (``airlock verify DIR``).

Each weights file is checked against its own signed record, as ``airlock verify FILE``
checks one file. A sharded directory is also checked against its index's record, which the
broker signed after checking the index against those same shard records: every shard the
index's record lists must be there with the sha256 it lists. That binds the set: a shard
swapped for another validly signed one (from another conversion) verifies alone and fails
here. Files the record does not list are reported, and so are the data files carried over
(``config.json``, tokenizer files), which have no signed record (the broker never saw them).

Reads only: file names are the ones this library writes (``_hf_dir``), looked up without
following links, and each file is hashed once.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from airlock_client import _hf_dir
from airlock_client.provenance import (
    INDEX_KIND,
    MAX_PROVENANCE_BYTES,
    SUFFIX,
    ProvenanceError,
    ProvenanceRecord,
    PublicKeyLike,
    provenance_path,
    verify,
)


@dataclass(frozen=True)
class VerifiedDirectory:
    """What ``verify_directory`` checked: every weights file with its record (shards in
    index order), the index's record when sharded, and the files left unsigned."""

    path: Path
    files: tuple[tuple[str, ProvenanceRecord], ...]
    index: ProvenanceRecord | None
    #: Carried data files: validated by the client when converted, not signed.
    unsigned: tuple[str, ...]


def verify_directory(path: str | os.PathLike[str],
                     public_key: PublicKeyLike) -> VerifiedDirectory:
    """Verify the model directory ``path`` (see the module's docstring) or raise
    ``ProvenanceError``: ``PROVENANCE_MISSING`` (a weights file or index without its
    record, or no weights at all), ``OUTPUT_MISMATCH`` (a file that is not what its record
    or the index's record says), ``UNEXPECTED_FILE`` (anything this command never writes),
    or what verifying one file raises."""
    root = Path(path)
    names = _entries(root)
    index = None
    if _hf_dir.SAFE_WEIGHTS_INDEX in names:
        index = _verified(root, _hf_dir.SAFE_WEIGHTS_INDEX, public_key)
        if index.kind != INDEX_KIND:
            raise ProvenanceError("OUTPUT_MISMATCH", f"the record of "
                                  f"{_hf_dir.SAFE_WEIGHTS_INDEX} is not an index's")
        weights = [_listed(root, shard) for shard in index.shards]
    else:
        weights = [n for n in (_hf_dir.SAFE_WEIGHTS, _hf_dir.SAFE_ADAPTER_WEIGHTS)
                   if n in names]
        if not weights:
            raise ProvenanceError("PROVENANCE_MISSING", f"{root} holds no "
                                  f"{_hf_dir.SAFE_WEIGHTS}, {_hf_dir.SAFE_WEIGHTS_INDEX} or "
                                  f"{_hf_dir.SAFE_ADAPTER_WEIGHTS}")
    files = []
    for name in weights:
        record = _verified(root, name, public_key)
        if index is not None and record.output_sha256 != _listed_sha256(index, name):
            raise ProvenanceError("OUTPUT_MISMATCH", f"{name} is not the shard the index's "
                                  "record lists (another conversion's shard, signed on its "
                                  "own, was put in its place)")
        files.append((name, record))
    signed = set(weights) | ({_hf_dir.SAFE_WEIGHTS_INDEX} if index is not None else set())
    known = signed | {n + SUFFIX for n in signed} | _hf_dir.CARRIED_FILES
    unexpected = sorted(names - known)
    if unexpected:
        raise ProvenanceError("UNEXPECTED_FILE", f"{root} holds {len(unexpected)} file(s) no "
                              f"record covers and no conversion writes, such as "
                              f"{unexpected[0][:120]!r}")
    return VerifiedDirectory(root, tuple(files), index,
                             tuple(sorted(names & _hf_dir.CARRIED_FILES)))


def _entries(root: Path) -> set[str]:
    """The directory's entry names; anything but a regular file is refused (not followed)."""
    try:
        entries = list(os.scandir(root))
    except OSError as exc:
        raise ProvenanceError("PROVENANCE_MISSING", f"cannot read {root}: "
                              f"{exc.strerror or exc}") from None
    for entry in entries:
        if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
            raise ProvenanceError("UNEXPECTED_FILE", f"{entry.name[:120]!r} in {root} is not "
                                  "a regular file (a link, a directory, ...)")
    return {e.name for e in entries}


def _verified(root: Path, name: str, public_key: PublicKeyLike) -> ProvenanceRecord:
    record_path = provenance_path(root / name)
    try:
        with record_path.open("rb") as fh:
            envelope = fh.read(MAX_PROVENANCE_BYTES + 1)
    except FileNotFoundError:
        raise ProvenanceError("PROVENANCE_MISSING", f"{name} has no signed record "
                              f"({record_path.name})") from None
    try:
        return verify(root / name, envelope, public_key)
    except ProvenanceError as exc:
        raise ProvenanceError(exc.reason, f"{name}: {exc.message}") from None


def _listed(root: Path, shard: object) -> str:
    name = shard.get("file_name") if isinstance(shard, dict) else None
    if not isinstance(name, str) or _hf_dir.SAFE_SHARD_NAME.fullmatch(name) is None:
        raise ProvenanceError("PROVENANCE_MALFORMED", "the index's record lists a shard that "
                              "is not named as a shard")
    if not (root / name).is_file():
        raise ProvenanceError("PROVENANCE_MISSING", f"{name}, listed by the index's record, "
                              "is missing")
    return name


def _listed_sha256(index: ProvenanceRecord, name: str) -> str:
    return next(str(s.get("sha256", "")) for s in index.shards if s.get("file_name") == name)


__all__ = ["VerifiedDirectory", "verify_directory"]

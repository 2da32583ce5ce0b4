"""Verify a converted model directory as a whole (``airlock verify DIR``).

Each weights file is checked against its own signed record, as ``airlock verify FILE``
checks one file. A sharded directory is also checked against its index's record, which the
broker signed after checking the index against those same shard records: every shard the
index's record lists must be there, with the sha256 and job id it lists, and nothing else.
A shard swapped for another validly signed one (from another conversion) verifies alone and
fails here, unless whoever swapped it could also have the broker sign a new index: any
caller with the convert role can. So who asked for the index, and what it was said to be,
is part of the answer (printed; ``principals`` and ``subject`` pin them).

The data files carried over (``config.json``, ``adapter_config.json``, tokenizer files) steer
loading: each must have its own record, as a data file of its kind (the broker had it checked
in a sandbox and returned it unchanged), and match it, signed as part of this directory (its
subject) at the request of whoever asked for the directory (its principal). With
authentication off every caller is the same principal, and then only the subject binds it.
A directory converted before data files were signed fails here (``PROVENANCE_MISSING``):
convert it again.

Every file is opened relative to the directory's descriptor, without following a link and
without blocking on a FIFO, checked to be the regular file listed, and hashed from that
descriptor.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from airlock_client import _hf_dir
from airlock_client.provenance import (
    CONVERSION_KIND,
    DATA_FORMAT,
    INDEX_KIND,
    MAX_PROVENANCE_BYTES,
    SUFFIX,
    ProvenanceError,
    ProvenanceRecord,
    PublicKeyLike,
    check_source,
    check_stream,
    file_subject,
    open_regular,
    verify_envelope,
)


@dataclass(frozen=True)
class VerifiedDirectory:
    """What ``verify_directory`` checked: every weights file with its record (shards in
    index order), the index's record when sharded, and each carried data file's record."""

    path: Path
    files: tuple[tuple[str, ProvenanceRecord], ...]
    index: ProvenanceRecord | None
    #: Carried data files (sorted by name), each with its record.
    carried: tuple[tuple[str, ProvenanceRecord], ...]

    @property
    def whole(self) -> ProvenanceRecord:
        """The record that names the directory: the index's, or the one weights file's."""
        return self.index if self.index is not None else self.files[0][1]


def verify_directory(path: str | os.PathLike[str], public_key: PublicKeyLike, *,
                     subject: str | None = None,
                     principals: Collection[str] | None = None) -> VerifiedDirectory:
    """Verify the model directory ``path`` (see the module's docstring) or raise
    ``ProvenanceError``: ``PROVENANCE_MISSING`` (a weights file or index without its
    record, or no weights at all), ``OUTPUT_MISMATCH`` (a file that is not what its record
    or the index's record says), ``UNEXPECTED_FILE`` (anything this command never writes,
    or that is not a regular file), or what verifying one file raises. ``subject``: what the
    directory was said to be when converted (the index's, or the one weights file's);
    ``principals``: who may have asked for each record."""
    root = Path(path)
    try:
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ProvenanceError("PROVENANCE_MISSING", f"cannot read {root}: "
                              f"{exc.strerror or exc}") from None
    try:
        return _verify(root, dir_fd, public_key, subject, principals)
    finally:
        os.close(dir_fd)


def _verify(root: Path, dir_fd: int, key: PublicKeyLike, subject: str | None,
            principals: Collection[str] | None) -> VerifiedDirectory:
    names = _entries(dir_fd, root)
    index = None
    if _hf_dir.SAFE_WEIGHTS_INDEX in names:
        index = _verified(dir_fd, _hf_dir.SAFE_WEIGHTS_INDEX, key)
        listed = listed_shards(index)
        weights = list(listed)
    else:
        listed = {}
        weights = [n for n in (_hf_dir.SAFE_WEIGHTS, _hf_dir.SAFE_ADAPTER_WEIGHTS)
                   if n in names]
        if len(weights) != 1:
            raise ProvenanceError(
                "PROVENANCE_MISSING" if not weights else "UNEXPECTED_FILE",
                f"{root} holds no {_hf_dir.SAFE_WEIGHTS}, {_hf_dir.SAFE_WEIGHTS_INDEX} or "
                f"{_hf_dir.SAFE_ADAPTER_WEIGHTS}" if not weights else
                f"{root} holds both {weights[0]} and {weights[1]}: no conversion writes both")
    files = []
    for name in weights:
        if name not in names:
            raise ProvenanceError("PROVENANCE_MISSING", f"{name}, listed by the index's "
                                  "record, is missing")
        record = _verified(dir_fd, name, key)
        check_weights_record(name, record, listed)
        files.append((name, record))
    whole = index if index is not None else files[0][1]
    carried = [(name, check_carried_record(name, _verified(dir_fd, name, key), whole))
               for name in sorted(names & _hf_dir.CARRIED_FILES)]
    signed = (set(weights) | {n for n, _ in carried}
              | ({_hf_dir.SAFE_WEIGHTS_INDEX} if index is not None else set()))
    known = signed | {n + SUFFIX for n in signed}
    unexpected = sorted(names - known)
    if unexpected:
        raise ProvenanceError("UNEXPECTED_FILE", f"{root} holds {len(unexpected)} file(s) no "
                              f"record covers and no conversion writes, such as "
                              f"{unexpected[0][:120]!r}")
    records = [r for _, r in files] + ([index] if index is not None else [])
    if subject is not None:  # the index's, which names the directory; or the one file's
        check_source(records[-1], subject=subject)
    for record in records + [r for _, r in carried] if principals is not None else []:
        check_source(record, principals=principals)
    return VerifiedDirectory(root, tuple(files), index, tuple(carried))


def check_weights_record(name: str, record: ProvenanceRecord,
                         listed: dict[str, tuple[str, str]]) -> None:
    """``name``'s record must be a safetensors conversion's, and the shard the index's
    record lists under that name (``listed``: ``listed_shards``; empty when unsharded)."""
    if record.output_format != "safetensors" or record.kind != CONVERSION_KIND:
        raise ProvenanceError("OUTPUT_MISMATCH", f"{name}: its record is not a safetensors "
                              f"conversion's (output {record.output_format[:20]!r})")
    if listed and (record.output_sha256, record.job_id) != listed.get(name):
        raise ProvenanceError("OUTPUT_MISMATCH", f"{name} is not the shard the index's "
                              "record lists (another conversion's shard, signed on its "
                              "own, was put in its place)")


def check_carried_record(name: str, record: ProvenanceRecord,
                         whole: ProvenanceRecord) -> ProvenanceRecord:
    """A carried data file's record, checked against its kind and the directory it was
    signed as part of (``whole``: the index's record, or the one weights file's)."""
    kind = _hf_dir.kind_of(name).value
    if record.output_format != DATA_FORMAT or record.declared_format != kind:
        raise ProvenanceError("OUTPUT_MISMATCH", f"{name}: its record is not a {kind} data "
                              f"file's (output {record.output_format[:20]!r}, declared "
                              f"{record.declared_format[:20]!r})")
    if (record.output_sha256, record.output_size) != (record.input_sha256, record.input_size):
        # Carried unchanged (docs/provenance.md): the broker refuses anything else, and the
        # client does not take its word for it (a twin compares the input with the source).
        raise ProvenanceError("OUTPUT_MISMATCH", f"{name}: its record says the bytes carried "
                                                 "differ from the bytes given")
    if not _same_directory(whole, record.subject, name):
        raise ProvenanceError(
            "OUTPUT_MISMATCH", f"{name} was signed as part of another directory (subject "
                               f"{record.subject[-200:]!r}; this one's is "
                               f"{whole.subject[-200:]!r}): another conversion's data file "
                               "was put in its place")
    # A subject is the caller's word: any caller may name any directory. One directory is
    # one caller's conversion, so its data files were asked for by whoever asked for it.
    if (record.principal, record.principal_method) != (whole.principal,
                                                       whole.principal_method):
        raise ProvenanceError(
            "OUTPUT_MISMATCH", f"{name} was asked for by {record.principal[:80]!r} "
                               f"({record.principal_method[:20]}), the directory by "
                               f"{whole.principal[:80]!r} ({whole.principal_method[:20]}): "
                               "another caller's data file was put in its place")
    return record


def _same_directory(whole: ProvenanceRecord, subject: str, name: str) -> bool:
    """Whether a data file's signed ``subject`` is what ``convert DIR`` signs ``name`` as in
    the directory ``whole`` describes (provenance.file_subject). An index's subject is the
    directory's; the one weights file's is the directory's with its source file's name after
    it. A subject clipped at the front (a long path) is compared on what both still hold."""
    directory = whole.subject
    if whole.kind != INDEX_KIND:
        directory = directory.rpartition("/")[0] if "/" in directory else ""
    expected = file_subject(directory, name)
    if subject == expected:
        return True
    clipped_mine, clipped_theirs = expected.startswith("…"), subject.startswith("…")
    mine, theirs = expected.lstrip("…"), subject.lstrip("…")
    if not (mine and theirs):
        return False
    if clipped_mine and clipped_theirs:  # the shorter is the end of the longer
        return mine.endswith(theirs) or theirs.endswith(mine)
    if clipped_mine:  # only the expected one lost its start: the record's ends with it
        return theirs.endswith(mine)
    if clipped_theirs:  # only the record's lost its start: it is the end of the expected
        return mine.endswith(theirs)
    return False


#: The most entries an output of ``convert DIR`` holds: every shard an index may name (what
#: the broker attests), the index, each carried data file, and the record beside each. A
#: directory with more is read no further (one of millions was listed whole into memory).
MAX_ENTRIES = 2 * (_hf_dir.MAX_SHARDS + 1 + len(_hf_dir.CARRIED_FILES))


def _entries(dir_fd: int, root: Path) -> set[str]:
    """The directory's entry names; anything but a regular file is refused (not followed),
    and so is a directory of more than ``MAX_ENTRIES`` (after reading one more)."""
    names: set[str] = set()
    try:
        with os.scandir(dir_fd) as entries:
            for seen, entry in enumerate(entries):
                if seen == MAX_ENTRIES:
                    raise ProvenanceError("UNEXPECTED_FILE", f"{root} holds more than "
                                          f"{MAX_ENTRIES} entries: no conversion writes that "
                                          "many")
                if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                    raise ProvenanceError("UNEXPECTED_FILE", f"{entry.name[:120]!r} in {root} "
                                          "is not a regular file (a link, a directory, ...)")
                names.add(entry.name)
    except OSError as exc:
        raise ProvenanceError("UNEXPECTED_FILE", f"{root} changed while being read: "
                              f"{exc.strerror or exc}") from None
    return names


def _verified(dir_fd: int, name: str, key: PublicKeyLike) -> ProvenanceRecord:
    """``name``'s record, checked against ``name``'s bytes; both read through descriptors."""
    try:
        with _opened(dir_fd, name + SUFFIX) as fh:
            envelope = fh.read(MAX_PROVENANCE_BYTES + 1)
    except FileNotFoundError:
        raise ProvenanceError("PROVENANCE_MISSING", f"{name} has no signed record "
                              f"({name}{SUFFIX})") from None
    except OSError as exc:
        raise ProvenanceError("OUTPUT_MISMATCH", f"cannot read {name}{SUFFIX}: "
                              f"{exc.strerror or exc}") from None
    try:
        record = verify_envelope(envelope, key)
        try:
            with _opened(dir_fd, name) as fh:
                check_stream(fh, record)
        except OSError as exc:
            raise ProvenanceError("OUTPUT_MISMATCH", f"cannot read it: "
                                  f"{exc.strerror or exc}") from None
    except ProvenanceError as exc:
        raise ProvenanceError(exc.reason, f"{name}: {exc.message}") from None
    return record


def _opened(dir_fd: int, name: str) -> BinaryIO:
    """``name`` in the directory, opened for reading if it is a regular file: never through
    a link, never blocking on a FIFO put there since the listing. Raises ``OSError``
    (``FileNotFoundError`` when it is gone) or ``ProvenanceError``."""
    try:
        return open_regular(Path(name), dir_fd=dir_fd, follow=False)
    except ProvenanceError as exc:
        raise ProvenanceError(exc.reason, f"{name} is not a regular file") from None
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a link put there since the listing
        raise ProvenanceError("UNEXPECTED_FILE", f"{name} cannot be opened as a regular "
                              f"file: {exc.strerror or exc}") from None


def listed_shards(index: ProvenanceRecord) -> dict[str, tuple[str, str]]:
    """The shards the index's record lists: file name -> (sha256, job id), in its order;
    raises unless it is an index's record."""
    if index.kind != INDEX_KIND:
        raise ProvenanceError("OUTPUT_MISMATCH", f"the record of "
                              f"{_hf_dir.SAFE_WEIGHTS_INDEX} is not an index's")
    listed: dict[str, tuple[str, str]] = {}
    for shard in index.shards:
        name = shard.get("file_name")
        if not isinstance(name, str) or _hf_dir.SAFE_SHARD_NAME.fullmatch(name) is None \
                or name in listed:
            raise ProvenanceError("PROVENANCE_MALFORMED", "the index's record lists a shard "
                                  "that is not named as a shard, or one twice")
        listed[name] = (str(shard.get("sha256", "")), str(shard.get("job_id", "")))
    return listed


__all__ = ["VerifiedDirectory", "verify_directory"]

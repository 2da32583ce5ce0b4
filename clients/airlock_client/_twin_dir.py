"""Whether a registry version is the verified conversion of a source version that holds a
Hugging Face model directory (an MLflow ``transformers`` model with PyTorch weights): its
*directory twin*.

Such a source is converted file by file (``model_dir.convert_directory``): one record per
shard and per carried data file, each signed as ``models:/NAME/V/FILE`` with that file's own
sha256 as its input, plus the index's record (sharded models), which the broker signed after
checking it against the shards' records. There is no one digest of the whole source to
compare, so a directory twin counts as the conversion of ``NAME/V`` only when

- the twin's directory verifies as a whole with the pinned key (``verify_dir``: every file
  against its record, the shards against the index's record, nothing else in it);
- the index's record (or the one weights file's) is signed as ``models:/NAME/V`` (or
  ``models:/NAME/V/FILE``);
- each weights record names one source weights file, under its name, and its signed input is
  that file's sha256 and size; every source weights file is covered, none twice;
- each carried data file's record names the source data file of that name and its bytes;
- one principal asked for all of it (and an allowed one, when the caller names any);
- and the twin's tags say what the records say.

The source's files are hashed from the registry's copy, downloaded (bytes only) by the caller.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from airlock_client import _bundle, _hf_dir
from airlock_client import _lineage as tags
from airlock_client._errors import SafeLoadError
from airlock_client._registry import ModelVersion, Registry, tag
from airlock_client._twin import Download
from airlock_client.provenance import (
    ProvenanceError,
    ProvenanceRecord,
    PublicKeyLike,
    check_source,
    digest_of,
    file_subject,
    shown,
)
from airlock_client.verify_dir import VerifiedDirectory, verify_directory


@dataclass(frozen=True)
class SourceFiles:
    """A source directory's weights and data files: name -> (sha256, size)."""

    weights: Mapping[str, tuple[str, int]]
    data: Mapping[str, tuple[str, int]]


@dataclass(frozen=True)
class DirectoryTwin:
    """A registry version whose downloaded directory verified with the pinned key (its source
    not yet): ``verified.path`` is where it was downloaded to."""

    name: str
    version: str
    verified: VerifiedDirectory

    @property
    def record(self) -> ProvenanceRecord:
        return whole_record(self.verified)


def is_directory_source(model_dir: Path) -> bool:
    """Whether a fetched source version is converted as a model directory (an MLflow
    transformers model with PyTorch weights). Raises ``ModelSourceError`` for a bundle that
    is unsafe to read."""
    return _hf_dir.kind(model_dir) == "pytorch"


def source_files(model_dir: Path) -> SourceFiles:
    """Hash the files of ``model_dir`` that a directory conversion reads (weights and data
    files), each through a descriptor checked to be the file listed."""
    model = _hf_dir.inspect(model_dir)

    def digest(entry: _bundle.ModelFile) -> tuple[str, int]:
        with os.fdopen(_bundle.open_checked(entry), "rb") as fh:
            return digest_of(fh)

    return SourceFiles(weights={s.source.name: digest(s.source) for s in model.shards},
                       data={d.name: digest(d.source) for d in model.data_files})


def whole_record(verified: VerifiedDirectory) -> ProvenanceRecord:
    """The record that names the directory: the index's, or the one weights file's."""
    return verified.index if verified.index is not None else verified.files[0][1]


def directory_tags(name: str, version: str, verified: VerifiedDirectory) -> dict[str, str]:
    """The tags of a directory twin: a file twin's, from the record that names the directory,
    with the layout, and "code ran" if it ran for any file."""
    whole = whole_record(verified)
    records = [r for _, r in verified.files] + [r for _, r in verified.carried]
    return {**tags.twin_tags(name, version, whole, whole.output_name),
            tags.OUTPUT_LAYOUT: tags.LAYOUT_DIRECTORY,
            tags.EXECUTED_CODE: "true" if any(map(tags.executed_code, records)) else "false"}


def check_directory_source(verified: VerifiedDirectory, source: SourceFiles, subject: str, *,
                           principals: Collection[str] | None = None) -> ProvenanceRecord:
    """Raise ``ProvenanceError`` unless ``verified`` is the conversion of the directory whose
    files are ``source``, signed as ``subject`` (see the module's docstring); return the
    record that names the directory."""
    whole = whole_record(verified)
    if verified.index is not None:
        check_source(verified.index, subject=subject)
    by_subject = {file_subject(subject, n): n for n in source.weights}
    covered: set[str] = set()
    for out_name, record in verified.files:
        name = by_subject.get(record.subject)
        if name is None or name in covered:
            raise ProvenanceError("SOURCE_MISMATCH", f"{out_name} is signed as a conversion "
                                  f"of {shown(record.subject)}, not of a weights file of "
                                  f"{shown(subject)}" + (" (one is covered twice)"
                                                         if name in covered else ""))
        _same_bytes(out_name, record, source.weights[name], name)
        covered.add(name)
    missing = sorted(set(source.weights) - covered)
    if missing:
        raise ProvenanceError("SOURCE_MISMATCH", f"{len(missing)} weights file(s) of "
                              f"{shown(subject)} have no converted shard, such as "
                              f"{missing[0][:120]!r}")
    for name, record in verified.carried:
        if name not in source.data or record.subject != file_subject(subject, name):
            raise ProvenanceError("SOURCE_MISMATCH", f"{name} is not a data file of "
                                  f"{shown(subject)} (signed as {shown(record.subject)})")
        _same_bytes(name, record, source.data[name], name)
    asker = (whole.principal, whole.principal_method)
    for _, record in verified.files:
        if (record.principal, record.principal_method) != asker:
            raise ProvenanceError("PRINCIPAL_NOT_ALLOWED", f"{record.output_name[:80]!r} was "
                                  f"asked for by {record.principal[:80]!r}, the directory by "
                                  f"{whole.principal[:80]!r}")
    if principals is not None:
        check_source(whole, principals=principals)  # verify_dir held the others to it
    return whole


def read_directory_twin(registry: Registry, download: Download, mv: ModelVersion,
                        public_key: PublicKeyLike, dest: Path) -> DirectoryTwin:
    """Download ``mv``'s directory into ``dest`` (an empty directory; bytes only) and verify
    it as a whole with ``public_key``."""
    name, version = str(mv.name), str(mv.version)
    if tag(mv, tags.OUTPUT_LAYOUT) != tags.LAYOUT_DIRECTORY:
        raise SafeLoadError("NOT_AIRLOCK_OUTPUT", f"{name} version {version} is not a "
                                                  "directory registered by airlock migrate")
    base = registry.get_model_version_download_uri(name, version).rstrip("/")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(download(base, dest))
    except Exception as exc:  # the artifact store's own errors
        raise SafeLoadError("ARTIFACT_MISSING", f"cannot download {base}: "
                            f"{type(exc).__name__}: {tags.clip(str(exc), 200)}") from exc
    if local.is_symlink() or not local.resolve().is_relative_to(dest.resolve()):
        raise SafeLoadError("ARTIFACT_UNSAFE", f"the download of {base} left the directory it "
                                               "was given")
    verified = verify_directory(local, public_key)
    twin = DirectoryTwin(name, version, verified)
    if tag(mv, tags.OUTPUT_SHA256) != twin.record.output_sha256:
        raise SafeLoadError("TAG_MISMATCH", "the version's output_sha256 tag is not the signed "
                                            "output's: the registry entry was altered")
    return twin


def check_directory_lineage(twin: DirectoryTwin, mv: ModelVersion, *, model: str,
                            version: str, source: SourceFiles,
                            principals: Collection[str] | None = None) -> None:
    """Raise unless ``twin`` is the conversion of ``model`` version ``version``, whose files
    are ``source``, and its tags say so."""
    from airlock_client._twin import source_subject

    where = f"{twin.name} version {twin.version}"
    if tag(mv, tags.SOURCE_MODEL) != model or tag(mv, tags.SOURCE_VERSION) != version:
        raise SafeLoadError("TAG_MISMATCH", f"{where}'s source tags do not name {model} "
                                            f"version {version}")
    check_directory_source(twin.verified, source, source_subject(model, version),
                           principals=principals)
    signed = directory_tags(model, version, twin.verified)
    lying = sorted(k for k, v in signed.items() if (mv.tags or {}).get(k) not in (None, v))
    if lying:
        raise SafeLoadError("TAG_MISMATCH", f"{where}'s tag {lying[0]} is not what its signed "
                                            "provenance says: the registry entry was altered")


def _same_bytes(out_name: str, record: ProvenanceRecord, source: tuple[str, int],
                name: str) -> None:
    sha256, size = source
    if (record.input_sha256, record.input_size) != (sha256, size):
        raise ProvenanceError("SOURCE_MISMATCH", f"{out_name} was converted from other bytes "
                              f"than the source's {name[:120]!r} (signed input "
                              f"{record.input_sha256[:12]}…, {record.input_size} bytes; the "
                              f"source's {sha256[:12]}…, {size} bytes)")

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
  ``models:/NAME/V/FILE``), and the index is the one the shards' own headers make;
- each weights record names one source weights file, under its name, its output has the name
  that file's conversion gets, and its signed input is that file's sha256 and size; every
  source weights file is covered, none twice;
- each of the source's data files is carried, and its record names the source data file of
  that name and its bytes (a conversion that had to leave one out is no twin: a model whose
  tokenizer's chat template went missing is not the model);
- every file was converted under ``safe_only`` (``DIRECTORY_POLICY``: what ``migrate`` asks
  for), so none ran the source's code; one principal asked for all of it (and an allowed
  one, when the caller names any);
- and the twin's tags say what the records say.

The source's files are hashed from the registry's copy, downloaded (bytes only) by the caller.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from airlock_client import _bundle, _hf_dir, _st_header
from airlock_client import _lineage as tags
from airlock_client._errors import AirlockError, SafeLoadError
from airlock_client._registry import ModelVersion, Registry, tag
from airlock_client._twin import (
    Download,
    Listing,
    check_listed_sizes,
    check_listing,
    check_output_tag,
    check_tags,
    downloaded,
    files_of,
    read_small,
    source_subject,
)
from airlock_client.model_dir import DIRECTORY_POLICY
from airlock_client.provenance import (
    MAX_PROVENANCE_BYTES,
    SUFFIX,
    ProvenanceError,
    ProvenanceRecord,
    PublicKeyLike,
    check_source,
    digest_of,
    file_subject,
    shown,
    verify_envelope,
)
from airlock_client.verify_dir import (
    VerifiedDirectory,
    check_carried_record,
    check_weights_record,
    listed_shards,
    verify_directory,
)

_COPY = 1024 * 1024


@dataclass(frozen=True)
class SourceFiles:
    """A source directory's weights and data files: name -> (sha256, size); and the name
    each weights file's conversion gets (``model-00001-of-00002.safetensors``)."""

    weights: Mapping[str, tuple[str, int]]
    data: Mapping[str, tuple[str, int]]
    outputs: Mapping[str, str]
    #: Whether it has an index (its conversion then has one too).
    sharded: bool


@dataclass(frozen=True)
class DirectoryTwin:
    """A registry version whose downloaded directory verified with the pinned key (its source
    not yet): ``verified.path`` is where it was downloaded to."""

    name: str
    version: str
    verified: VerifiedDirectory


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
                       data={d.name: digest(d.source) for d in model.data_files},
                       outputs={s.source.name: s.output_name for s in model.shards},
                       sharded=model.sharded)


def executed_code(verified: VerifiedDirectory) -> bool:
    """Whether any file's conversion says it ran the source's code."""
    return any(tags.executed_code(r) for r in _records(verified))


def directory_tags(name: str, version: str, verified: VerifiedDirectory) -> dict[str, str]:
    """The tags of a directory twin: a file twin's, from the record that names the directory,
    with the layout, and "code ran" if it ran for any file."""
    whole = verified.whole
    return {**tags.twin_tags(name, version, whole, whole.output_name),
            tags.OUTPUT_LAYOUT: tags.LAYOUT_DIRECTORY,
            tags.EXECUTED_CODE: "true" if executed_code(verified) else "false"}


def check_directory_source(verified: VerifiedDirectory, source: SourceFiles, subject: str, *,
                           principals: Collection[str] | None = None,
                           index_file: bool = True) -> ProvenanceRecord:
    """Raise ``ProvenanceError`` unless ``verified`` is the conversion of the directory whose
    files are ``source``, signed as ``subject`` (see the module's docstring); return the
    record that names the directory. ``index_file``: also check the index file against the
    shards' files (False: only their records are there yet)."""
    whole = verified.whole
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
        if out_name != source.outputs[name]:
            raise ProvenanceError("OUTPUT_MISMATCH", f"{out_name[:120]!r} holds the conversion "
                                  f"of {name[:120]!r}, which is named "
                                  f"{source.outputs[name]!r}")
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
    left_out = sorted(set(source.data) - {name for name, _ in verified.carried})
    if left_out:
        raise ProvenanceError("SOURCE_MISMATCH", f"{len(left_out)} data file(s) of "
                              f"{shown(subject)} are not in the directory, such as "
                              f"{left_out[0][:120]!r}")
    asker = (whole.principal, whole.principal_method)
    for record in _records(verified):
        if (record.principal, record.principal_method) != asker:
            raise ProvenanceError("PRINCIPAL_NOT_ALLOWED", f"{record.output_name[:80]!r} was "
                                  f"asked for by {record.principal[:80]!r}, the directory by "
                                  f"{whole.principal[:80]!r}")
        if record.loading_policy != DIRECTORY_POLICY:
            raise ProvenanceError("POLICY_MISMATCH", f"{record.output_name[:80]!r} was "
                                  f"converted under {record.loading_policy[:20]!r}, not "
                                  f"{DIRECTORY_POLICY!r}: the source's code may have made it")
    if principals is not None:
        check_source(whole, principals=principals)
    if (verified.index is not None) != source.sharded:
        raise ProvenanceError("SOURCE_MISMATCH", f"{shown(subject)} is "
                              f"{'' if source.sharded else 'not '}sharded, and the directory "
                              f"{'has no' if source.sharded else 'has an'} index")
    if verified.index is not None and index_file:
        _check_index(verified)
    return whole


def read_directory_twin(registry: Registry, download: Download, mv: ModelVersion,
                        public_key: PublicKeyLike, dest: Path, source: SourceFiles,
                        subject: str, *, listing: Listing | None = None) -> DirectoryTwin:
    """Download ``mv``'s directory into the new directory ``dest`` (bytes only) and verify it
    as a whole with ``public_key``, as the conversion of ``source`` signed as ``subject``.

    Only the files such a conversion holds are downloaded, named from the source (its
    weights files' outputs, the index when sharded, every data file), never from what the
    twin holds: their records first (small), each checked as ``verify_dir`` checks it and
    against the source before any weights file is downloaded (a data file's signed size
    its source's), and then each file, refused when its size is not the signed one. A twin
    whose records do not verify costs no weights file.

    With ``listing``, the folder must first hold exactly these files (anything beside them,
    an ``MLmodel``, a script, is no twin's), its records within their cap, and each file at
    its signed size as the store reports it: nothing listed oversized is downloaded (a file
    swapped between the listing and the download is refused by its hash, after it was).
    Without it, the store's download writes a whole file before its size can be seen."""
    name, version = str(mv.name), str(mv.version)
    if tag(mv, tags.OUTPUT_LAYOUT) != tags.LAYOUT_DIRECTORY:
        raise SafeLoadError("NOT_AIRLOCK_OUTPUT", f"{name} version {version} is not a "
                                                  "directory registered by airlock migrate")
    base = files_of(registry, name, version)
    names = sorted({*source.outputs.values(), *source.data}
                   | ({_hf_dir.SAFE_WEIGHTS_INDEX} if source.sharded else set()))
    where = f"{name} version {version}"
    found = None if listing is None else check_listing(
        listing, base, {n: None for n in names} | {n + SUFFIX: MAX_PROVENANCE_BYTES
                                                   for n in names}, where)
    dest.mkdir()
    scratch = dest.with_name(dest.name + ".download")
    scratch.mkdir()
    try:
        records = {}
        for i, file_name in enumerate(names):
            envelope = read_small(download, f"{base}/{file_name}{SUFFIX}", scratch / f"r{i}",
                                  MAX_PROVENANCE_BYTES)
            records[file_name] = verify_envelope(envelope, public_key)
            (dest / (file_name + SUFFIX)).write_bytes(envelope)
        _check_records(records, source)
        listed = VerifiedDirectory(
            dest, tuple((n, records[n]) for n in sorted(source.outputs.values())),
            records.get(_hf_dir.SAFE_WEIGHTS_INDEX),
            tuple((n, records[n]) for n in sorted(source.data)))
        check_directory_source(listed, source, subject, index_file=False)
        if found is not None:
            check_listed_sizes(found, {n: records[n].output_size for n in names}, where)
        for i, file_name in enumerate(names):
            with downloaded(download, f"{base}/{file_name}", scratch / f"f{i}",
                            records[file_name].output_size) as fh, \
                    open(dest / file_name, "xb") as out:
                shutil.copyfileobj(fh, out, _COPY)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    verified = verify_directory(dest, public_key)
    check_output_tag(mv, verified.whole)
    return DirectoryTwin(name, version, verified)


def check_directory_lineage(twin: DirectoryTwin, mv: ModelVersion, *, model: str,
                            version: str, source: SourceFiles,
                            principals: Collection[str] | None = None) -> None:
    """Raise unless ``twin`` is the conversion of ``model`` version ``version``, whose files
    are ``source``, and its tags say so."""
    where = f"{twin.name} version {twin.version}"
    if tag(mv, tags.SOURCE_MODEL) != model or tag(mv, tags.SOURCE_VERSION) != version:
        raise SafeLoadError("TAG_MISMATCH", f"{where}'s source tags do not name {model} "
                                            f"version {version}")
    check_directory_source(twin.verified, source, source_subject(model, version),
                           principals=principals)
    check_tags(mv, directory_tags(model, version, twin.verified), where)


def _check_records(records: Mapping[str, ProvenanceRecord], source: SourceFiles) -> None:
    """``verify_dir``'s checks of each record (kind, format, the index's listing), and a data
    file's size (its source's, carried unchanged), before any weights file is downloaded.
    A weights file's size has no bound from its source: a pickle of views of one storage
    becomes several whole tensors."""
    index = records.get(_hf_dir.SAFE_WEIGHTS_INDEX)
    listed = listed_shards(index) if index is not None else {}
    outputs = {out: name for name, out in source.outputs.items()}
    if index is not None and set(listed) != set(outputs):
        raise ProvenanceError("OUTPUT_MISMATCH", "the index's record lists other shards than "
                              "the source's conversion has")
    for out in outputs:
        check_weights_record(out, records[out], listed)
    whole = index if index is not None else records[next(iter(outputs))]
    for name, (_, size) in source.data.items():
        check_carried_record(name, records[name], whole)
        if records[name].output_size != size:
            raise ProvenanceError("OUTPUT_MISMATCH", f"{name} is signed at "
                                  f"{records[name].output_size} bytes; the source's is {size}")


def _records(verified: VerifiedDirectory) -> list[ProvenanceRecord]:
    """The records of every converted and carried file (not the index's)."""
    return [r for _, r in verified.files] + [r for _, r in verified.carried]


def _check_index(verified: VerifiedDirectory) -> None:
    """The index must be the one the shards' own headers make (``model_dir`` writes it so):
    the broker checked its weight map and total size; this holds the rest of its bytes too."""
    try:
        headers = [(name, _st_header.read_header(verified.path / name)) for name, _ in
                   sorted(verified.files)]
    except AirlockError as exc:  # the broker validated them: not reached but by a bug
        raise ProvenanceError("OUTPUT_MISMATCH", exc.message) from None
    index = verified.path / _hf_dir.SAFE_WEIGHTS_INDEX
    if index.read_bytes() != _st_header.index_document(headers):
        raise ProvenanceError("OUTPUT_MISMATCH", f"{_hf_dir.SAFE_WEIGHTS_INDEX} is not the "
                              "index its shards make: it holds something else beside them")


def _same_bytes(out_name: str, record: ProvenanceRecord, source: tuple[str, int],
                name: str) -> None:
    sha256, size = source
    if (record.input_sha256, record.input_size) != (sha256, size):
        raise ProvenanceError("SOURCE_MISMATCH", f"{out_name} was converted from other bytes "
                              f"than the source's {name[:120]!r} (signed input "
                              f"{record.input_sha256[:12]}…, {record.input_size} bytes; the "
                              f"source's {sha256[:12]}…, {size} bytes)")

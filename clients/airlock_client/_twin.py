"""Whether a registry version is a verified Airlock conversion of a given source version.

``airlock migrate`` registers the conversion of ``NAME/V`` as a version of ``NAME-airlock``,
its *twin*, with tags saying which source version it is for. Tags are bookkeeping that anyone
with write access to the registry can set, and so is a new version: an attacker can send a
backdoored ONNX through Airlock (it gets a valid signature: the broker signs whatever it
validated), register it as ``NAME-airlock/N`` and tag it as the twin of ``NAME/3``. So a twin
counts as the conversion of ``NAME/V`` only when

- its two files verify with the pinned key (signature, then the model file's sha256 and size);
- the signed subject is ``models:/NAME/V`` (records of version 2; version 1 named none);
- the signed input sha256 is the sha256 of ``NAME/V``'s files as the client packs them for
  the broker (:func:`bundle_sha256`: the bundle is deterministic), computed here from the
  registry's bytes or given by a caller who pinned it. This is the check that decides: the
  subject is only what the converting caller said;
- the principal that asked for it is an allowed one, when the caller names any;
- and the twin's tags agree with all that (a tag that disagrees is refused, never believed).

``load_verified`` runs these checks before it loads; ``migrate`` before it counts a version as
already migrated or points an alias at a twin.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from airlock_client import _bundle
from airlock_client import _lineage as tags
from airlock_client._downloads import Downloads
from airlock_client._errors import DOWNLOAD_FAILED, TOO_LARGE, ModelSourceError, SafeLoadError
from airlock_client._registry import ModelVersion, Registry, tag
from airlock_client._run_dir import scratch_dir
from airlock_client.provenance import (
    MAX_PROVENANCE_BYTES,
    ProvenanceError,
    ProvenanceRecord,
    PublicKeyLike,
    check_output,
    check_source,
    escape_subject,
    shown,
    verify_envelope,
)

#: ORT takes an ONNX model from memory, and protobuf caps one message at 2 GiB.
DEFAULT_MAX_BYTES = 2 * 1024**3
_READ = 1024 * 1024
_VERSION = re.compile(r"[0-9]{1,18}")

#: ``download(artifact_uri, dest_dir, limit) -> local file``: bytes only, at most ``limit``
#: of them (a store that sends more may be stopped, raising ``ModelSourceError``).
Download = Callable[[str, Path, int], Path]
#: ``listing(folder_uri) -> {name: size}``: the entries directly under a folder of the
#: artifact store, with the sizes it reports (-1 for a folder).
Listing = Callable[[str], Mapping[str, int]]
#: The artifact store failed to list or to hand over a file. ``migrate`` takes such a claim
#: for no twin and tries the others: a location anyone may name must not block a version.
UNAVAILABLE = "ARTIFACT_UNAVAILABLE"
#: ``source_sha256(version) -> hex``: the sha256 of that source version's bundle.
SourceDigest = Callable[[str], str]


@dataclass(frozen=True)
class Twin:
    """A registry version whose files verified with the pinned key (its source not yet)."""

    name: str
    version: str
    format: tags.OutputFormat
    record: ProvenanceRecord
    #: The model file's bytes when asked for (``keep_bytes``), else empty.
    data: bytes


def source_subject(name: str, version: str) -> str:
    """The subject ``airlock migrate`` sends for source version ``name``/``version``."""
    return f"models:/{escape_subject(name)}/{version}"


def bundle_sha256(model_dir: Path, scratch: Path) -> str:
    """The sha256 the broker computes for ``model_dir`` sent by ``Client.convert``: that of
    its deterministic bundle, packed here into ``scratch`` (then removed)."""
    model = _bundle.inspect(model_dir)
    fd, name = tempfile.mkstemp(prefix="bundle-", suffix=".zip", dir=scratch)
    os.close(fd)
    path = Path(name)
    try:
        path.unlink()  # pack() creates its file exclusively
        _bundle.pack(model, path)
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(_READ):
                digest.update(block)
        return digest.hexdigest()
    finally:
        path.unlink(missing_ok=True)


def read_twin(registry: Registry, download: Download, mv: ModelVersion,
              public_key: PublicKeyLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
              keep_bytes: bool = True, listing: Listing | None = None) -> Twin:
    """Download ``mv``'s model file and provenance (bytes only) and verify them; with
    ``listing``, first check that its folder holds those two files and nothing else."""
    name, version = str(mv.name), str(mv.version)
    if tag(mv, tags.OUTPUT_LAYOUT) == tags.LAYOUT_DIRECTORY:
        raise SafeLoadError("IS_DIRECTORY", f"{name} version {version} is a model directory "
                                            "(a migrated transformers model): fetch it with "
                                            "airlock_client.fetch_verified_directory")
    fmt = output_format(tag(mv, tags.OUTPUT_FORMAT))
    if fmt is None:
        raise SafeLoadError("NOT_AIRLOCK_OUTPUT",
                            f"{name} version {version} was not registered by airlock migrate "
                            "(it has no airlock output tags); migrate its source first")
    base = files_of(registry, name, version)
    record, data = verified_output(download, base, fmt, public_key, "the version",
                                   max_bytes=max_bytes, keep_bytes=keep_bytes,
                                   listing=listing)
    check_output_tag(mv, record)
    return Twin(name=name, version=version, format=fmt, record=record, data=data)


def files_of(registry: Registry, name: str, version: str) -> str:
    """Where the registry keeps ``name`` v``version``'s files. The registry derives it from
    the version's source, which whoever registered the version chose (MLflow raises for a
    run that does not exist): a lookup that fails is this version's failure, with a reason,
    never a registry's outage that stops a whole migration."""
    try:
        return registry.get_model_version_download_uri(name, version).rstrip("/")
    except Exception as exc:  # the registry's own errors
        raise SafeLoadError(UNAVAILABLE, f"cannot find where {name} version {version}'s files "
                            f"are: {type(exc).__name__}: {tags.clip(str(exc), 200)}") from exc


def verified_output(download: Download, base: str, fmt: tags.OutputFormat,
                    public_key: PublicKeyLike, what: str, *,
                    max_bytes: int = DEFAULT_MAX_BYTES, keep_bytes: bool = False,
                    listing: Listing | None = None) -> tuple[ProvenanceRecord, bytes]:
    """The signed record of the ``fmt`` output stored under ``base`` (``what``'s: a twin
    version, a run), once its model file matches it; with ``keep_bytes``, the file's bytes
    too (else empty). Bytes only: the provenance is verified before the larger download.
    With ``listing``, the folder must hold the two files and nothing else, within their
    caps, before anything is downloaded."""
    file_name = tags.OUTPUT_FILES[fmt]
    listed = None if listing is None else check_listing(
        listing, base, {file_name: max_bytes,
                        file_name + tags.PROVENANCE_SUFFIX: MAX_PROVENANCE_BYTES}, what)
    with scratch_dir("airlock-twin") as work:
        envelope = read_small(download, f"{base}/{file_name}{tags.PROVENANCE_SUFFIX}",
                              work / "provenance", MAX_PROVENANCE_BYTES)
        record = verify_envelope(envelope, public_key)  # before a large download
        if listed is not None:
            check_listed_sizes(listed, {file_name: record.output_size}, what)
        uri = f"{base}/{file_name}"
        with downloaded(download, uri, work / "model",
                        min(max_bytes, record.output_size)) as fh:
            if keep_bytes:
                data = fh.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise SafeLoadError(TOO_LARGE, f"{uri} grew past {max_bytes} bytes")
                sha, size = hashlib.sha256(data).hexdigest(), len(data)
            else:
                data, (sha, size) = b"", _hash(fh)
    check_output(record, sha256=sha, size=size)
    if record.output_format != fmt:
        raise SafeLoadError("FORMAT_MISMATCH", f"{what} is tagged {fmt} but its signed "
                                               f"provenance says {record.output_format}")
    return record, data


def check_listing(listing: Listing, base: str, expected: Mapping[str, int | None],
                  what: str) -> dict[str, int]:
    """The folder ``base``'s files and their sizes (as the store reports them: before any
    download), once it holds exactly the files ``expected`` names, each at most its bound
    in bytes (None: bounded later, by its signed size: ``check_listed_sizes``). Anything
    else beside a twin's files (an ``MLmodel`` that MLflow's loaders would follow, a
    script) is not Airlock's output."""
    try:
        found = dict(listing(base))
    except ModelSourceError as exc:  # a location nothing is listed from
        raise SafeLoadError("ARTIFACT_UNSAFE", exc.message) from None
    except Exception as exc:  # the artifact store's own errors
        raise SafeLoadError(UNAVAILABLE, f"cannot list {base}: {type(exc).__name__}: "
                            f"{tags.clip(str(exc), 200)}") from exc
    extra = sorted(set(found) - set(expected))
    if extra:
        raise SafeLoadError("UNEXPECTED_FILE", f"{what} holds {len(extra)} file(s) no Airlock "
                            f"output holds, such as {extra[0][:120]!r}: not a twin")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise SafeLoadError("ARTIFACT_MISSING", f"{what} has no {missing[0][:120]!r}")
    for name, bound in expected.items():
        if found[name] < 0:
            raise SafeLoadError("ARTIFACT_UNSAFE", f"{what}'s {name[:120]!r} is a folder")
        if bound is not None and found[name] > bound:
            raise SafeLoadError(TOO_LARGE, f"{what}'s {name[:120]!r} is {found[name]} "
                                f"bytes; at most {bound} are expected")
    return found


def check_listed_sizes(found: Mapping[str, int], signed: Mapping[str, int], what: str) -> None:
    """Each file the store lists at its signed size (a store that reports none, 0, leaves it
    to the hash after the download): checked before the download."""
    for name, size in signed.items():
        if found.get(name, 0) not in (0, size):
            raise SafeLoadError("OUTPUT_MISMATCH", f"{what}'s {name[:120]!r} is {found[name]} "
                                f"bytes; its record signs {size}")


def mlflow_listing(tracking_uri: str, downloads: Downloads) -> Listing:
    """MLflow's artifact listing (names and sizes only), on an explicit server."""
    def listing(folder_uri: str) -> Mapping[str, int]:
        return downloads.listing(folder_uri, tracking_uri=tracking_uri)

    return listing


def check_lineage(twin: Twin, mv: ModelVersion, *, model: str, version: str | None = None,
                  sha256: str | None = None, source_sha256: SourceDigest | None = None,
                  principals: Collection[str] | None = None) -> str:
    """Raise unless ``twin`` is the conversion of ``model`` (version ``version``, or the one
    it names); return that source version.

    The source's sha256 is ``sha256`` when the caller knows it, else ``source_sha256(V)``,
    asked only after every cheaper check passed.
    """
    record = twin.record
    prefix = f"models:/{escape_subject(model)}/"
    where = f"{twin.name} version {twin.version}"
    if record.record_version >= 2:
        claimed = record.subject[len(prefix):] if record.subject.startswith(prefix) else ""
        if not _VERSION.fullmatch(claimed):
            raise ProvenanceError("SOURCE_MISMATCH",
                                  f"{where} is signed as a conversion of "
                                  f"{shown(record.subject)}, not of a version of "
                                  f"{shown(prefix.rstrip('/'))}")
    else:  # version 1 named no subject: the tag says which version, its sha256 decides
        claimed = tag(mv, tags.SOURCE_VERSION)
    if version is not None and claimed != version:
        raise ProvenanceError("SOURCE_MISMATCH",
                              f"{where} is signed as a conversion of {shown(prefix + claimed)}, "
                              f"not of {shown(prefix + version)}")
    if tag(mv, tags.SOURCE_MODEL) != model or tag(mv, tags.SOURCE_VERSION) != claimed:
        raise SafeLoadError("TAG_MISMATCH", f"{where}'s source tags disagree with its signed "
                                            "provenance: the registry entry was altered")
    if sha256 is None:
        if source_sha256 is None:
            raise ValueError("check_lineage needs the source's sha256 or a way to compute it")
        sha256 = source_sha256(claimed)
    check_source(record, subject=prefix + claimed, sha256=sha256, principals=principals)
    if tag(mv, tags.SOURCE_SHA256) != record.input_sha256:
        raise SafeLoadError("TAG_MISMATCH", f"{where}'s source_sha256 tag is not the signed "
                                            "input's: the registry entry was altered")
    check_tags(mv, tags.twin_tags(model, claimed, record, tags.OUTPUT_FILES[twin.format]),
               where)
    return claimed


def check_output_tag(mv: ModelVersion, record: ProvenanceRecord) -> None:
    """The version's output_sha256 tag must be the signed output's (checked first: cheap)."""
    if tag(mv, tags.OUTPUT_SHA256) != record.output_sha256:
        raise SafeLoadError("TAG_MISMATCH", "the version's output_sha256 tag is not the signed "
                                            "output's: the registry entry was altered")


def check_tags(mv: ModelVersion, signed: dict[str, str], where: str) -> None:
    """Every tag migrate writes, where present (older twins lack some), must say what the
    signed records say (``signed``): a verdict or "no code ran" tag that lies is refused, not
    shown."""
    lying = sorted(k for k, v in signed.items() if (mv.tags or {}).get(k) not in (None, v))
    if lying:
        raise SafeLoadError("TAG_MISMATCH", f"{where}'s tag {lying[0]} is not what its signed "
                                            "provenance says: the registry entry was altered")


def mlflow_download(tracking_uri: str, downloads: Downloads) -> Download:
    """MLflow's artifact download (copies bytes; loads no model), on an explicit server."""
    def download(artifact_uri: str, dest: Path, limit: int) -> Path:
        return downloads.file(artifact_uri, dest, tracking_uri=tracking_uri, limit=limit)

    return download


def output_format(value: str) -> tags.OutputFormat | None:
    if value == "onnx":
        return "onnx"
    if value == "safetensors":
        return "safetensors"
    return None


def read_small(download: Download, artifact_uri: str, dest: Path, limit: int) -> bytes:
    """The bytes of one file of at most ``limit`` bytes, downloaded into the new directory
    ``dest`` (see ``downloaded``)."""
    with downloaded(download, artifact_uri, dest, limit) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise SafeLoadError(TOO_LARGE, f"{artifact_uri} grew past {limit} bytes")
    return data


@contextlib.contextmanager
def downloaded(download: Download, artifact_uri: str, dest: Path,
               limit: int) -> Iterator[BinaryIO]:
    """Download one file into an empty directory; yield it open, refusing anything but a
    regular file under ``limit`` bytes."""
    dest.mkdir()
    try:
        local = Path(download(artifact_uri, dest, limit))
    except ModelSourceError as exc:  # refused (a location, more bytes than allowed) or failed
        reason = {DOWNLOAD_FAILED: UNAVAILABLE, TOO_LARGE: TOO_LARGE}.get(exc.reason,
                                                                       "ARTIFACT_UNSAFE")
        raise SafeLoadError(reason, exc.message) from None
    except Exception as exc:  # the artifact store's own errors
        raise SafeLoadError(UNAVAILABLE,
                            f"cannot download {artifact_uri}: {type(exc).__name__}: "
                            f"{tags.clip(str(exc), 200)}") from exc
    if not local.resolve().is_relative_to(dest.resolve()):
        raise SafeLoadError("ARTIFACT_UNSAFE", f"the download of {artifact_uri} left the "
                                               "directory it was given")
    try:
        fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SafeLoadError("ARTIFACT_UNSAFE", f"{artifact_uri} is not a plain file "
                                               f"({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # before fdopen, which raises for a directory
        os.close(fd)
        raise SafeLoadError("ARTIFACT_UNSAFE", f"{artifact_uri} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if info.st_size > limit:
            raise SafeLoadError(TOO_LARGE, f"{artifact_uri} has {info.st_size} bytes, more "
                                           f"than the {limit} allowed")
        yield fh


def _hash(fh: BinaryIO) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while block := fh.read(_READ):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size

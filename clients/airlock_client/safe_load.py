"""Load a model version that ``airlock migrate`` registered, for serving and training jobs.

::

    from airlock_client import load_verified
    session = load_verified("models:/fraud-airlock@champion", source="models:/fraud",
                            public_key="airlock.pub.pem", tracking_uri="http://mlflow:5000")
    session.run(None, {"X": batch})                 # onnxruntime.InferenceSession
    weights = load_verified("models:/encoder-airlock/3", source="models:/encoder",
                            public_key=...)          # dict of arrays

``load_verified`` downloads the version's two files as bytes (MLflow's artifact download
copies bytes; none of MLflow's model loaders is ever called, and a migrated version has no
``MLmodel`` for them to read), checks that the provenance is signed by ``public_key`` and
describes exactly these bytes, then that it is a conversion of the source the caller expects
(see ``_twin``: the signed subject names a version of ``source``, and the signed input sha256
is that version's, computed from the registry's bytes unless the caller passes
``source_sha256``), and only then hands the same bytes (never re-read from disk) to
onnxruntime or to safetensors' own loader. Neither format can carry code; there is no pickle
anywhere on this path.

A migrated MLflow transformers version is a safetensors model directory (its twin holds the
shards, the index, the carried data files and a signed record for each):
``fetch_verified_directory`` downloads it into a new directory, verifies it as a whole and
against the source version's own files (``_twin_dir``), and only then puts it where asked,
for ``from_pretrained``::

    verified = fetch_verified_directory("models:/tinylm-airlock/1", "./tinylm",
                                        source="models:/tinylm", public_key=...)

Refusals raise ``SafeLoadError`` or ``ProvenanceError`` (both ``IntegrityError``)::

    IntegrityError
    ├── ProvenanceError   PROVENANCE_MISSING, PROVENANCE_MALFORMED, BAD_PUBLIC_KEY,
    │                     SIGNATURE_INVALID, OUTPUT_MISMATCH, SOURCE_MISMATCH,
    │                     PRINCIPAL_NOT_ALLOWED
    └── SafeLoadError     VERSION_MISSING (no such version or alias in the registry),
                          REGISTRY_UNAVAILABLE (the registry failed: try again),
                          NOT_AIRLOCK_OUTPUT, ARTIFACT_MISSING, ARTIFACT_UNAVAILABLE (the
                          store failed: try again), ARTIFACT_UNSAFE, TOO_LARGE,
                          FORMAT_MISMATCH, TAG_MISMATCH, EXTERNAL_DATA, SOURCE_MISSING,
                          UNEXPECTED_FILE (the version's folder holds more than its files),
                          IS_DIRECTORY (load_verified of a directory twin)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from airlock_client import _lineage as tags
from airlock_client._downloads import Downloads
from airlock_client._errors import ModelSourceError, SafeLoadError
from airlock_client._registry import Fetch, ModelVersion, Registry, open_registry
from airlock_client._run_dir import scratch_dir
from airlock_client._twin import (
    DEFAULT_MAX_BYTES,
    Download,
    Listing,
    bundle_sha256,
    check_lineage,
    mlflow_download,
    mlflow_listing,
    read_twin,
    source_subject,
)
from airlock_client._twin_dir import (
    check_directory_lineage,
    is_directory_source,
    read_directory_twin,
    source_files,
)
from airlock_client.provenance import (
    MAX_PROVENANCE_BYTES,
    ProvenanceError,
    ProvenanceRecord,
    PublicKeyLike,
    check_source,
)
from airlock_client.verify_dir import VerifiedDirectory

__all__ = ["DEFAULT_MAX_BYTES", "MAX_PROVENANCE_BYTES", "Download", "FetchSource",
           "SafeLoadError", "VerifiedArtifact", "VerifiedModelDirectory", "fetch_verified",
           "fetch_verified_directory", "load_verified", "open_artifact"]

#: ``SafeLoadError`` reasons of the registry's lookup of the version itself.
VERSION_MISSING = "VERSION_MISSING"
REGISTRY_UNAVAILABLE = "REGISTRY_UNAVAILABLE"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^@]+?)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))$")
_SOURCE_URI = re.compile(r"^models:/(?P<name>[^@]+?)(?:/(?P<version>[0-9]+))?$")

#: ``fetch(models_uri, dest_dir) -> model_dir``: a source version's files, bytes only
#: (the same type as ``migrate.Fetch``).
FetchSource = Fetch


@dataclass(frozen=True)
class VerifiedArtifact:
    """A migrated version's model file, in memory, after its provenance verified."""

    name: str
    version: str
    format: tags.OutputFormat
    data: bytes
    record: ProvenanceRecord
    #: The source version it is the verified conversion of (``source``'s model).
    source_version: str = ""


def load_verified(models_uri: str, *, source: str | None = None,
                  source_sha256: str | None = None, principals: Collection[str] | None = None,
                  public_key: PublicKeyLike | None = None,
                  tracking_uri: str | None = None, tensors: Literal["numpy", "pt"] = "numpy",
                  providers: tuple[str, ...] = ("CPUExecutionProvider",),
                  max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """An ``onnxruntime.InferenceSession`` (ONNX) or ``{name: tensor}`` (safetensors).

    ``models_uri`` is ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` of a version that
    ``airlock migrate`` registered. ``source`` is what it must be a conversion of:
    ``models:/SOURCE`` (any version of that registered model: the one its signed record names)
    or ``models:/SOURCE/VERSION``; ``source_sha256`` the source version's sha256 if you pinned
    it (else it is computed from the registry's copy of the source, which downloads it: bytes
    only). At least one of the two is required: a valid signature alone says only that some
    caller of the broker sent *some* model. ``principals``: accept only conversions asked for
    by these broker principals. ``public_key`` is the broker's provenance key (PEM bytes or
    path; default ``$AIRLOCK_PUBLIC_KEY``): pin it, do not fetch it next to the model.
    ``tensors`` picks numpy arrays or torch tensors for safetensors files.
    """
    artifact = fetch_verified(models_uri, source=source, source_sha256=source_sha256,
                              principals=principals, public_key=public_key,
                              tracking_uri=tracking_uri, max_bytes=max_bytes)
    return open_artifact(artifact, tensors=tensors, providers=providers)


def fetch_verified(models_uri: str, *, source: str | None = None,
                   source_sha256: str | None = None, principals: Collection[str] | None = None,
                   public_key: PublicKeyLike | None = None,
                   tracking_uri: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                   registry: Registry | None = None, download: Download | None = None,
                   fetch: FetchSource | None = None,
                   listing: Listing | None = None) -> VerifiedArtifact:
    """The verified bytes of a migrated version, without loading them (see ``load_verified``).

    ``registry``, ``download``, ``fetch`` and ``listing`` replace the MLflow client, its
    artifact download, the source-version download and the artifact listing (tests; with
    MLflow's download, MLflow's listing is used: the version's folder must hold its two
    files and nothing else).
    """
    model, version = _expected_source(source, source_sha256)
    key = _key(public_key)
    with _Registry.opened(tracking_uri, registry, download, fetch, listing) as reg:
        mv = _version(reg.registry, models_uri)
        twin = read_twin(reg.registry, reg.download, mv, key, max_bytes=max_bytes,
                         listing=reg.listing)
        claimed = ""
        if model is not None:
            claimed = check_lineage(twin, mv, model=model, version=version, sha256=source_sha256,
                                    source_sha256=lambda v: _source_sha256(reg.fetch, model, v),
                                    principals=principals)
        else:  # only the source's sha256 is expected: it decides alone
            check_source(twin.record, sha256=source_sha256, principals=principals)
        return VerifiedArtifact(name=twin.name, version=twin.version, format=twin.format,
                                data=twin.data, record=twin.record, source_version=claimed)


@dataclass(frozen=True)
class VerifiedModelDirectory:
    """A migrated model directory, verified and put in place."""

    path: Path
    #: What was checked: every file with its record (``airlock verify DIR`` checks it again).
    verified: VerifiedDirectory
    #: The source version it is the verified conversion of (``source``'s model).
    source_version: str


def fetch_verified_directory(models_uri: str, dest: str | os.PathLike[str], *, source: str,
                             principals: Collection[str] | None = None,
                             public_key: PublicKeyLike | None = None,
                             tracking_uri: str | None = None, registry: Registry | None = None,
                             download: Download | None = None,
                             fetch: FetchSource | None = None,
                             listing: Listing | None = None) -> VerifiedModelDirectory:
    """Put the model directory of a migrated transformers version at ``dest`` (which must not
    exist yet), once it verifies: as a whole with ``public_key``, and file by file against
    the source version's own files (``source``: ``models:/NAME``, whichever version the twin
    is of, or ``models:/NAME/VERSION``), downloaded as bytes. It is downloaded beside
    ``dest`` and renamed there only once it passed: nothing is left at ``dest`` when it does
    not. The other arguments are ``fetch_verified``'s. Raises what ``fetch_verified`` raises,
    and ``FileExistsError`` when ``dest`` exists (or came to exist meanwhile)."""
    model, version = _expected_source(source, None)
    assert model is not None  # a source is required here
    key = _key(public_key)
    target = Path(os.path.abspath(dest))
    if os.path.lexists(target):
        raise FileExistsError(f"{target} exists: fetch_verified_directory writes a new one")
    with _Registry.opened(tracking_uri, registry, download, fetch, listing) as reg:
        return _put_directory(reg, models_uri, target, model, version, key, principals)


def _put_directory(reg: _Registry, models_uri: str, target: Path, model: str,
                   version: str | None, key: PublicKeyLike,
                   principals: Collection[str] | None) -> VerifiedModelDirectory:
    mv = _version(reg.registry, models_uri)
    claimed = version or str((mv.tags or {}).get(tags.SOURCE_VERSION, ""))
    if not claimed.isdigit() or not claimed.isascii():
        raise SafeLoadError("TAG_MISMATCH", f"{models_uri}'s source version tag "
                                            f"{claimed[:40]!r} is not a version number")
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".airlock-part",
                                 dir=target.parent))
    try:
        try:  # first: what is downloaded of the twin is named from it
            source_dir = Path(reg.fetch(f"models:/{model}/{claimed}", work / "source"))
            if not is_directory_source(source_dir):
                raise ProvenanceError("SOURCE_MISMATCH", f"models:/{model}/{claimed} is not "
                                      "a transformers model with PyTorch weights: no model "
                                      "directory is its conversion")
            files = source_files(source_dir)
        except ModelSourceError as exc:
            raise SafeLoadError("SOURCE_MISSING",
                                f"cannot read the source models:/{model}/{claimed} to check "
                                f"the version against it: {exc.reason}: {exc.message}") from exc
        twin = read_directory_twin(reg.registry, reg.download, mv, key, work / "twin", files,
                                   source_subject(model, claimed), listing=reg.listing)
        check_directory_lineage(twin, mv, model=model, version=claimed, source=files,
                                principals=principals)
        if os.path.lexists(target):
            raise FileExistsError(f"{target} came to exist while the version was verified")
        try:
            os.rename(twin.verified.path, target)
        except OSError as exc:  # made meanwhile, and not empty
            raise FileExistsError(f"{target} came to exist while the version was verified: "
                                  f"{exc.strerror}") from None
        return VerifiedModelDirectory(target, dataclasses.replace(twin.verified, path=target),
                                      claimed)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _key(public_key: PublicKeyLike | None) -> PublicKeyLike:
    """The pinned key: the caller's, else ``$AIRLOCK_PUBLIC_KEY``."""
    key = public_key if public_key is not None else os.environ.get("AIRLOCK_PUBLIC_KEY")
    if not key:
        raise ProvenanceError("BAD_PUBLIC_KEY", "a safe load needs the broker's public key "
                                                "(public_key=... or AIRLOCK_PUBLIC_KEY)")
    return key


@dataclass(frozen=True)
class _Registry:
    """The registry, its artifact download and listing, and the source-version download of
    one call."""

    registry: Registry
    download: Download
    fetch: FetchSource
    #: None when the caller gave its own download and no listing (tests).
    listing: Listing | None

    @classmethod
    @contextlib.contextmanager
    def opened(cls, tracking_uri: str | None, registry: Registry | None,
               download: Download | None, fetch: FetchSource | None,
               listing: Listing | None = None) -> Iterator[_Registry]:
        """The caller's (tests), else MLflow's on ``tracking_uri`` (or the environment's),
        with the download processes they start until the block ends."""
        with Downloads() as downloads:
            yield cls.of(tracking_uri, registry, download, fetch, listing, downloads)

    @classmethod
    def of(cls, tracking_uri: str | None, registry: Registry | None,
           download: Download | None, fetch: FetchSource | None,
           listing: Listing | None, downloads: Downloads) -> _Registry:
        if registry is None or download is None or fetch is None:
            uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
            if not uri:
                raise ValueError("no tracking server: pass tracking_uri= or set "
                                 "MLFLOW_TRACKING_URI")
            registry = registry or open_registry(
                uri, os.environ.get("MLFLOW_REGISTRY_URI") or None)
            if download is None:
                download = mlflow_download(uri, downloads)
                listing = listing or mlflow_listing(uri, downloads)
            fetch = fetch or _mlflow_fetch(uri, downloads)
        return cls(registry, download, fetch, listing)


def open_artifact(artifact: VerifiedArtifact, *, tensors: Literal["numpy", "pt"] = "numpy",
                  providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Any:
    """Hand verified bytes to the safe-format loader of their format."""
    if artifact.format == "onnx":
        try:
            import onnx  # the protobuf schema, for the external-data check
            import onnxruntime  # parses ONNX protobuf; ONNX carries no code
        except ImportError as exc:
            raise ImportError("loading ONNX needs onnx and onnxruntime: pip install "
                              "'airlock-client[safe-load]'") from exc

        _refuse_external_data(onnx, artifact.data)
        options = onnxruntime.SessionOptions()
        return onnxruntime.InferenceSession(artifact.data, sess_options=options,
                                            providers=list(providers))
    if tensors == "pt":
        from safetensors.torch import load as load_torch  # header + raw buffers, no pickle

        return load_torch(artifact.data)
    from safetensors.numpy import load as load_numpy  # header + raw buffers, no pickle

    return load_numpy(artifact.data)


def _version(registry: Registry, models_uri: str) -> ModelVersion:
    match = _MODELS_URI.match(models_uri)
    if match is None:
        raise ValueError(f"{models_uri!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")
    try:
        if match["alias"]:
            return registry.get_model_version_by_alias(match["name"], match["alias"])
        return registry.get_model_version(match["name"], match["version"])
    except Exception as exc:  # the registry's own errors (MlflowException, REST failures)
        missing = getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"
        raise SafeLoadError(
            VERSION_MISSING if missing else REGISTRY_UNAVAILABLE,
            f"cannot read {models_uri[:200]} from the registry: {type(exc).__name__}: "
            f"{tags.clip(str(exc), 200)}" + ("" if missing else " (try again)")) from exc


def _refuse_external_data(onnx: Any, data: bytes) -> None:
    """The broker already refused external data; a loader from bytes must never look for any.

    Checked again here because ORT would resolve such references against the working
    directory; the signature makes this redundant, the check makes it independent of it.
    """
    model = onnx.ModelProto()
    model.ParseFromString(data)
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer) + [s.values for s in graph.sparse_initializer]
        for node in graph.node:
            for attr in node.attribute:
                tensors += [attr.t, *attr.tensors]
                graphs += [attr.g, *attr.graphs]
        if any(t.data_location == onnx.TensorProto.EXTERNAL or t.external_data
               for t in tensors):
            raise SafeLoadError("EXTERNAL_DATA", "the ONNX model refers to external data")


def _mlflow_fetch(tracking_uri: str, downloads: Downloads) -> FetchSource:
    def fetch(models_uri: str, dest: Path) -> Path:
        from airlock_client.mlflow_source import resolve  # bytes only; loads no model

        return resolve(models_uri, dest, tracking_uri=tracking_uri, downloads=downloads)

    return fetch


def _expected_source(source: str | None, sha256: str | None) -> tuple[str | None, str | None]:
    """``source`` as (model, version or None); at least one expectation is required."""
    if source is None and sha256 is None:
        raise ValueError("a safe load needs the source the version must be a conversion of: "
                         "source='models:/NAME' (or models:/NAME/VERSION) and/or "
                         "source_sha256=...; a valid signature alone only says that some "
                         "caller of the broker sent some model")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError("source_sha256 must be 64 hexadecimal digits")
    if source is None:
        return None, None
    match = _SOURCE_URI.match(source)
    if match is None:
        raise ValueError(f"source {source!r} is not models:/NAME or models:/NAME/VERSION")
    return match["name"], match["version"]


def _source_sha256(fetch: FetchSource, model: str, version: str) -> str:
    """The sha256 of source version ``model``/``version`` as the client sends it to the broker."""
    with scratch_dir("airlock-source") as work:
        try:
            model_dir = fetch(f"models:/{model}/{version}", work / "source")
            return bundle_sha256(Path(model_dir), work)
        except ModelSourceError as exc:
            raise SafeLoadError("SOURCE_MISSING",
                                f"cannot read the source models:/{model}/{version} to check "
                                f"the version against it: {exc.reason}: {exc.message}") from exc

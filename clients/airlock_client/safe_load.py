"""Load a model version that ``airlock migrate`` registered, for serving and training jobs.

::

    from airlock_client import load_verified
    session = load_verified("models:/fraud-airlock@champion", public_key="airlock.pub.pem",
                            tracking_uri="http://mlflow:5000")
    session.run(None, {"X": batch})                 # onnxruntime.InferenceSession
    weights = load_verified("models:/encoder-airlock/3", public_key=...)   # dict of arrays

``load_verified`` downloads the version's two files as bytes (MLflow's artifact download
copies bytes; none of MLflow's model loaders is ever called, and a migrated version has no
``MLmodel`` for them to read), checks that the provenance is signed by ``public_key`` and
describes exactly these bytes, and only then hands the same bytes (never re-read from disk)
to onnxruntime or to safetensors' own loader. Neither format can carry code; there is no
pickle anywhere on this path.

Refusals raise ``SafeLoadError`` or ``ProvenanceError`` (both ``IntegrityError``)::

    IntegrityError
    ├── ProvenanceError   PROVENANCE_MISSING, PROVENANCE_MALFORMED, BAD_PUBLIC_KEY,
    │                     SIGNATURE_INVALID, OUTPUT_MISMATCH
    └── SafeLoadError     NOT_AIRLOCK_OUTPUT, ARTIFACT_MISSING, ARTIFACT_UNSAFE, TOO_LARGE,
                          FORMAT_MISMATCH, TAG_MISMATCH, EXTERNAL_DATA
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx

from airlock_client import _lineage as tags
from airlock_client._errors import IntegrityError
from airlock_client._registry import ModelVersion, Registry, open_registry
from airlock_client.provenance import (
    ProvenanceError,
    ProvenanceRecord,
    PublicKeyLike,
    verify,
)

#: ORT takes an ONNX model from memory, and protobuf caps one message at 2 GiB.
DEFAULT_MAX_BYTES = 2 * 1024**3
MAX_PROVENANCE_BYTES = 256 * 1024
_MODELS_URI = re.compile(r"^models:/(?P<name>[^@]+?)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))$")

#: ``download(artifact_uri, dest_dir) -> local file``: bytes only.
Download = Callable[[str, Path], Path]


class SafeLoadError(IntegrityError):
    """The version is not a verifiable Airlock output; ``reason`` says which check refused."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class VerifiedArtifact:
    """A migrated version's model file, in memory, after its provenance verified."""

    name: str
    version: str
    format: tags.OutputFormat
    data: bytes
    record: ProvenanceRecord


def load_verified(models_uri: str, *, public_key: PublicKeyLike | None = None,
                  tracking_uri: str | None = None, tensors: Literal["numpy", "pt"] = "numpy",
                  providers: tuple[str, ...] = ("CPUExecutionProvider",),
                  max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """An ``onnxruntime.InferenceSession`` (ONNX) or ``{name: tensor}`` (safetensors).

    ``models_uri`` is ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` of a version that
    ``airlock migrate`` registered. ``public_key`` is the broker's provenance key (PEM bytes
    or path; default ``$AIRLOCK_PUBLIC_KEY``): pin it, do not fetch it next to the model.
    ``tensors`` picks numpy arrays or torch tensors for safetensors files.
    """
    artifact = fetch_verified(models_uri, public_key=public_key, tracking_uri=tracking_uri,
                              max_bytes=max_bytes)
    return open_artifact(artifact, tensors=tensors, providers=providers)


def fetch_verified(models_uri: str, *, public_key: PublicKeyLike | None = None,
                   tracking_uri: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                   registry: Registry | None = None,
                   download: Download | None = None) -> VerifiedArtifact:
    """The verified bytes of a migrated version, without loading them (see ``load_verified``).

    ``registry`` and ``download`` replace the MLflow client and downloader (tests).
    """
    key = public_key if public_key is not None else os.environ.get("AIRLOCK_PUBLIC_KEY")
    if not key:
        raise ProvenanceError("BAD_PUBLIC_KEY", "a safe load needs the broker's public key "
                                                "(public_key=... or AIRLOCK_PUBLIC_KEY)")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if registry is None or download is None:
        if not uri:
            raise ValueError("no tracking server: pass tracking_uri= or set MLFLOW_TRACKING_URI")
        registry = registry or open_registry(uri, os.environ.get("MLFLOW_REGISTRY_URI") or None)
        download = download or _mlflow_download(uri)
    mv = _version(registry, models_uri)
    name, version = str(mv.name), str(mv.version)
    fmt = _output_format((mv.tags or {}).get(tags.OUTPUT_FORMAT, ""))
    if fmt is None:
        raise SafeLoadError("NOT_AIRLOCK_OUTPUT",
                            f"{name} version {version} was not registered by airlock migrate "
                            "(it has no airlock output tags); migrate its source first")
    file_name = tags.OUTPUT_FILES[fmt]
    base = registry.get_model_version_download_uri(name, version).rstrip("/")
    work = Path(tempfile.mkdtemp(prefix="airlock-load-"))
    try:
        data = _read(download, f"{base}/{file_name}", work / "model", max_bytes)
        envelope = _read(download, f"{base}/{file_name}{tags.PROVENANCE_SUFFIX}",
                         work / "provenance", MAX_PROVENANCE_BYTES)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = verify(data, envelope, key)  # signature, then these bytes' sha256 and size
    if record.output_format != fmt:
        raise SafeLoadError("FORMAT_MISMATCH", f"the version is tagged {fmt} but its signed "
                                               f"provenance says {record.output_format}")
    if (mv.tags or {}).get(tags.OUTPUT_SHA256) != record.output_sha256:
        raise SafeLoadError("TAG_MISMATCH", "the version's output_sha256 tag is not the signed "
                                            "output's: the registry entry was altered")
    return VerifiedArtifact(name=name, version=version, format=fmt, data=data, record=record)


def open_artifact(artifact: VerifiedArtifact, *, tensors: Literal["numpy", "pt"] = "numpy",
                  providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Any:
    """Hand verified bytes to the safe-format loader of their format."""
    if artifact.format == "onnx":
        _refuse_external_data(artifact.data)
        try:
            import onnxruntime  # parses ONNX protobuf; ONNX carries no code
        except ImportError as exc:
            raise ImportError("loading ONNX needs onnxruntime: pip install "
                              "'airlock[safe-load]'") from exc

        options = onnxruntime.SessionOptions()
        return onnxruntime.InferenceSession(artifact.data, sess_options=options,
                                            providers=list(providers))
    if tensors == "pt":
        from safetensors.torch import load as load_torch  # header + raw buffers, no pickle

        return load_torch(artifact.data)
    from safetensors.numpy import load as load_numpy  # header + raw buffers, no pickle

    return load_numpy(artifact.data)


def _output_format(value: str) -> tags.OutputFormat | None:
    if value == "onnx":
        return "onnx"
    if value == "safetensors":
        return "safetensors"
    return None


def _version(registry: Registry, models_uri: str) -> ModelVersion:
    match = _MODELS_URI.match(models_uri)
    if match is None:
        raise ValueError(f"{models_uri!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")
    if match["alias"]:
        return registry.get_model_version_by_alias(match["name"], match["alias"])
    return registry.get_model_version(match["name"], match["version"])


def _read(download: Download, artifact_uri: str, dest: Path, limit: int) -> bytes:
    """Download one file into an empty directory and read it, refusing anything but a file."""
    dest.mkdir()
    try:
        local = Path(download(artifact_uri, dest))
    except Exception as exc:  # the artifact store's own errors
        raise SafeLoadError("ARTIFACT_MISSING",
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
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SafeLoadError("ARTIFACT_UNSAFE", f"{artifact_uri} is not a regular file")
        if info.st_size > limit:
            raise SafeLoadError("TOO_LARGE", f"{artifact_uri} has {info.st_size} bytes, more "
                                             f"than the {limit} allowed")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise SafeLoadError("TOO_LARGE", f"{artifact_uri} grew past {limit} bytes")
    return data


def _refuse_external_data(data: bytes) -> None:
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


def _mlflow_download(tracking_uri: str) -> Download:
    def download(artifact_uri: str, dest: Path) -> Path:
        from mlflow.artifacts import download_artifacts  # copies bytes; loads no model

        return Path(download_artifacts(
            artifact_uri=artifact_uri, dst_path=str(dest), tracking_uri=tracking_uri))

    return download

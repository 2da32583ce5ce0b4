"""MLflow model sources: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN/PATH``
or a local MLflow model directory, turned into a checked local directory.

Fetching uses MLflow's download API only, which copies bytes and deserializes nothing
(research/conversion.md §4). MLflow's loaders (``mlflow.*.load_model``, ``pyfunc``) are never
called here: they import ``loader_module``, put ``code/`` on ``sys.path`` and unpickle. The
directory is then checked (see :mod:`airlock_client._bundle`) and handed to
:meth:`airlock_client.Client.convert`, which packs it for the sandbox.

>>> from airlock_client import Client, mlflow_source          # doctest: +SKIP
>>> model_dir = mlflow_source.resolve("models:/fraud/3", "/tmp/work",
...                                   tracking_uri="http://127.0.0.1:5000")
>>> with Client() as client:
...     client.convert(model_dir, "fraud-3.onnx")
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path, PurePosixPath

from airlock_client._artifact_locations import check_location
from airlock_client._bundle import (
    MAX_FILES,
    MAX_TOTAL_BYTES,
    NOT_A_MODEL,
    ModelDir,
    inspect,
    refuse,
)
from airlock_client._errors import DOWNLOAD_FAILED, ModelSourceError

__all__ = ["DOWNLOAD_FAILED", "URI_SCHEMES", "ModelDir", "check", "is_uri", "resolve",
           "suggested_name"]

URI_SCHEMES = ("models:/", "runs:/")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def is_uri(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` is an MLflow URI this module resolves (rather than a local path)."""
    return isinstance(text, str) and text.startswith(URI_SCHEMES)


def check(path: str | os.PathLike[str], *, max_files: int = MAX_FILES,
          max_total_bytes: int = MAX_TOTAL_BYTES) -> ModelDir:
    """Check a local model directory; raise :class:`ModelSourceError` if it is unsafe."""
    return inspect(path, max_files=max_files, max_total_bytes=max_total_bytes)


def resolve(uri_or_path: str | os.PathLike[str], dest_dir: str | os.PathLike[str], *,
            tracking_uri: str | None = None, max_files: int = MAX_FILES,
            max_total_bytes: int = MAX_TOTAL_BYTES) -> Path:
    """A checked local MLflow model directory for a URI or a local path.

    A URI is downloaded into a fresh, empty directory created under ``dest_dir`` (the caller
    owns ``dest_dir`` and removes it); a local path is checked where it is. ``tracking_uri``
    serves as the registry URI too. Raises :class:`ModelSourceError`: ``UNSAFE_MODEL_DIR``,
    ``NOT_A_MODEL_DIR`` or ``MLFLOW_DOWNLOAD_FAILED``.
    """
    if not is_uri(uri_or_path):
        return check(uri_or_path, max_files=max_files, max_total_bytes=max_total_bytes).root
    uri = str(uri_or_path)
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix="mlflow-model-", dir=dest_dir))
    local = Path(_download(uri, fresh, tracking_uri, max_files, max_total_bytes))
    # A hostile server or store could answer with a path elsewhere on this host.
    real, inside = os.path.realpath(local), os.path.realpath(fresh)
    if os.path.commonpath([real, inside]) != inside:
        raise refuse(f"the download of {uri} landed outside {fresh}")
    _no_links_under(fresh)
    if not local.is_dir():
        raise ModelSourceError(NOT_A_MODEL, f"{uri} is a single file, not a model directory")
    return check(local, max_files=max_files, max_total_bytes=max_total_bytes).root


def suggested_name(uri_or_path: str | os.PathLike[str]) -> str:
    """A file-name stem for a converted model: ``NAME-VERSION``, ``NAME-ALIAS``, ``RUN-PATH``."""
    text = str(uri_or_path)
    for scheme in URI_SCHEMES:
        if text.startswith(scheme):
            text = text[len(scheme):].replace("@", "-")
            break
    else:
        text = Path(text).resolve().name
    stem = _UNSAFE_CHARS.sub("-", text.strip("/")).strip("-.")
    return stem[:120] or "model"


def _download(uri: str, dest: Path, tracking_uri: str | None, max_files: int,
              max_total_bytes: int) -> str:
    # Imported here: mlflow is large and plain-file conversions never need it. Only the
    # download API and registry look-ups are used (the host-never-deserializes test pins it).
    try:
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise ModelSourceError(DOWNLOAD_FAILED, f"{uri}: fetching models:/ and runs:/ needs "
                               "MLflow's client: pip install 'airlock-client[mlflow]'") from None

    try:
        if tracking_uri is None:
            from mlflow.tracking import get_tracking_uri

            tracking_uri = get_tracking_uri()
        # Where the files are, asked of this server and checked (_artifact_locations), then
        # fetched from there: download_artifacts would resolve models:/ against the
        # process-wide registry URI, whatever registry_uri it is given (mlflow 3.17).
        uri = check_location(_location(uri, tracking_uri), tracking_uri)
        _check_listing(uri, tracking_uri, max_files, max_total_bytes)
        return download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                  tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except MlflowException as exc:
        raise ModelSourceError(DOWNLOAD_FAILED, f"{uri}: {str(exc.message)[:400]}") from None
    except OSError as exc:
        raise ModelSourceError(DOWNLOAD_FAILED, f"{uri}: {exc}") from None
    except (KeyError, ValueError, TypeError, AttributeError) as exc:  # a malformed answer
        raise ModelSourceError(DOWNLOAD_FAILED, f"{uri}: the store's answer is malformed "
                               f"({type(exc).__name__}: {str(exc)[:200]})") from None


_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))/?")
_LOGGED_MODEL_URI = re.compile(r"models:/(?P<id>m-[0-9a-f]+)/?")
_RUN_URI = re.compile(r"runs:/(?P<run>[^/]+)(?P<path>/.*)?")


def _location(uri: str, tracking_uri: str) -> str:
    """Where a registry version, a logged model or a run's path keeps its files, asked of
    this server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if match := _RUN_URI.fullmatch(uri):
        root = str(client.get_run(match["run"]).info.artifact_uri).rstrip("/")
        path = (match["path"] or "").strip("/")
        return f"{root}/{path}" if path else root
    if match := _LOGGED_MODEL_URI.fullmatch(uri):
        return str(client.get_logged_model(match["id"]).artifact_location)
    match = _MODEL_URI.fullmatch(uri)
    if match is None:
        raise ModelSourceError(DOWNLOAD_FAILED, f"{uri}: use models:/NAME/VERSION, "
                                                "models:/NAME@ALIAS or models:/m-ID")
    version = match["version"]
    if version is None:
        version = client.get_model_version_by_alias(match["name"], match["alias"]).version
    location = str(client.get_model_version_download_uri(match["name"], str(version)))
    if logged := _LOGGED_MODEL_URI.fullmatch(location):  # MLflow 3: a logged model of this store
        return str(client.get_logged_model(logged["id"]).artifact_location)
    return location


def _check_listing(location: str, tracking_uri: str, max_files: int,
                   max_total_bytes: int) -> None:
    """Refuse, before a byte is downloaded, a model whose store lists more entries or more
    bytes than the caps (``check`` applies them again to what arrives): MLflow downloads
    whatever is listed, so a registered 100 GB directory was fetched whole, and a listing of
    20,001 files took 4 minutes, before the caps refused them."""
    from mlflow.artifacts import list_artifacts

    pending, entries, total = [""], 0, 0
    while pending:
        folder = pending.pop()
        for info in list_artifacts(artifact_uri=f"{location}/{folder}".rstrip("/"),
                                   tracking_uri=tracking_uri):
            entries += 1
            if info.is_dir:
                pending.append(f"{folder}/{PurePosixPath(info.path).name}".lstrip("/"))
            else:
                total += max(int(info.file_size or 0), 0)
            if entries > max_files or total > max_total_bytes:
                raise refuse(f"{location} lists more than {max_files} entries or "
                             f"{max_total_bytes} bytes ({entries} entries, {total} bytes so "
                             "far): nothing was downloaded")


def _no_links_under(root: Path) -> None:
    """Nothing the download wrote may be a link or special file, inside the model or not."""
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            mode = os.lstat(os.path.join(directory, name)).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                rel = os.path.relpath(os.path.join(directory, name), root)
                raise refuse(f"the download wrote {rel}, which is a link or special file")


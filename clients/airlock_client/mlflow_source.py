"""MLflow model sources: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN/PATH``
or a local MLflow model directory, turned into a checked local directory.

Fetching uses MLflow's download API only, which copies bytes and deserializes nothing
(research/conversion.md §4), in a process the client watches and stops (``_downloads``).
MLflow's loaders (``mlflow.*.load_model``, ``pyfunc``) are never called here: they import
``loader_module``, put ``code/`` on ``sys.path`` and unpickle. The directory is then checked
(see :mod:`airlock_client._bundle`) and handed to :meth:`airlock_client.Client.convert`,
which packs it for the sandbox.

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
from pathlib import Path

from airlock_client import _downloads
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
            max_total_bytes: int = MAX_TOTAL_BYTES,
            downloads: _downloads.Downloads | None = None) -> Path:
    """A checked local MLflow model directory for a URI or a local path.

    A URI is downloaded into a fresh, empty directory created under ``dest_dir`` (the caller
    owns ``dest_dir`` and removes it); a local path is checked where it is. ``tracking_uri``
    serves as the registry URI too. ``downloads`` lets many calls share download processes
    (one is started and stopped otherwise). Raises :class:`ModelSourceError`:
    ``UNSAFE_MODEL_DIR``, ``UNSAFE_ARTIFACT_LOCATION``, ``NOT_A_MODEL_DIR`` or
    ``MLFLOW_DOWNLOAD_FAILED``.
    """
    if not is_uri(uri_or_path):
        return check(uri_or_path, max_files=max_files, max_total_bytes=max_total_bytes).root
    uri = str(uri_or_path)
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix="mlflow-model-", dir=dest_dir))
    with _downloads.scoped(downloads) as fetching:
        local = fetching.model(uri, fresh, tracking_uri=tracking_uri, max_files=max_files,
                               max_total_bytes=max_total_bytes)
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


def _no_links_under(root: Path) -> None:
    """Nothing the download wrote may be a link or special file, inside the model or not."""
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            mode = os.lstat(os.path.join(directory, name)).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                rel = os.path.relpath(os.path.join(directory, name), root)
                raise refuse(f"the download wrote {rel}, which is a link or special file")


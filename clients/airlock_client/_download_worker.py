"""The process that talks to an MLflow artifact store for the client (``_downloads``).

Started by ``_downloads.Downloads`` as ``python -P -m airlock_client._download_worker FD``
(``-P``: nothing from the working directory is imported). It reads one JSON request per
line on stdin and answers on the pipe ``FD`` (stdout goes nowhere: whatever MLflow or a
``sitecustomize`` prints is never read as an answer). Per request, any of:

- ``{"began": true}``: MLflow is imported and the store is asked now (the first request's
  imports take seconds on a busy machine: they are not the store's time);
- ``{"downloading": BYTES}``: the download itself begins; ``BYTES`` is what the store listed
  in all, or null when it did not say;
- then one ``{"ok": ...}``, or ``{"error": REASON, "message": ...}``.

Requests, each with ``tracking_uri`` (null: MLflow's from the environment):

- ``{"op": "model", "uri", "dest", "max_files", "max_total_bytes"}``: a ``models:/`` or
  ``runs:/`` URI's directory, downloaded under ``dest``; answers its local path;
- ``{"op": "file", "uri", "dest", "limit"}``: one artifact under ``dest``; its local path;
- ``{"op": "list", "uri"}``: the names directly under ``uri`` and their sizes (a folder: -1).

Only MLflow's location, listing and download calls are made here: they copy bytes and load
nothing (the host-never-deserializes test pins it). The parent watches what this process
writes, how fast and how much memory it takes, and kills it past a limit: nothing here needs
to be trusted to stop. While a download runs, no file grows more than one byte past the
bytes allowed (``RLIMIT_FSIZE``; Python ignores ``SIGXFSZ``, so the write fails, and the
parent sees the byte too many). The process exits when its parent is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import Any

from airlock_client._artifact_locations import check_location
from airlock_client._bundle import NOT_A_MODEL, refuse
from airlock_client._errors import DOWNLOAD_FAILED, ModelSourceError

#: The protocol's words, on both sides.
OP, MODEL, FILE, LIST = "op", "model", "file", "list"
BEGAN, DOWNLOADING, OK, ERROR, MESSAGE = "began", "downloading", "ok", "error", "message"
#: The worker's environment beyond the client's: MLflow's presigned multipart download would
#: truncate each file to a size the server names first (sparse, so no bytes show progress)
#: and fetch from whatever hosts the server's URLs name.
ENVIRONMENT = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}

_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))/?")
_LOGGED_MODEL_URI = re.compile(r"models:/(?P<id>m-[0-9a-f]+)/?")
_RUN_URI = re.compile(r"runs:/(?P<run>[^/]+)(?P<path>/.*)?")

Say = Callable[[dict[str, Any]], None]


def main() -> None:
    answers = os.fdopen(int(sys.argv[1]), "w", encoding="utf-8")

    def say(answer: dict[str, Any]) -> None:
        answers.write(json.dumps(answer) + "\n")
        answers.flush()

    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    for line in sys.stdin:
        say(_answer(json.loads(line), say))


def _exit_with(parent: int) -> None:
    """Stop when the client is gone: a download left running would be nobody's to stop."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _answer(request: dict[str, Any], say: Say) -> dict[str, Any]:
    uri = str(request.get("uri", ""))
    try:
        # Everything the requests use, now: their imports are not the store's time.
        from mlflow.artifacts import download_artifacts, list_artifacts  # noqa: F401
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient, get_tracking_uri  # noqa: F401
    except ImportError:
        return _failed(f"{uri}: fetching from MLflow needs its client: pip install "
                       "'airlock-client[mlflow]'")
    except Exception as exc:  # an installation that cannot import (protobuf, say)
        return _failed(f"{uri}: MLflow's client cannot be imported here: "
                       f"{type(exc).__name__}: {str(exc)[:300]}")
    say({BEGAN: True})
    try:
        tracking_uri = request.get("tracking_uri")
        if tracking_uri is None:
            tracking_uri = get_tracking_uri()
        return {OK: _OPS[request[OP]](request, str(tracking_uri), say)}
    except ModelSourceError as exc:
        return {ERROR: exc.reason, MESSAGE: exc.message}
    except MlflowException as exc:
        return _failed(f"{uri}: {str(exc.message)[:400]}")
    except OSError as exc:
        return _failed(f"{uri}: {exc}")
    except (KeyError, ValueError, TypeError, AttributeError) as exc:  # a malformed answer
        return _failed(f"{uri}: the store's answer is malformed ({type(exc).__name__}: "
                       f"{str(exc)[:200]})")
    except Exception as exc:  # the store's own errors (HTTP libraries, cloud SDKs)
        return _failed(f"{uri}: {type(exc).__name__}: {str(exc)[:400]}")


def _failed(message: str) -> dict[str, Any]:
    return {ERROR: DOWNLOAD_FAILED, MESSAGE: message}


def _model(request: dict[str, Any], tracking_uri: str, say: Say) -> str:
    from mlflow.artifacts import download_artifacts

    # Where the files are, asked of this server and checked (_artifact_locations), then
    # fetched from there: download_artifacts would resolve models:/ against the
    # process-wide registry URI, whatever registry_uri it is given (mlflow 3.17).
    uri = check_location(_location(str(request["uri"]), tracking_uri), tracking_uri)
    max_total_bytes = int(request["max_total_bytes"])
    listed = _check_listing(uri, tracking_uri, int(request["max_files"]), max_total_bytes)
    say({DOWNLOADING: listed})
    with _files_at_most(max_total_bytes if listed is None else listed):
        return str(download_artifacts(artifact_uri=uri, dst_path=str(request["dest"]),
                                      tracking_uri=tracking_uri, registry_uri=tracking_uri))


def _file(request: dict[str, Any], tracking_uri: str, say: Say) -> str:
    from mlflow.artifacts import download_artifacts

    uri = check_location(str(request["uri"]), tracking_uri)
    say({DOWNLOADING: None})
    with _files_at_most(int(request["limit"])):
        return str(download_artifacts(artifact_uri=uri, dst_path=str(request["dest"]),
                                      tracking_uri=tracking_uri))


def _list(request: dict[str, Any], tracking_uri: str, say: Say) -> dict[str, int]:
    from mlflow.artifacts import list_artifacts

    uri = check_location(str(request["uri"]), tracking_uri)
    return {PurePosixPath(f.path).name: -1 if f.is_dir else int(f.file_size or 0)
            for f in list_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)}


_OPS = {MODEL: _model, FILE: _file, LIST: _list}


@contextlib.contextmanager
def _files_at_most(size: int) -> Iterator[None]:
    """No file written meanwhile grows past ``size`` bytes and one more, the one that tells the
    parent it was tried (the soft limit, put back after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    size += 1
    cap = size if hard == resource.RLIM_INFINITY else min(size, hard)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


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
                   max_total_bytes: int) -> int | None:
    """The bytes the store lists under ``location`` (None when it does not say a file's
    size); refused, before a byte is downloaded, when it lists nothing or more entries
    (files and folders) or more bytes than the caps: MLflow downloads whatever is listed, so
    a registered 100 GB directory was fetched whole, and a listing of 20,001 files took 4
    minutes, before the caps refused them. What arrives is held to this total."""
    from mlflow.artifacts import list_artifacts

    pending, entries, total, sized = [""], 0, 0, True
    while pending:
        folder = pending.pop()
        for info in list_artifacts(artifact_uri=f"{location}/{folder}".rstrip("/"),
                                   tracking_uri=tracking_uri):
            entries += 1
            if info.is_dir:
                pending.append(f"{folder}/{PurePosixPath(info.path).name}".lstrip("/"))
            elif info.file_size is None:
                sized = False
            else:
                total += max(int(info.file_size), 0)
            if entries > max_files or total > max_total_bytes:
                raise refuse(f"{location} lists more than {max_files} entries or "
                             f"{max_total_bytes} bytes ({entries} entries, {total} bytes so "
                             "far): nothing was downloaded")
    if not entries:
        raise ModelSourceError(NOT_A_MODEL, f"{location} lists no files: a single file or an "
                                            "empty folder, not a model directory")
    return total if sized else None


if __name__ == "__main__":
    main()

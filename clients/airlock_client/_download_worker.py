"""The process that talks to an MLflow artifact store for the client (``_downloads``).

Started by ``_downloads.Downloads`` as ``python -m airlock_client._download_worker``. It
reads one JSON request per line on stdin and answers on stdout: any number of
``{"listed": BYTES}`` lines (how much the store said it will send), then one
``{"ok": ...}`` or ``{"error": REASON, "message": ..., "refused": BOOL}``. ``refused`` says
the client's own checks refused the source (a location, a listing over the caps) rather than
the store failing. The parent watches what this process writes and how fast, and kills it
past a limit: nothing here needs to be trusted to stop.

Requests, each with ``tracking_uri`` (null: MLflow's from the environment):

- ``{"op": "model", "uri", "dest", "max_files", "max_total_bytes"}``: a ``models:/`` or
  ``runs:/`` URI's directory, downloaded under ``dest``; answers its local path;
- ``{"op": "file", "uri", "dest", "limit"}``: one artifact under ``dest``; its local path;
- ``{"op": "list", "uri"}``: the names directly under ``uri`` and their sizes (a folder: -1).

Only MLflow's location, listing and download calls are made here: they copy bytes and load
nothing (the host-never-deserializes test pins it). While a download runs, a file can grow
only one byte larger than what the store listed (``RLIMIT_FSIZE``; Python ignores
``SIGXFSZ``, so the write fails, and the parent sees the byte too many), and the process exits
when its parent is gone.
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
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from airlock_client._artifact_locations import check_location
from airlock_client._bundle import refuse
from airlock_client._errors import DOWNLOAD_FAILED, ModelSourceError

_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))/?")
_LOGGED_MODEL_URI = re.compile(r"models:/(?P<id>m-[0-9a-f]+)/?")
_RUN_URI = re.compile(r"runs:/(?P<run>[^/]+)(?P<path>/.*)?")


def main() -> None:
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # a print or progress bar must not be read as an answer
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    for line in sys.stdin:
        request = json.loads(line)
        answers.write(json.dumps(_answer(request, answers)) + "\n")
        answers.flush()


def _exit_with(parent: int) -> None:
    """Stop when the client is gone: a download left running would be nobody's to stop."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _answer(request: dict[str, Any], answers: Any) -> dict[str, Any]:
    uri = str(request.get("uri", ""))
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return {"error": DOWNLOAD_FAILED, "refused": False,
                "message": f"{uri}: fetching from MLflow needs its client: pip install "
                           "'airlock-client[mlflow]'"}

    def listed(size: int) -> None:
        answers.write(json.dumps({"listed": size}) + "\n")
        answers.flush()

    try:
        tracking_uri = request.get("tracking_uri")
        if tracking_uri is None:
            from mlflow.tracking import get_tracking_uri

            tracking_uri = get_tracking_uri()
        return {"ok": _OPS[request["op"]](request, str(tracking_uri), listed)}
    except ModelSourceError as exc:
        return {"error": exc.reason, "message": exc.message, "refused": True}
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
    return {"error": DOWNLOAD_FAILED, "message": message, "refused": False}


def _model(request: dict[str, Any], tracking_uri: str, listed: Any) -> str:
    from mlflow.artifacts import download_artifacts

    # Where the files are, asked of this server and checked (_artifact_locations), then
    # fetched from there: download_artifacts would resolve models:/ against the
    # process-wide registry URI, whatever registry_uri it is given (mlflow 3.17).
    uri = check_location(_location(str(request["uri"]), tracking_uri), tracking_uri)
    total = _check_listing(uri, tracking_uri, int(request["max_files"]),
                           int(request["max_total_bytes"]))
    listed(total)
    with _files_at_most(total):
        return str(download_artifacts(artifact_uri=uri, dst_path=str(request["dest"]),
                                      tracking_uri=tracking_uri, registry_uri=tracking_uri))


def _file(request: dict[str, Any], tracking_uri: str, listed: Any) -> str:
    from mlflow.artifacts import download_artifacts

    uri = check_location(str(request["uri"]), tracking_uri)
    limit = int(request["limit"])
    listed(limit)
    with _files_at_most(limit):
        return str(download_artifacts(artifact_uri=uri, dst_path=str(request["dest"]),
                                      tracking_uri=tracking_uri))


def _list(request: dict[str, Any], tracking_uri: str, listed: Any) -> dict[str, int]:
    from mlflow.artifacts import list_artifacts

    uri = check_location(str(request["uri"]), tracking_uri)
    return {PurePosixPath(f.path).name: -1 if f.is_dir else int(f.file_size or 0)
            for f in list_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)}


_OPS = {"model": _model, "file": _file, "list": _list}


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
                   max_total_bytes: int) -> int:
    """The bytes the store lists under ``location`` (``max_total_bytes`` when it does not
    say a file's size); refused, before a byte is downloaded, when it lists more entries or
    more bytes than the caps: MLflow downloads whatever is listed, so a registered 100 GB
    directory was fetched whole, and a listing of 20,001 files took 4 minutes, before the
    caps refused them. What arrives is held to this total."""
    from mlflow.artifacts import list_artifacts

    pending, entries, total, unsized = [""], 0, 0, False
    while pending:
        folder = pending.pop()
        for info in list_artifacts(artifact_uri=f"{location}/{folder}".rstrip("/"),
                                   tracking_uri=tracking_uri):
            entries += 1
            if info.is_dir:
                pending.append(f"{folder}/{PurePosixPath(info.path).name}".lstrip("/"))
            elif info.file_size is None:
                unsized = True
            else:
                total += max(int(info.file_size), 0)
            if entries > max_files or total > max_total_bytes:
                raise refuse(f"{location} lists more than {max_files} entries or "
                             f"{max_total_bytes} bytes ({entries} entries, {total} bytes so "
                             "far): nothing was downloaded")
    return max_total_bytes if unsized else total


if __name__ == "__main__":
    main()

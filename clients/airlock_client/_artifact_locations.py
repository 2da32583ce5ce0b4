"""Where a registry says a model's files are, checked before anything is fetched from there.

The registry is untrusted: anyone who may register a version writes its source. MLflow's
download API fetches from whatever location it is given. A path on this host (``file:`` or no
scheme) is read like any artifact store, so a version whose source was
``file:///home/you/model`` had the client read that directory, send it to the broker and,
under ``migrate``, publish its conversion in the registry. A location that is itself
``models:/`` or ``runs:/`` was looked up again in whatever registry the process defaults to
(creating ``./mlflow.db`` when that is the default). So:

- ``models:`` and ``runs:`` as a location are refused: an indirection through another registry;
- a location on this host is fetched only when the tracking store is on this host too (a
  sqlite file, a file store, a path): there the store's own artifacts are local paths. A
  server's versions are fetched through the server (``mlflow-artifacts:``, run it with
  ``--serve-artifacts``, MLflow's default) or from a remote store (``s3:``, ``gs:``...);
- a location served over HTTP (``http:``, ``https:``, ``mlflow-artifacts:``) is fetched only
  from the tracking server itself: same scheme, host and port. MLflow sends the tracking
  credentials (``MLFLOW_TRACKING_TOKEN``, user and password) to whatever host such a location
  names, so a version whose source was ``mlflow-artifacts://their-host/...`` had the client
  hand its token to that host. An artifact proxy of your own on another host is named in
  ``AIRLOCK_ARTIFACT_HOSTS`` (``host:port``, comma-separated);
- ``UNSAFE_ARTIFACT_LOCATION`` names the location and the rule otherwise.

Imports nothing heavy.
"""

from __future__ import annotations

import os
from urllib.parse import SplitResult, urlsplit

from airlock_client._errors import ModelSourceError

UNSAFE_LOCATION = "UNSAFE_ARTIFACT_LOCATION"
#: Locations that name a model by another registry's look-up.
_INDIRECT = frozenset({"models", "runs"})
#: Locations on this host.
_LOCAL = frozenset({"", "file"})
#: Tracking stores the client reaches over a network: their versions' files are never read
#: from this host's paths.
_REMOTE_STORES = frozenset({"http", "https", "databricks", "databricks-uc", "uc"})
#: Locations MLflow fetches over HTTP with the tracking server's credentials.
_HTTP = frozenset({"http", "https", "mlflow-artifacts"})
#: Other artifact hosts the user trusts with those credentials (``host:port,...``).
HOSTS_ENV = "AIRLOCK_ARTIFACT_HOSTS"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _scheme(uri: str) -> str:
    scheme = urlsplit(uri).scheme.lower()
    return "" if len(scheme) == 1 else scheme  # a Windows drive letter is a path


def check_location(location: str, tracking_uri: str) -> str:
    """``location`` if the client may fetch a registry's files from it for a store at
    ``tracking_uri``; ``ModelSourceError`` (``UNSAFE_LOCATION``) otherwise."""
    scheme = _scheme(location)
    if scheme in _INDIRECT:
        raise ModelSourceError(UNSAFE_LOCATION, f"the registry gives {location!r} as where the "
                               "files are: a look-up in another registry, not a location")
    if scheme in _LOCAL and _scheme(tracking_uri) in _REMOTE_STORES:
        raise ModelSourceError(UNSAFE_LOCATION, f"the server {tracking_uri} gives "
                               f"{location!r}, a path on this host, as where the files are: "
                               "a server's files are fetched through it (mlflow server "
                               "--serve-artifacts) or from a remote store, never from this "
                               "host's paths")
    if scheme in _HTTP:
        _check_host(location, tracking_uri)
    return location


def _check_host(location: str, tracking_uri: str) -> None:
    """An HTTP location is the tracking server's own (or a host the user named)."""
    where, tracking = urlsplit(location), urlsplit(tracking_uri)
    if _scheme(tracking_uri) not in ("http", "https"):
        raise ModelSourceError(UNSAFE_LOCATION, f"the store {tracking_uri} gives {location!r} "
                               "as where the files are: an HTTP location is fetched only from "
                               "the tracking server that gave it")
    if where.scheme.lower() == "mlflow-artifacts":
        if not where.netloc:  # the tracking server's own artifact proxy
            return
        where = urlsplit(f"{tracking.scheme}://{where.netloc}")
    origin = _origin(where)
    trusted = {_origin(urlsplit(f"{where.scheme}://{host.strip()}"))
               for host in os.environ.get(HOSTS_ENV, "").split(",") if host.strip()}
    if origin != _origin(tracking) and origin not in trusted:
        raise ModelSourceError(UNSAFE_LOCATION, f"the server {tracking_uri} gives "
                               f"{location!r} as where the files are: MLflow would send the "
                               "tracking server's credentials to that host. Files are fetched "
                               "over HTTP only from the tracking server itself (same scheme, "
                               f"host and port) or a host named in {HOSTS_ENV}")


def _origin(url: SplitResult) -> tuple[str, str, int | None]:
    scheme = url.scheme.lower()
    try:
        port = url.port
    except ValueError:  # a port that is not a number: no origin of ours
        port = -1
    return scheme, (url.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)

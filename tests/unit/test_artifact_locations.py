"""Where a registry says a version's files are is checked before anything is fetched
(``_artifact_locations``): a server cannot have the client read a path on its own host, nor
send it to another registry by answering ``models:/``. Against a hostile tracking server
(HTTP, in this process) whose answers are the attacker's: on the code before, the first test
copied the user's model directory into the download and the second created ``./mlflow.db``
(seen)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from airlock_client import mlflow_source
from airlock_client._artifact_locations import HOSTS_ENV, UNSAFE_LOCATION, check_location
from airlock_client._errors import ModelSourceError


@pytest.fixture
def hostile_server() -> Iterator[tuple[str, dict[str, str]]]:
    """A tracking server that answers the download-location call with ``answer["location"]``
    and nothing else; its URI and that answer, to set."""
    answer: dict[str, str] = {}
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            routes = {
                "model-versions/get-download-uri": {"artifact_uri": answer["location"]},
                "registered-models/get": {"registered_model": {"name": "innocent"}},
                "model-versions/get": {"model_version": {
                    "name": "innocent", "version": "1", "source": answer["location"],
                    "status": "READY"}},
                "mlflow-artifacts/artifacts": json.loads(answer.get("listing", "{}")),
            }
            asked.append(self.path)
            found = next((doc for route, doc in routes.items() if route in self.path), None)
            data = json.dumps(found or {"error_code": "RESOURCE_DOES_NOT_EXIST",
                                        "message": "no"}).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        answer["asked"] = asked  # type: ignore[assignment]
        yield f"http://127.0.0.1:{server.server_address[1]}", answer
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_server_cannot_have_a_path_on_this_host_fetched(
        hostile_server: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    uri, answer = hostile_server
    private = tmp_path / "home" / "fraud-model"
    private.mkdir(parents=True)
    (private / "MLmodel").write_text("flavors: {}\n")
    (private / "model.pkl").write_bytes(b"the user's own weights")
    answer["location"] = private.as_uri()
    with pytest.raises(ModelSourceError) as refused:
        mlflow_source.resolve("models:/innocent/1", tmp_path / "dest", tracking_uri=uri)
    assert refused.value.reason == UNSAFE_LOCATION
    assert "a path on this host" in refused.value.message
    assert not list((tmp_path / "dest").rglob("model.pkl"))


def test_a_server_cannot_send_the_client_to_another_registry(
        hostile_server: tuple[str, dict[str, str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    uri, answer = hostile_server
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    answer["location"] = "models:/innocent/1"
    with pytest.raises(ModelSourceError) as refused:
        mlflow_source.resolve("models:/innocent/1", tmp_path / "dest", tracking_uri=uri)
    assert refused.value.reason == UNSAFE_LOCATION
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(("location", "tracking", "fetched"), [
    ("mlflow-artifacts:/1/abc/artifacts/model", "http://mlflow:5000", True),
    ("s3://bucket/1/abc/artifacts/model", "https://mlflow.example", True),
    ("file:///srv/mlruns/1/abc/artifacts/model", "sqlite:////srv/mlflow.db", True),
    ("/srv/mlruns/1/abc/artifacts/model", "/srv/mlruns", True),
    ("file:///srv/mlruns/1/abc/artifacts/model", "http://mlflow:5000", False),
    ("/home/you/model", "https://mlflow.example", False),
    ("runs:/abc/model", "sqlite:////srv/mlflow.db", False),
    ("models:/m-123", "http://mlflow:5000", False),
    # Over HTTP, only from the tracking server itself: MLflow sends it the credentials.
    ("mlflow-artifacts://mlflow:5000/1/abc/artifacts/model", "http://mlflow:5000", True),
    ("mlflow-artifacts://their.host/1/abc/artifacts/model", "http://mlflow:5000", False),
    ("https://mlflow.example/api/2.0/mlflow-artifacts/artifacts/m", "https://mlflow.example:443",
     True),
    ("https://their.host/api/2.0/mlflow-artifacts/artifacts/m", "https://mlflow.example", False),
    ("http://mlflow.example/api/2.0/mlflow-artifacts/artifacts/m", "https://mlflow.example",
     False),  # the same host in clear text
    ("http://mlflow.example@their.host/m", "http://mlflow.example", False),
    ("http://mlflow:5000/api/2.0/mlflow-artifacts/artifacts/m", "sqlite:////srv/mlflow.db",
     False),
])
def test_which_locations_are_fetched(location: str, tracking: str, fetched: bool) -> None:
    if fetched:
        assert check_location(location, tracking) == location
    else:
        with pytest.raises(ModelSourceError) as refused:
            check_location(location, tracking)
        assert refused.value.reason == UNSAFE_LOCATION


def test_an_artifact_host_the_user_names_is_fetched_from(
        monkeypatch: pytest.MonkeyPatch) -> None:
    location = "mlflow-artifacts://artifacts.internal:8443/1/abc/artifacts/model"
    with pytest.raises(ModelSourceError):
        check_location(location, "https://mlflow.internal")
    monkeypatch.setenv(HOSTS_ENV, "other.internal, artifacts.internal:8443")
    assert check_location(location, "https://mlflow.internal") == location


def test_the_tracking_token_is_never_sent_to_a_host_a_version_names(
        hostile_server: tuple[str, dict[str, str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On the code before, a version whose source was ``mlflow-artifacts://their-host/...``
    had the client send ``Authorization: Bearer <MLFLOW_TRACKING_TOKEN>`` to that host four
    times (seen: the listing, twice, the server-info probe and the download)."""
    uri, answer = hostile_server
    tokens: list[str | None] = []

    class Collector(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            tokens.append(self.headers.get("Authorization"))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    theirs = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=theirs.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "the-users-token")
        answer["location"] = f"mlflow-artifacts://localhost:{theirs.server_address[1]}/model"
        with pytest.raises(ModelSourceError) as refused:
            mlflow_source.resolve("models:/innocent/1", tmp_path / "dest", tracking_uri=uri)
    finally:
        theirs.shutdown()
        theirs.server_close()
        thread.join()
    assert refused.value.reason == UNSAFE_LOCATION
    assert "credentials" in refused.value.message
    assert tokens == []


def test_a_malformed_listing_is_a_reason_not_a_traceback(
        hostile_server: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """A listing entry without ``is_dir``: MLflow raised KeyError, and ``airlock convert
    models:/...`` ended in its traceback."""
    uri, answer = hostile_server
    answer["location"] = "mlflow-artifacts:/1/abc/artifacts/model"
    answer["listing"] = json.dumps({"files": [{"path": "MLmodel"}]})
    with pytest.raises(ModelSourceError) as refused:
        mlflow_source.resolve("models:/innocent/1", tmp_path / "dest", tracking_uri=uri)
    assert refused.value.reason == "MLFLOW_DOWNLOAD_FAILED"
    assert "malformed" in refused.value.message


def test_a_listing_over_the_caps_is_refused_before_anything_is_downloaded(
        hostile_server: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """MLflow downloads whatever is listed; the caps were applied to what arrived, so a
    registered 100 GB model was fetched whole first (and 20,001 files took 4 minutes)."""
    uri, answer = hostile_server
    answer["location"] = "mlflow-artifacts:/1/abc/artifacts/model"
    answer["listing"] = json.dumps({"files": [
        {"path": "MLmodel", "is_dir": False, "file_size": 100},
        {"path": "model.pkl", "is_dir": False, "file_size": 100 * 1024**3}]})
    with pytest.raises(ModelSourceError) as refused:
        mlflow_source.resolve("models:/innocent/1", tmp_path / "dest", tracking_uri=uri)
    assert refused.value.reason == "UNSAFE_MODEL_DIR"
    assert "nothing was downloaded" in refused.value.message
    downloads = [p for p in answer["asked"] if "artifacts/1/abc" in p]  # a file's own GET
    assert downloads == [], downloads

"""A hostile artifact store cannot fill the client's disk or hold a download open
(``_downloads``): MLflow's download has no byte cap and no overall deadline, so it runs in a
worker process the client watches and kills.

The store here is an HTTP tracking server in this process that serves ``mlflow-artifacts:``
itself (``mlflow server --serve-artifacts``). It lists a model of a few bytes, then sends a
file its own way: endlessly, or a byte at a time. On the code before, the first test
downloaded all 64 MiB the server sent for a file it listed as 1 byte and returned the model
(seen), and a drip held ``resolve`` for as long as the server liked (a reviewer saw 200 s).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from airlock_client import mlflow_source
from airlock_client._downloads import DownloadLimits, Downloads
from airlock_client._errors import ModelSourceError
from airlock_client._twin import downloaded, mlflow_download, mlflow_listing, read_small
from airlock_client.safe_load import SafeLoadError
from tests.unit.shared_tmp import finishes_within

_ROOT = "1/abc/artifacts/model"
_ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
#: What an endless sender sends at most, so that a failing test still ends.
_ENDLESS = 64 * 1024**2


@dataclass
class Store:
    """What the server lists and how it sends each file; what it sent."""

    uri: str = ""
    files: dict[str, bytes] = field(default_factory=lambda: {
        "MLmodel": b"flavors: {}\n", "model.pkl": b"x"})
    #: File name -> how it is sent instead of its bytes: "endless", "drip", or "fast then
    #: drip" (all its bytes but the last 600 at once, then those one at a time).
    senders: dict[str, str] = field(default_factory=dict)
    #: Seconds before each file's answer (a proxy in front of a slow store).
    latency: float = 0.0
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, n: int) -> None:
        with self.lock:
            self.sent += n


@pytest.fixture
def store() -> Iterator[Store]:
    state = Store()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            location = f"mlflow-artifacts:/{_ROOT}"
            if "get-download-uri" in path:
                return self._json({"artifact_uri": location})
            if "registered-models/get" in path:
                return self._json({"registered_model": {"name": "innocent"}})
            if "model-versions/get" in path:
                return self._json({"model_version": {"name": "innocent", "version": "1",
                                                     "source": location, "status": "READY"}})
            if path.rstrip("/") == _ARTIFACTS:  # a listing: ?path=...
                if parse_qs(query).get("path") != [_ROOT]:  # a file: nothing under it
                    return self._json({})
                return self._json({"files": [
                    {"path": name, "is_dir": False, "file_size": len(data)}
                    for name, data in state.files.items()]})
            name = path.rsplit("/", 1)[-1]
            if path.startswith(f"{_ARTIFACTS}/{_ROOT}/") and name in state.files:
                return self._send(name)
            return self._json({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no"},
                              404)

        def _json(self, doc: object, status: int = 200) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _send(self, name: str) -> None:
            how = state.senders.get(name)
            time.sleep(state.latency)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if how is None:
                data = state.files[name]
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return state.count(len(data))
            self.send_header("Connection", "close")  # no length: until the server stops
            self.end_headers()
            block, pause = (b"\0" * 65536, 0.0) if how == "endless" else (b"x", 0.1)
            deadline = time.monotonic() + 60
            try:
                if how == "fast then drip":
                    self.wfile.write(state.files[name][:-600])
                    state.count(len(state.files[name]) - 600)
                while state.sent < _ENDLESS and time.monotonic() < deadline:
                    self.wfile.write(block)
                    self.wfile.flush()
                    state.count(len(block))
                    time.sleep(pause)
            except OSError:  # the client stopped reading: what this test wants
                pass
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def workers_of(pid: int) -> list[int]:
    """The download workers whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv = cmdline.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"airlock_client._download_worker" in argv:
            found.append(int(entry))
    return found


def test_a_store_that_sends_what_it_listed_is_downloaded(store: Store, tmp_path: Path) -> None:
    model = mlflow_source.resolve("models:/innocent/1", tmp_path, tracking_uri=store.uri)
    assert (model / "model.pkl").read_bytes() == b"x"
    assert workers_of(os.getpid()) == []  # resolve's own worker is stopped with it


def test_a_store_that_sends_more_than_it_listed_is_stopped(store: Store,
                                                          tmp_path: Path) -> None:
    store.senders["model.pkl"] = "endless"
    outcome = finishes_within(lambda: mlflow_source.resolve(
        "models:/innocent/1", tmp_path, tracking_uri=store.uri), 120,
        still="the download still ran")
    assert isinstance(outcome, ModelSourceError), outcome
    assert outcome.reason == "UNSAFE_MODEL_DIR"
    assert "more than the 13 bytes it listed" in outcome.message
    sizes = [p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()]
    assert max(sizes) <= 13 + 1, sizes  # a file stops one byte past what was listed in all
    assert store.sent < _ENDLESS
    assert workers_of(os.getpid()) == []


def test_a_store_that_drips_is_stopped(store: Store, tmp_path: Path) -> None:
    store.files["model.pkl"] = b"y" * 1024**2  # listed as 1 MiB: the byte cap is not the limit
    store.senders["model.pkl"] = "drip"
    limits = DownloadLimits(grace_s=3.0, min_rate=64 * 1024)
    started = time.monotonic()
    with Downloads(limits) as downloads:
        outcome = finishes_within(lambda: mlflow_source.resolve(
            "models:/innocent/1", tmp_path, tracking_uri=store.uri, downloads=downloads), 50)
    assert isinstance(outcome, ModelSourceError), outcome
    assert outcome.reason == "MLFLOW_DOWNLOAD_FAILED"
    assert "of progress in the last 3 s" in outcome.message
    assert time.monotonic() - started < 45  # the server drips for 60 s
    assert workers_of(os.getpid()) == []


def test_a_twin_file_past_its_limit_is_stopped(store: Store, tmp_path: Path) -> None:
    """``airlock migrate`` and ``load_verified`` read a provenance record of at most 1 MiB:
    on the code before, 501 MB were written first."""
    store.files["model.onnx.provenance.json"] = b"{}"
    store.senders["model.onnx.provenance.json"] = "endless"
    with Downloads() as downloads:
        download = mlflow_download(store.uri, downloads)
        outcome = finishes_within(lambda: read_small(
            download, f"mlflow-artifacts:/{_ROOT}/model.onnx.provenance.json",
            tmp_path / "record", 1024**2), 120)
    assert isinstance(outcome, SafeLoadError), outcome
    assert outcome.reason == "TOO_LARGE"
    assert f"more than the {1024**2} bytes allowed" in outcome.message
    assert store.sent < _ENDLESS


def test_a_twin_file_within_its_limit_and_the_listing_arrive(store: Store,
                                                            tmp_path: Path) -> None:
    with Downloads() as downloads:
        listing = mlflow_listing(store.uri, downloads)
        assert listing(f"mlflow-artifacts:/{_ROOT}") == {"MLmodel": 12, "model.pkl": 1}
        download = mlflow_download(store.uri, downloads)
        with downloaded(download, f"mlflow-artifacts:/{_ROOT}/MLmodel", tmp_path / "f",
                        64) as fh:
            assert fh.read() == b"flavors: {}\n"
        assert len(workers_of(os.getpid())) == 1  # one worker served the three calls
    assert workers_of(os.getpid()) == []


def test_a_download_process_past_its_memory_cap_is_stopped(store: Store) -> None:
    with Downloads(DownloadLimits(max_rss=1)) as downloads, \
            pytest.raises(ModelSourceError) as stopped:
        downloads.listing(f"mlflow-artifacts:/{_ROOT}", tracking_uri=store.uri)
    assert stopped.value.reason == "MLFLOW_DOWNLOAD_FAILED"
    assert "past 0 MiB" in stopped.value.message
    assert workers_of(os.getpid()) == []


def test_a_worker_ends_when_its_client_dies(store: Store, tmp_path: Path) -> None:
    """A download left running would be nobody's to stop."""
    store.senders["model.pkl"] = "drip"
    store.files["model.pkl"] = b"y" * 1024**2
    script = ("import sys; from airlock_client import mlflow_source; "
              "mlflow_source.resolve('models:/innocent/1', sys.argv[1], tracking_uri=sys.argv[2])")
    client = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), store.uri],
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        deadline = time.monotonic() + 60
        while not (workers := workers_of(client.pid)):
            assert client.poll() is None and time.monotonic() < deadline, "no worker started"
            time.sleep(0.1)
        while store.sent == 0:  # the download has begun
            assert time.monotonic() < deadline
            time.sleep(0.1)
        client.send_signal(signal.SIGKILL)
        client.wait()
        while os.path.exists(f"/proc/{workers[0]}"):
            stat = Path(f"/proc/{workers[0]}/stat").read_text(errors="replace")
            if stat.rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped by init
                break
            assert time.monotonic() < deadline + 30, "the worker outlived its client"
            time.sleep(0.2)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_a_directory_where_a_file_was_asked_for_is_refused(tmp_path: Path) -> None:
    """On the code before, ``os.fdopen`` raised ``IsADirectoryError`` (a traceback)."""
    def download(uri: str, dest: Path, *limit: int) -> Path:
        (dest / "model.onnx").mkdir()
        return dest / "model.onnx"

    with pytest.raises(SafeLoadError) as refused, \
            downloaded(download, "mlflow-artifacts:/x/model.onnx", tmp_path / "f", 64):
        pass
    assert refused.value.reason == "ARTIFACT_UNSAFE"
    assert "not a regular file" in refused.value.message


def test_a_store_that_sends_fast_then_drips_is_stopped_within_a_window(
        store: Store, tmp_path: Path) -> None:
    """Measured from the start, the average stayed high for long after the fast part: before
    this test's code, 8 MiB sent at once bought 3 + 128 s of drip."""
    store.files["model.pkl"] = b"y" * 8 * 1024**2
    store.senders["model.pkl"] = "fast then drip"
    with Downloads(DownloadLimits(grace_s=3.0)) as downloads:
        outcome = finishes_within(lambda: mlflow_source.resolve(
            "models:/innocent/1", tmp_path, tracking_uri=store.uri, downloads=downloads), 50)
    assert isinstance(outcome, ModelSourceError), outcome
    assert "of progress in the last 3 s" in outcome.message


def test_many_small_files_behind_a_slow_proxy_are_progress(store: Store,
                                                          tmp_path: Path) -> None:
    """Files count as progress, not only bytes: 200 files of 1 KiB, 50 ms each, are 20 KiB/s
    of bytes, and were stopped before files counted."""
    store.files.update({f"shard-{i:03}.bin": b"w" * 1024 for i in range(200)})
    store.latency = 0.05
    with Downloads(DownloadLimits(grace_s=2.0)) as downloads:
        model = mlflow_source.resolve("models:/innocent/1", tmp_path, tracking_uri=store.uri,
                                      downloads=downloads)
    assert len(list(model.iterdir())) == 202


def test_a_model_of_exactly_max_files_is_downloaded(store: Store, tmp_path: Path) -> None:
    """The directory MLflow makes for the model is not one of its files (it was counted)."""
    model = mlflow_source.resolve("models:/innocent/1", tmp_path, tracking_uri=store.uri,
                                  max_files=2)
    assert sorted(p.name for p in model.iterdir()) == ["MLmodel", "model.pkl"]


def test_a_location_that_lists_nothing_is_not_a_model_directory(store: Store,
                                                                 tmp_path: Path) -> None:
    store.files.clear()
    with pytest.raises(ModelSourceError) as refused:
        mlflow_source.resolve("models:/innocent/1", tmp_path, tracking_uri=store.uri)
    assert refused.value.reason == "NOT_A_MODEL_DIR"
    assert "lists no files" in refused.value.message


def test_close_stops_a_download_in_flight(store: Store, tmp_path: Path) -> None:
    """``migrate``'s second Ctrl-C closes its downloads: on the code before, ``close`` left a
    busy worker running until its limits stopped it."""
    store.files["model.pkl"] = b"y" * 1024**2
    store.senders["model.pkl"] = "drip"
    downloads = Downloads()
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(finishes_within(
        lambda: mlflow_source.resolve("models:/innocent/1", tmp_path, tracking_uri=store.uri,
                                      downloads=downloads), 50)))
    thread.start()
    deadline = time.monotonic() + 60
    while store.sent == 0:  # the download has begun
        assert time.monotonic() < deadline
        time.sleep(0.05)
    downloads.close()
    thread.join(30)
    assert not thread.is_alive(), "close() left the download running"
    assert isinstance(outcome[0], ModelSourceError), outcome
    assert outcome[0].reason == "MLFLOW_DOWNLOAD_FAILED"  # migrate retries it next run
    assert "the command is ending" in outcome[0].message
    assert workers_of(os.getpid()) == []


def test_limits_are_checked_when_made() -> None:
    with pytest.raises(ValueError):
        DownloadLimits(min_rate=0)


def test_nothing_in_the_working_directory_is_imported_by_the_worker(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m`` puts the working directory first on ``sys.path``: another user who may
    write where the client runs (``/tmp``, a team directory) planted ``json.py``, and the
    worker ran it as the client's user (seen on the code before)."""
    marker = tmp_path / "ran"
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "json.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "raise ImportError('planted')\n")
    monkeypatch.chdir(shared)
    with Downloads() as downloads:
        assert downloads.listing(f"mlflow-artifacts:/{_ROOT}", tracking_uri=store.uri)
    assert not marker.exists()


def test_what_the_interpreter_prints_at_start_is_not_an_answer(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``sitecustomize`` that prints: on the code before, a JSONDecodeError traceback."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("print('hello from sitecustomize')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    with Downloads() as downloads:
        assert downloads.listing(f"mlflow-artifacts:/{_ROOT}", tracking_uri=store.uri)


def test_a_broken_mlflow_is_named_not_a_bare_exit_status(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken" / "mlflow"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise TypeError('Descriptors cannot be created "
                                        "directly')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(broken.parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    with Downloads() as downloads, pytest.raises(ModelSourceError) as failed:
        downloads.listing(f"mlflow-artifacts:/{_ROOT}", tracking_uri=store.uri)
    assert failed.value.reason == "MLFLOW_DOWNLOAD_FAILED"
    assert "TypeError: Descriptors cannot be created directly" in failed.value.message


def test_a_client_holding_more_than_1024_descriptors_still_downloads(store: Store) -> None:
    """``select()`` refuses descriptors past 1023 (ValueError, on the code before)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with Downloads() as downloads:
            assert downloads.listing(f"mlflow-artifacts:/{_ROOT}", tracking_uri=store.uri)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_worker_slow_to_start_does_not_count_against_the_store(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing MLflow takes the worker 1.3 CPU-s, several seconds on a busy machine: the
    store's ``grace_s`` counted it, and a full unit-suite run beside a test run stopped a
    download that was fine ("did not answer within 2 s"). The clock starts once the worker
    says it asks the store. Here its interpreter sleeps 3 s before anything, against 1 s."""
    slow = tmp_path / "slow-start"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(3)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(slow), os.environ.get("PYTHONPATH", "")) if p))
    with Downloads(DownloadLimits(grace_s=1.0)) as downloads:
        model = mlflow_source.resolve("models:/innocent/1", tmp_path / "out",
                                      tracking_uri=store.uri, downloads=downloads)
    assert sorted(p.name for p in model.iterdir()) == ["MLmodel", "model.pkl"]

"""MLflow downloads in a process the client can stop.

The artifact store is the registry's, and the registry is untrusted. MLflow's download has
no byte cap and no overall deadline (its timeout is per read), so a store that listed a
1-byte file and then streamed without end wrote 1 GB into the client's temporary directory,
and one that sent a byte every 5 s held ``airlock convert models:/...`` past 200 s. A thread
cannot be stopped, so every MLflow call that fetches a location, a listing or bytes runs in
a worker process (``_download_worker``) and this side watches it, four times a second:

- the bytes on disk under the download's directory against what the store listed (capped
  by the caller's limit), and its entries against the caller's cap;
- progress: after a grace for the store to answer and start (``DownloadLimits.grace_s``),
  the bytes must keep up an average of ``min_rate``;
- the worker's memory (MLflow reads a JSON answer whole).

A worker past a limit is killed with its process group and the call raises
``ModelSourceError`` with what was measured: ``UNSAFE_MODEL_DIR`` for more than was listed,
``MLFLOW_DOWNLOAD_FAILED`` for too slow or too large a process. Workers are reused across
the calls of one ``Downloads`` (importing MLflow costs about 1.3 CPU-s), one call at a time
each; ``close`` stops them. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airlock_client._bundle import refuse
from airlock_client._errors import DOWNLOAD_FAILED, ModelSourceError

#: How often the worker's disk, memory and progress are looked at, in seconds.
_TICK = 0.25
#: The longest answer line read from a worker (a listing of 10,000 names fits many times).
_MAX_ANSWER = 64 * 1024**2
#: Where ``airlock_client`` is imported from, for the worker's ``PYTHONPATH``.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class DownloadLimits:
    """What a download from an artifact store may take, besides the caller's byte caps."""

    #: Seconds the store has to answer and start sending before ``min_rate`` applies.
    grace_s: float = 60.0
    #: Bytes per second a download must average once its grace is over.
    min_rate: int = 64 * 1024
    #: The worker's resident memory, in bytes.
    max_rss: int = 1024**3


class Downloads:
    """The MLflow downloads of one command or call, each in a worker it can stop.

    Thread-safe: concurrent calls each get a worker of their own.
    """

    def __init__(self, limits: DownloadLimits | None = None) -> None:
        self.limits = limits or DownloadLimits()
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Downloads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def model(self, uri: str, dest: Path, *, tracking_uri: str | None, max_files: int,
              max_total_bytes: int) -> Path:
        """A ``models:/`` or ``runs:/`` URI's directory, downloaded under ``dest``."""
        return Path(self._ask({"op": "model", "uri": uri, "dest": str(dest),
                               "tracking_uri": tracking_uri, "max_files": max_files,
                               "max_total_bytes": max_total_bytes},
                              _Watch(uri, dest, max_files, max_total_bytes)))

    def file(self, uri: str, dest: Path, *, tracking_uri: str | None, limit: int) -> Path:
        """One artifact of at most ``limit`` bytes, downloaded under ``dest``."""
        return Path(self._ask({"op": "file", "uri": uri, "dest": str(dest),
                               "tracking_uri": tracking_uri, "limit": limit},
                              _Watch(uri, dest, 1, limit)))

    def listing(self, uri: str, *, tracking_uri: str | None) -> dict[str, int]:
        """The names directly under ``uri`` and their sizes (a folder: -1)."""
        found = self._ask({"op": "list", "uri": uri, "tracking_uri": tracking_uri},
                          _Watch(uri, None, 0, 0))
        return {str(name): int(size) for name, size in dict(found).items()}

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for worker in idle:
            worker.stop()

    def _ask(self, request: dict[str, Any], watch: _Watch) -> Any:
        worker = self._take()
        try:
            answer = worker.ask(request, watch, self.limits)
        except BaseException:  # a limit, the worker's death or a Ctrl-C: its state is unknown
            worker.kill()
            raise
        self._give(worker)
        if refusal := watch.overrun():  # also when it finished between two looks
            raise refusal
        if "error" in answer:
            raise ModelSourceError(str(answer["error"]), str(answer.get("message", "")))
        return answer["ok"]

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("these downloads are closed")
            if self._idle:
                return self._idle.pop()
        return _Worker()

    def _give(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        worker.stop()


@contextlib.contextmanager
def scoped(downloads: Downloads | None) -> Iterator[Downloads]:
    """``downloads``, or a new one closed when the block ends."""
    if downloads is not None:
        yield downloads
        return
    with Downloads() as own:
        yield own


@dataclass
class _Watch:
    """One call's directory and caps, and what was seen of it."""

    uri: str
    dest: Path | None
    max_entries: int
    cap: int
    used: int = 0
    entries: int = 0

    def look(self) -> None:
        if self.dest is None:
            return
        self.used, self.entries = _usage(self.dest, self.max_entries + 1)

    def overrun(self) -> ModelSourceError | None:
        """The refusal if the directory holds more than the caps allow, else None."""
        self.look()
        if self.entries > self.max_entries:
            return refuse(f"{self.uri}: the store sent more than {self.max_entries} files: "
                          "stopped")
        if self.used > self.cap:
            return refuse(f"{self.uri}: the store sent more than the {self.cap} bytes it "
                          f"listed ({self.used} bytes arrived): stopped")
        return None


class _Worker:
    """One ``_download_worker`` process, in a session of its own."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "airlock_client._download_worker"], env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True)
        except OSError as exc:
            raise ModelSourceError(DOWNLOAD_FAILED, "cannot start the download process "
                                   f"({sys.executable}): {exc.strerror}") from None
        self._pending = b""

    def ask(self, request: dict[str, Any], watch: _Watch, limits: DownloadLimits) -> Any:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self._died(watch) from None
        started = time.monotonic()
        while True:
            line = self._line(_TICK, watch)
            if line is not None:
                answer = json.loads(line)
                if "listed" in answer:  # the store's own total: what may arrive
                    watch.cap = min(watch.cap, int(answer["listed"]))
                    continue
                return answer
            if refusal := watch.overrun():
                raise refusal
            elapsed = time.monotonic() - started
            if elapsed > limits.grace_s + watch.used / limits.min_rate:
                raise ModelSourceError(DOWNLOAD_FAILED, (
                    f"{watch.uri}: {watch.used} bytes in {elapsed:.0f} s, less than "
                    f"{limits.min_rate // 1024} KiB/s after {limits.grace_s:.0f} s to start: "
                    "the store is too slow or holding the download open; stopped"))
            if (rss := _rss(self.process.pid)) > limits.max_rss:
                raise ModelSourceError(DOWNLOAD_FAILED, (
                    f"{watch.uri}: the download process grew to {rss // 1024**2} MiB, past "
                    f"{limits.max_rss // 1024**2} MiB: the store's answers are too large; "
                    "stopped"))

    def _line(self, timeout: float, watch: _Watch) -> bytes | None:
        """The next whole answer line, or None if none came within ``timeout``."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self._pending:
            if not select.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise self._died(watch)
            self._pending += chunk
            if len(self._pending) > _MAX_ANSWER:
                raise ModelSourceError(DOWNLOAD_FAILED, f"{watch.uri}: the store's answer is "
                                       f"larger than {_MAX_ANSWER // 1024**2} MiB")
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def _died(self, watch: _Watch) -> ModelSourceError:
        code = self.process.wait()
        if refusal := watch.overrun():
            return refusal
        how = f"signal {-code}" if code < 0 else f"status {code}"
        return ModelSourceError(DOWNLOAD_FAILED, f"{watch.uri}: the download process ended "
                                                 f"({how})")

    def stop(self) -> None:
        """End an idle worker: EOF on its requests, then the kill if it lingers."""
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()


def _usage(root: Path, max_entries: int) -> tuple[int, int]:
    """Bytes (file sizes) and entries under ``root``, links not followed; counting stops
    past ``max_entries``."""
    used, entries, pending = 0, 0, [str(root)]
    while pending and entries <= max_entries:
        try:
            scan = os.scandir(pending.pop())
        except OSError:
            continue
        with scan:
            for entry in scan:
                entries += 1
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    used += info.st_size
    return used, entries


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0

"""MLflow downloads in a process the client can stop.

The artifact store is named by the registry, and the registry is untrusted. MLflow's
download has no byte cap and no overall deadline (its timeout is per read), so a store that
listed a 1-byte file and then streamed without end wrote 1 GB into the client's temporary
directory, and one that sent a byte every 5 s held ``airlock convert models:/...`` past
200 s. A thread cannot be stopped, so every MLflow call that fetches a location, a listing
or bytes runs in a worker process (``_download_worker``) and this side watches it, four
times a second:

- the bytes on disk under the call's directory (allocated: a sparse file shows only what
  was written) against the store's listed total or the caller's limit, and its entries
  against the caller's cap;
- time: the worker has ``START_SECONDS`` to import MLflow (1.3 CPU-s, more on a busy
  machine: not the store's time); then the store has ``grace_s`` to answer the location and
  listing calls; then, in every
  ``grace_s`` of the download, progress must reach ``min_rate`` on average, a file or folder
  that appears counting as ``ENTRY_CREDIT`` bytes (many small files behind a slow proxy are
  progress too). A drip, or fast bytes then a drip, is stopped within one window; a store
  that makes the least progress allowed is held to ``max_files`` entries or the listed
  bytes, whichever it runs out of first;
- the worker's memory (MLflow reads a JSON answer whole).

A worker past a limit is killed with its process group, and the call raises
``ModelSourceError`` with what was measured: ``UNSAFE_MODEL_DIR`` for more than a model's
listing, ``TOO_LARGE`` for more than a file's limit, ``MLFLOW_DOWNLOAD_FAILED`` for too
slow, too large a process, or a store's failure. Workers are reused across the calls of one
``Downloads`` (starting one costs about 1.3 CPU-s, for importing MLflow), one call at a time
each; ``close`` stops them all, the busy ones too. Imports nothing heavy.
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
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airlock_client._bundle import UNSAFE
from airlock_client._download_worker import (
    BEGAN,
    DOWNLOADING,
    ENVIRONMENT,
    ERROR,
    FILE,
    LIST,
    MESSAGE,
    MODEL,
    OK,
    OP,
)
from airlock_client._errors import DOWNLOAD_FAILED, TOO_LARGE, ModelSourceError

#: The bytes of progress a new file or folder counts for (a request's worth).
ENTRY_CREDIT = 64 * 1024
#: How often the worker's disk, memory and progress are looked at, in seconds.
_TICK = 0.25
#: The longest answer line read from a worker (a listing of 10,000 names fits many times).
_MAX_ANSWER = 64 * 1024**2
#: The end of the worker's stderr kept for a message when it dies.
_STDERR_TAIL = 2048
#: Where ``airlock_client`` is imported from, for the worker's ``PYTHONPATH``.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
#: How long a worker may take to import MLflow before it asks the store (about 1.3 CPU-s).
START_SECONDS = 300.0


@dataclass(frozen=True)
class DownloadLimits:
    """What a download from an artifact store may take, besides the caller's byte caps."""

    #: Seconds the store has to answer before the download begins, and the window over
    #: which the download's progress is measured.
    grace_s: float = 60.0
    #: Bytes per second a download must average over every window.
    min_rate: int = 64 * 1024
    #: The worker's resident memory, in bytes.
    max_rss: int = 1024**3

    def __post_init__(self) -> None:
        if not (self.grace_s > 0 and self.min_rate > 0 and self.max_rss > 0):
            raise ValueError(f"download limits must be positive: {self}")


class Downloads:
    """The MLflow downloads of one command or call, each in a worker it can stop.

    Thread-safe: concurrent calls each get a worker of their own.
    """

    def __init__(self, limits: DownloadLimits | None = None) -> None:
        self.limits = limits or DownloadLimits()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Downloads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def model(self, uri: str, dest: Path, *, tracking_uri: str | None, max_files: int,
              max_total_bytes: int) -> Path:
        """A ``models:/`` or ``runs:/`` URI's directory, downloaded under ``dest``."""
        # MLflow puts the model in a directory of its own under dest: one entry more.
        watch = _Watch(uri, dest, max_files + 1, max_total_bytes, UNSAFE, "allowed")
        return Path(self._ask({OP: MODEL, "uri": uri, "dest": str(dest),
                               "tracking_uri": tracking_uri, "max_files": max_files,
                               "max_total_bytes": max_total_bytes}, watch))

    def file(self, uri: str, dest: Path, *, tracking_uri: str | None, limit: int) -> Path:
        """One artifact of at most ``limit`` bytes, downloaded under ``dest``."""
        watch = _Watch(uri, dest, 1, limit, TOO_LARGE, "allowed")
        return Path(self._ask({OP: FILE, "uri": uri, "dest": str(dest),
                               "tracking_uri": tracking_uri, "limit": limit}, watch))

    def listing(self, uri: str, *, tracking_uri: str | None) -> dict[str, int]:
        """The names directly under ``uri`` and their sizes (a folder: -1)."""
        found = self._ask({OP: LIST, "uri": uri, "tracking_uri": tracking_uri},
                          _Watch(uri, None, 0, 0, UNSAFE, "allowed"))
        if not isinstance(found, dict):
            raise _malformed(uri)
        return {str(name): int(size) for name, size in found.items()}

    def close(self) -> None:
        """Stop every worker: the idle ones at once, the busy ones by killing them (their
        calls raise ``MLFLOW_DOWNLOAD_FAILED``, which ``migrate`` retries on its next run)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        for worker in busy:
            worker.kill()
        _stop_all(idle)

    def _ask(self, request: dict[str, Any], watch: _Watch) -> Any:
        worker = self._take()
        try:
            answer = worker.ask(request, watch, self.limits)
        except BaseException:  # a limit, the worker's death or a Ctrl-C: its state is unknown
            worker.kill()
            with self._lock:
                self._busy.discard(worker)
                closed = self._closed
            if closed:
                raise ModelSourceError(DOWNLOAD_FAILED, f"{watch.uri}: stopped: the command "
                                                        "is ending") from None
            raise
        self._give(worker)
        if refusal := watch.overrun():  # also when it finished between two looks
            raise refusal
        if ERROR in answer:
            raise ModelSourceError(str(answer[ERROR]), str(answer.get(MESSAGE, "")))
        if OK not in answer:
            raise _malformed(watch.uri)
        return answer[OK]

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise ModelSourceError(DOWNLOAD_FAILED, "stopped: the command is ending")
            while self._idle:
                worker = self._idle.pop()
                if worker.process.poll() is None:  # an idle one may have been killed
                    self._busy.add(worker)
                    return worker
                worker.kill()
        worker = _Worker()
        with self._lock:
            self._busy.add(worker)
            if not self._closed:
                return worker
        worker.kill()
        raise ModelSourceError(DOWNLOAD_FAILED, "stopped: the command is ending")

    def _give(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.discard(worker)
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
    #: The refusal's reason, and whose number the cap is ("allowed", "it listed").
    reason: str
    whose: str
    used: int = 0
    entries: int = 0
    #: (time, progress) over the last window, once the download began.
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def look(self) -> None:
        if self.dest is not None:
            self.used, self.entries = _usage(self.dest, self.max_entries + 1)

    def listed(self, total: Any) -> None:
        """The store's own total, when it said one: what may arrive."""
        if isinstance(total, int) and 0 <= total < self.cap:
            self.cap, self.whose = total, "it listed"

    def overrun(self) -> ModelSourceError | None:
        """The refusal if the directory holds more than the caps allow, else None."""
        self.look()
        if self.entries > self.max_entries:
            return ModelSourceError(UNSAFE, f"{self.uri}: the store sent more than "
                                            f"{self.max_entries} files and folders: stopped")
        if self.used > self.cap:
            return ModelSourceError(self.reason, (
                f"{self.uri}: the store sent more than the {self.cap} bytes {self.whose} "
                f"({self.used} bytes arrived): stopped"))
        return None

    def stalled(self, now: float, limits: DownloadLimits) -> ModelSourceError | None:
        """The refusal if the last window's progress fell short of ``min_rate``."""
        progress = self.used + self.entries * ENTRY_CREDIT
        self.samples.append((now, progress))
        while len(self.samples) > 1 and self.samples[1][0] <= now - limits.grace_s:
            self.samples.popleft()
        since, before = self.samples[0]
        if now - since < limits.grace_s:
            return None
        if progress - before >= limits.min_rate * limits.grace_s:
            return None
        return ModelSourceError(DOWNLOAD_FAILED, (
            f"{self.uri}: {progress - before} bytes of progress in the last "
            f"{now - since:.0f} s (a file counts as {ENTRY_CREDIT // 1024} KiB), less than "
            f"{limits.min_rate // 1024} KiB/s: the store is too slow or holding the download "
            "open; stopped"))


class _Worker:
    """One ``_download_worker`` process, in a session of its own."""

    def __init__(self) -> None:
        env = {**os.environ, **ENVIRONMENT}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        answers, theirs = os.pipe()
        try:
            self.process = subprocess.Popen(
                # -P: not the working directory first on sys.path, where another user may
                # have put a json.py.
                [sys.executable, "-P", "-m", "airlock_client._download_worker", str(theirs)],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=(theirs,), start_new_session=True)
        except OSError as exc:
            os.close(answers)
            raise ModelSourceError(DOWNLOAD_FAILED, "cannot start the download process "
                                   f"({sys.executable}): {exc.strerror}") from None
        finally:
            os.close(theirs)
        self._answers = answers
        self._pending = bytearray()
        self._scanned = 0
        self._stderr = bytearray()
        self._stderr_open = True

    def ask(self, request: dict[str, Any], watch: _Watch, limits: DownloadLimits) -> Any:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self._died(watch) from None
        started, downloading, began = time.monotonic(), False, False
        while True:
            line = self._line(watch)
            now = time.monotonic()
            if line is not None:
                answer = _parse(line, watch.uri)
                if BEGAN in answer:  # imported: the store's time starts now
                    started, began = now, True
                    continue
                if DOWNLOADING in answer:
                    watch.listed(answer[DOWNLOADING])
                    downloading = True
                    continue
                return answer
            if refusal := watch.overrun():
                raise refusal
            if downloading:
                if refusal := watch.stalled(now, limits):
                    raise refusal
            elif not began and now - started > START_SECONDS:
                raise ModelSourceError(DOWNLOAD_FAILED, (
                    f"{watch.uri}: the download process did not get MLflow imported within "
                    f"{START_SECONDS:.0f} s (is the machine overloaded?): stopped"))
            elif began and now - started > limits.grace_s:
                raise ModelSourceError(DOWNLOAD_FAILED, (
                    f"{watch.uri}: the store did not answer within {limits.grace_s:.0f} s: "
                    "stopped"))
            if (rss := _rss(self.process.pid)) > limits.max_rss:
                raise ModelSourceError(DOWNLOAD_FAILED, (
                    f"{watch.uri}: the download process grew to {rss // 1024**2} MiB, past "
                    f"{limits.max_rss // 1024**2} MiB: the store's answers are too large; "
                    "stopped"))

    def _line(self, watch: _Watch) -> bytes | None:
        """The next whole answer line, or None if none came within a tick."""
        assert self.process.stderr is not None
        err = self.process.stderr.fileno()
        deadline = time.monotonic() + _TICK
        while (end := self._pending.find(b"\n", self._scanned)) < 0:
            self._scanned = len(self._pending)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            poll = select.poll()  # not select(): the client may hold more than 1024 fds
            poll.register(self._answers, select.POLLIN)
            if self._stderr_open:
                poll.register(err, select.POLLIN)
            for fd, _ in poll.poll(left * 1000):
                chunk = os.read(fd, 1 << 16)
                if fd == err:
                    self._stderr = (self._stderr + chunk)[-_STDERR_TAIL:]
                    self._stderr_open = bool(chunk)
                elif not chunk:
                    raise self._died(watch)
                else:
                    self._pending += chunk
            if len(self._pending) > _MAX_ANSWER:
                raise ModelSourceError(DOWNLOAD_FAILED, f"{watch.uri}: the store's answer is "
                                       f"larger than {_MAX_ANSWER // 1024**2} MiB")
        line = bytes(self._pending[:end])
        del self._pending[:end + 1]
        self._scanned = 0
        return line

    def _died(self, watch: _Watch) -> ModelSourceError:
        code = self.process.wait()
        if refusal := watch.overrun():
            return refusal
        how = f"signal {-code}" if code < 0 else f"status {code}"
        said = self._stderr.decode("utf-8", "replace").strip().splitlines()
        last = f": {said[-1][:300]}" if said else ""
        return ModelSourceError(DOWNLOAD_FAILED, f"{watch.uri}: the download process ended "
                                                 f"({how}){last}")

    def stop(self) -> None:
        """End an idle worker: EOF on its requests, then the kill if it lingers."""
        _stop_all([self])

    def kill(self) -> None:
        if self.process.returncode is None:  # its process group is still its own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stderr):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()
        with contextlib.suppress(OSError):
            os.close(self._answers)


def _stop_all(workers: list[_Worker]) -> None:
    """EOF to every worker at once, then wait for them together; kill the ones that linger."""
    for worker in workers:
        with contextlib.suppress(OSError):
            if worker.process.stdin is not None:
                worker.process.stdin.close()
    deadline = time.monotonic() + 5
    for worker in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout=max(deadline - time.monotonic(), 0))
        worker.kill()


def _parse(line: bytes, uri: str) -> dict[str, Any]:
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise _malformed(uri)
    return answer


def _malformed(uri: str) -> ModelSourceError:
    return ModelSourceError(DOWNLOAD_FAILED, f"{uri}: the download process answered outside "
                                             "its protocol")


def _usage(root: Path, max_entries: int) -> tuple[int, int]:
    """Bytes written (each file's size, or its allocation when smaller: a sparse file counts
    what it holds) and entries under ``root``, links not followed; counting stops past
    ``max_entries``."""
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
                    used += min(info.st_size, info.st_blocks * 512)
    return used, entries


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0

"""A small pool of long-lived, rlimited processes that validate ONNX outputs for the broker.

Parsing hostile protobuf runs onnx's C++ (parser, checker, shape inference), which has had
out-of-bounds bugs (CVE-2024-27319, onnx issue #8275). In the broker a crash would end every
job and a runaway inference would hold a thread, so the broker never parses an ONNX output
itself: a validator process does, under RLIMIT_AS / RLIMIT_CPU / RLIMIT_CORE=0 / RLIMIT_NOFILE
and a wall-clock deadline, and a crash, hang or memory blow-up fails only that job.

Starting a process per job would cost a fresh interpreter plus ``import onnx`` (hundreds of
ms); here the processes are started with the broker, import onnx once, and serve
jobs one at a time over a pipe. A process is killed and replaced when it crashes, overruns,
refuses a model (a refused model may have corrupted it without crashing it), sends anything
unexpected, or has served ``max_jobs_per_process`` jobs.

Each validator gives up root, the network and new privileges before it imports onnx
(``confinement``); the broker opens the output itself (no symlink, one link, regular file,
under the cap) and hands the validator a read-only descriptor, not a path. That costs no copy
of the model in the broker's memory, and the validator needs no right to any path.

Nothing a validator sends back is unpickled: a JSON summary (parsed strictly and re-typed, see
``onnx_answer.interpret``) and then the canonical bytes as a bounded raw message, which the
broker hashes itself. Those canonical bytes, and only those, are what the caller receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from airlock_broker.errors import Reason, error
from airlock_broker.validation.confinement import Confinement, expected_confinement
from airlock_broker.validation.files import open_regular_file
from airlock_broker.validation.limits import GiB, OutputLimits
from airlock_broker.validation.onnx_answer import MAX_ANSWER_BYTES, interpret
from airlock_broker.validation.onnx_check import OnnxInfo, check_onnx_size
from airlock_broker.validation.onnx_worker import FD_MARK, READY

log = logging.getLogger(__name__)

#: The module a validator process runs. A seam: tests run one that crashes or hangs on demand.
WORKER_MODULE = "airlock_broker.validation.onnx_worker"


@dataclass(frozen=True)
class ValidatorSettings:
    """``[onnx_validator]``: the pool of ONNX validator processes. Checked when built."""

    #: Validator processes kept running; also how many ONNX validations run at once.
    processes: int = 2
    #: Wall clock for one validation, from request to the last byte of its answer.
    timeout_seconds: float = 60.0
    #: For a validator process to start (interpreter + ``import onnx``) and say it is ready.
    start_timeout_seconds: float = 60.0
    #: Address space a validator may map beyond what its imports mapped (a model is held
    #: several times at once: bytes, parsed message, canonical bytes, the checker's copy).
    memory_bytes: int = 4 * GiB
    #: CPU seconds for one validation (RLIMIT_CPU; SIGXCPU kills the process past it).
    cpu_seconds: int = 60
    #: A validator is replaced after this many jobs, even if all of them passed.
    max_jobs_per_process: int = 100

    def __post_init__(self) -> None:
        for name in ("timeout_seconds", "start_timeout_seconds"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not value > 0:
                raise ValueError(f"{name} must be positive")
        for name in ("processes", "memory_bytes", "cpu_seconds", "max_jobs_per_process"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.processes > 64:
            raise ValueError("processes must be at most 64")


class _Worker:
    """One validator process and the broker's end of its socket. Owned by the pool."""

    def __init__(self, module: str, config: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Its own argv and a minimal environment; no multiprocessing machinery (no
            # re-import of the broker's __main__, no resource tracker); the broker's import path
            # made absolute, since it runs in "/" ("" was the broker's cwd). It dies with the broker
            # (PDEATHSIG) and on EOF of the socket.
            self.process = subprocess.Popen(
                [sys.executable, "-B", "-m", module, str(theirs.fileno()), config],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                env={"PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path),
                     "PATH": os.defpath, "LC_ALL": "C.UTF-8"},
                cwd="/", start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # so that a dead child reads as EOF instead of a silent wait
        self.conn = Connection(ours.detach())
        #: ``reap`` may race (a failed job's thread and the pool's close): the socket's
        #: descriptor number must be closed exactly once.
        self._reaping = threading.Lock()
        self.ready = False
        self.jobs = 0
        #: Set when the worker must not serve another job.
        self.spent = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """Signal the process; safe from any thread, and again after it died."""
        with contextlib.suppress(OSError):
            if self.process.poll() is None:
                self.process.kill()

    def reap(self) -> None:
        """Kill, wait for, and release the process and the socket. Idempotent."""
        self.spent = True
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5.0)
        with self._reaping, contextlib.suppress(OSError):
            self.conn.close()


class OnnxValidatorPool:
    """Validates ONNX files in worker processes; ``start`` with the broker, ``close`` with it."""

    def __init__(self, limits: OutputLimits, settings: ValidatorSettings | None = None, *,
                 worker_module: str = WORKER_MODULE) -> None:
        self.limits = limits
        self.settings = settings or ValidatorSettings()
        limits_doc = asdict(limits)
        limits_doc["allowed_onnx_domains"] = sorted(limits.allowed_onnx_domains)
        self._config = json.dumps({"limits": limits_doc, "settings": asdict(self.settings),
                                   "parent": os.getpid()})
        self._module = worker_module
        #: One entry per slot: an idle worker, or None for a slot whose process must be
        #: started (its replacement failed to start; the next job that takes it tries again).
        self._idle: asyncio.Queue[_Worker | None] | None = None
        self._all: set[_Worker] = set()
        self._closed = False
        #: Workers started so far (for metrics and tests: replacements show up here).
        self.started = 0
        #: What each validator gives up (less when the broker is not root).
        self.confinement: Confinement = expected_confinement()

    def start(self) -> None:
        """Start every validator process; they import onnx in the background."""
        if self._idle is not None:
            raise RuntimeError("the validator pool is already started")
        self._idle = asyncio.Queue()
        if self.confinement.full:
            log.info("ONNX validators run confined: %s", self.confinement.describe())
        else:
            log.warning("ONNX validators run only partly confined, because the broker is not "
                        "root: %s", self.confinement.describe())
        for _ in range(self.settings.processes):
            self._idle.put_nowait(self._spawn())

    def _spawn(self) -> _Worker:
        worker = _Worker(self._module, self._config)
        self._all.add(worker)
        self.started += 1
        return worker

    def pids(self) -> list[int]:
        """Process ids of the validators alive now."""
        return [w.pid for w in self._all if not w.spent]

    async def validate(self, source: Path) -> tuple[bytes, OnnxInfo]:
        """Validate the ONNX file ``source``; its canonical bytes and summary.

        Raises ``OUTPUT_INVALID`` / ``OUTPUT_TOO_LARGE`` for a refused model, including one that
        crashes, exhausts or outlives its validator; ``INTERNAL`` if a validator cannot start.
        """
        if self._idle is None or self._closed:
            raise error(Reason.INTERNAL, "the ONNX validator pool is not running")
        slot = await self._idle.get()
        worker: _Worker | None = None
        try:
            worker = slot if slot is not None else self._respawn()
            job = asyncio.ensure_future(asyncio.to_thread(self._exchange, worker, source))
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                worker.spent = True
                worker.kill()  # the thread then sees EOF at once
                with contextlib.suppress(BaseException):
                    await job
                raise
        finally:
            self._give_back(worker)

    def _respawn(self) -> _Worker:
        try:
            return self._spawn()
        except OSError as exc:
            raise error(Reason.INTERNAL, f"cannot start an ONNX validator: {exc}") from exc

    def _give_back(self, worker: _Worker | None) -> None:
        """Return the slot to the queue, with a fresh process if this one is done."""
        assert self._idle is not None
        if worker is not None and (worker.spent
                                   or worker.jobs >= self.settings.max_jobs_per_process):
            worker.reap()
            self._all.discard(worker)
            worker = None
            if not self._closed:
                try:
                    worker = self._spawn()
                except OSError as exc:  # out of processes or memory: the next job retries
                    log.error("could not start a replacement ONNX validator: %s", exc)
        if self._closed and worker is not None:
            worker.reap()
            self._all.discard(worker)
            return
        self._idle.put_nowait(worker)

    def _exchange(self, worker: _Worker, source: Path) -> tuple[bytes, OnnxInfo]:
        """One request and answer, blocking (runs in a thread). Marks the worker spent unless
        it answered a passed validation exactly as the protocol says."""
        # A missing, linked, special or oversize file is refused here and costs no worker.
        handle, st = open_regular_file(source)
        with handle:
            check_onnx_size(st.st_size, self.limits)
            return self._exchange_fd(worker, handle.fileno())

    def _exchange_fd(self, worker: _Worker, fd: int) -> tuple[bytes, OnnxInfo]:
        healthy = False
        try:
            if not worker.ready:
                self._await_ready(worker)
            worker.jobs += 1
            deadline = time.monotonic() + self.settings.timeout_seconds
            worker.conn.send_bytes(json.dumps({"validate": True}).encode())
            _send_fd(worker.conn, fd)
            answer = _receive(worker, deadline, MAX_ANSWER_BYTES, self.settings)
            info = interpret(answer, _Exited(worker))
            canonical = _receive(worker, deadline, self.limits.max_onnx_bytes, self.settings)
            if not canonical:
                raise error(Reason.OUTPUT_INVALID, "ONNX validator sent no canonical model")
            healthy = True
            return canonical, info
        except (OSError, EOFError) as exc:  # the pipe broke under a write: it died
            raise error(Reason.OUTPUT_INVALID, f"ONNX validator died: {exc}") from None
        finally:
            if not healthy:
                worker.spent = True
                worker.kill()

    def _await_ready(self, worker: _Worker) -> None:
        timeout = self.settings.start_timeout_seconds
        try:
            if worker.conn.poll(timeout) and worker.conn.recv_bytes(16) == READY:
                worker.ready = True
                return
        except (OSError, EOFError):
            pass
        raise error(Reason.INTERNAL,
                    f"an ONNX validator process did not start within {timeout:g} s "
                    f"(exit code {worker.process.poll()})")

    async def close(self) -> None:
        """Kill every validator and wait for it; a validation in flight fails."""
        self._closed = True
        workers = list(self._all)
        self._all.clear()
        for worker in workers:
            worker.spent = True
            worker.kill()
        await asyncio.to_thread(_reap_all, workers)


def _send_fd(conn: Connection, fd: int) -> None:
    """Pass ``fd`` (a read-only descriptor of the file to validate) to the worker."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        socket.send_fds(sock, [FD_MARK], [fd])
    finally:
        sock.detach()  # the Connection owns the descriptor


def _reap_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.reap()


class _Exited:
    """What ``interpret`` asks of a process that may have died: its exit code."""

    def __init__(self, worker: _Worker) -> None:
        self._worker = worker

    def join(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._worker.process.wait(timeout)

    @property
    def exitcode(self) -> int | None:
        return self._worker.process.poll()


def _receive(worker: _Worker, deadline: float, limit: int,
             settings: ValidatorSettings) -> bytes | None:
    """The next message, or None if the process died first; refuses overlong or late ones."""
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not worker.conn.poll(remaining):
        worker.kill()
        raise error(Reason.OUTPUT_INVALID,
                    f"ONNX validation did not finish in {settings.timeout_seconds:g} s")
    try:
        return worker.conn.recv_bytes(limit)
    except EOFError:
        return None  # it died; its exit code says how
    except OSError:  # longer than ``limit``
        raise error(Reason.OUTPUT_INVALID, "ONNX validator answered too much") from None

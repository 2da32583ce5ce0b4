"""Single-use, confined processes that validate ONNX outputs for the broker.

Parsing hostile protobuf runs onnx's C++ (parser, checker, shape inference), which has had
out-of-bounds bugs (CVE-2024-27319, onnx issue #8275). In the broker a crash would end every
job and a runaway inference would hold a thread, so the broker never parses an ONNX output
itself: a validator process does, under RLIMIT_AS / RLIMIT_CPU / RLIMIT_CORE=0 / RLIMIT_NOFILE /
RLIMIT_NPROC, a seccomp filter and a wall-clock deadline, and a crash, hang or memory blow-up
fails only that job.

Each validator serves **one** validation and is then killed: a parser exploit that still
answers ``ok`` holds a process that no later job will use, so it cannot rewrite another
caller's canonical model (which is what gets signed). Starting an interpreter and importing
onnx per job would cost ~0.6 s, so the broker starts one *template* process that imports onnx,
confines itself (no network, an empty root, its own uid, ``confinement``) and forks a fresh
validator per request (``onnx_template``); ``processes`` forked validators are kept ready as
spares, and each one used is replaced in the background.

The broker opens the output itself (no symlink, one link, regular file, under the cap) and hands
the validator a read-only descriptor, not a path: the validator has no path to open. What a
validator writes on stderr reaches the broker through a pipe, bounded and escaped before it is
logged (``stderr_pipe``). Nothing it sends back is unpickled: a JSON summary (parsed strictly
and re-typed, see ``onnx_answer.interpret``) and then the canonical bytes as a bounded raw
message, which the broker writes a block at a time into a file of its own and hashes as it
writes (``onnx_canonical``): it never holds the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.validation.confinement import Confinement, expected_confinement
from airlock_broker.validation.files import open_regular_file
from airlock_broker.validation.limits import GiB, OutputLimits
from airlock_broker.validation.onnx_answer import MAX_ANSWER_BYTES, interpret
from airlock_broker.validation.onnx_canonical import (
    CanonicalOnnx,
    CanonicalWriter,
    Room,
)
from airlock_broker.validation.onnx_info import OnnxInfo, check_onnx_size
from airlock_broker.validation.onnx_messages import BadLength, Late, read_message, read_message_into
from airlock_broker.validation.onnx_processes import Template, Validator
from airlock_broker.validation.onnx_template import READY
from airlock_broker.validation.onnx_worker import FD_MARK

log = logging.getLogger(__name__)

#: The module the template process runs. A seam: tests run one that crashes or hangs on demand.
WORKER_MODULE = "airlock_broker.validation.onnx_worker"
#: The validators' uid and gid unless configured: no Debian account or group has them (the
#: 60000-64999 block is allocated by the distribution itself, and not to this number), and the
#: sandboxes run as 10001. The broker refuses to start if an account uses them.
VALIDATOR_ID = 64998
#: A fork in flight for one slot: a refill's (None if it failed) or a cancelled job's.
_SlotFork = asyncio.Future[Validator | None] | asyncio.Future[Validator]


@dataclass(frozen=True)
class ValidatorSettings:
    """``[onnx_validator]``: the ONNX validator processes. Checked when built."""

    #: Validators kept forked and ready; also how many ONNX validations run at once.
    processes: int = 2
    #: Wall clock for one validation, from request to the last byte of its answer.
    timeout_seconds: float = 60.0
    #: For the template to start (interpreter + ``import onnx``) and say it is ready.
    start_timeout_seconds: float = 60.0
    #: Address space a validator may map beyond what its imports mapped (a model is held
    #: several times at once: bytes, parsed message, canonical bytes, the checker's copy).
    memory_bytes: int = 4 * GiB
    #: CPU seconds for one validation (RLIMIT_CPU; SIGXCPU kills the process past it).
    cpu_seconds: int = 60
    #: The uid and gid validators (and their template) run as when the broker is root: ids of
    #: their own, used by no account, not 0, not the sandboxes' uid.
    uid: int = VALIDATOR_ID
    gid: int = VALIDATOR_ID
    #: What the broker keeps of one validator's stderr (the rest is counted, not kept).
    max_stderr_bytes: int = 8192

    def __post_init__(self) -> None:
        for name in ("timeout_seconds", "start_timeout_seconds"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not value > 0:
                raise ValueError(f"{name} must be positive")
        for name in ("processes", "memory_bytes", "cpu_seconds", "uid", "gid",
                     "max_stderr_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.processes > 64:
            raise ValueError("processes must be at most 64")
        if self.uid >= 2**32 - 1 or self.gid >= 2**32 - 1:
            raise ValueError("uid and gid must be below 4294967295")

    def check_ids_unused(self, sandbox_user: str = "") -> None:
        """``ValueError`` if an account or group on this host, or the sandboxes
        (``sandbox_user``, "UID:GID"), have the validators' ids: a validator would then share
        what they own and may signal."""
        uid_text, _, gid_text = sandbox_user.partition(":")
        # Numbers as numbers: the engine reads "064998" as 64998 (policy.root_in).
        if _number(uid_text) == self.uid or _number(gid_text) == self.gid:
            raise ValueError(f"[onnx_validator] uid/gid {self.uid}:{self.gid} are the "
                             f"sandboxes' ({sandbox_user}): give validators ids of their own")
        with contextlib.suppress(KeyError):
            name = pwd.getpwuid(self.uid).pw_name
            raise ValueError(f"[onnx_validator] uid = {self.uid} belongs to the account "
                             f"{name!r}: choose a uid no account uses")
        with contextlib.suppress(KeyError):
            name = grp.getgrgid(self.gid).gr_name
            raise ValueError(f"[onnx_validator] gid = {self.gid} belongs to the group "
                             f"{name!r}: choose a gid no group uses")


def _number(text: str) -> int | None:
    """``text`` as the integer the engine would read it as, or None for a name."""
    try:
        return int(text)
    except ValueError:
        return None


class OnnxValidatorPool:
    """Validates ONNX files in single-use processes; ``start`` with the broker, ``close``."""

    def __init__(self, limits: OutputLimits, settings: ValidatorSettings | None = None, *,
                 worker_module: str = WORKER_MODULE,
                 canonical_dir: Path | None = None) -> None:
        self.limits = limits
        self.settings = settings or ValidatorSettings()
        #: Where canonical models are written (the spool's disk in a broker; the system's
        #: temporary directory by default).
        self.canonical_dir = canonical_dir or Path(tempfile.gettempdir())
        limits_doc = asdict(limits)
        limits_doc["allowed_onnx_domains"] = sorted(limits.allowed_onnx_domains)
        self._config = json.dumps({"limits": limits_doc, "settings": asdict(self.settings),
                                   "parent": os.getpid()})
        self._module = worker_module
        #: One entry per slot: a ready validator, or None for a slot whose validator must be
        #: forked (its replacement failed; the next job that takes it tries again).
        self._idle: asyncio.Queue[Validator | None] | None = None
        self._template: Template | None = None
        self._template_lock = threading.Lock()
        #: Every validator not yet reaped (spares and busy ones).
        self._live: set[Validator] = set()
        #: Forks in flight for slots: refills, and those of cancelled jobs (``_refilled``).
        self._refills: set[_SlotFork] = set()
        self._closed = False
        #: Validators forked so far (for metrics and tests: one per validation, plus spares).
        self.started = 0
        #: Their pids, in order (tests check that none serves twice and none outlives us).
        self.forked: list[int] = []
        #: What each validator gives up (less when the broker is not root).
        self.confinement: Confinement = expected_confinement(self.settings.uid,
                                                             self.settings.gid)

    def start(self) -> None:
        """Start the template and fork the spares in the background."""
        if self._idle is not None:
            raise RuntimeError("the validator pool is already started")
        self._idle = asyncio.Queue()
        if self.confinement.full:
            log.info("ONNX validators run confined: %s", self.confinement.describe())
        else:
            log.warning("ONNX validators run only partly confined, because the broker is not "
                        "root: %s", self.confinement.describe())
        self._template = self._new_template()
        for _ in range(self.settings.processes):
            self._refill(None)

    def _new_template(self) -> Template:
        return Template(self._module, self._config, self.settings.max_stderr_bytes)

    def pids(self) -> list[int]:
        """Process ids of the validators alive now (spares and busy ones)."""
        return [v.pid for v in list(self._live) if not v.killed]

    def template_pid(self) -> int | None:
        return None if self._template is None else self._template.pid

    async def validate(self, source: Path,
                       room: Room | None = None) -> tuple[CanonicalOnnx, OnnxInfo]:
        """Validate the ONNX file ``source``; its canonical bytes (in a file the caller owns
        and must close) and summary. ``room``: the caller's claim on the spool, which the
        canonical bytes are drawn on (the caller releases it; None: not accounted).

        Raises ``OUTPUT_INVALID`` / ``OUTPUT_TOO_LARGE`` for a refused model, including one that
        crashes, exhausts or outlives its validator; ``INTERNAL`` if no validator can start;
        ``SPOOL_FULL`` if its canonical bytes do not fit on the spool.
        """
        if self._idle is None or self._closed:
            raise error(Reason.INTERNAL, "the ONNX validator pool is not running")
        validator = await self._idle.get()
        if validator is None:
            validator = await self._fork_for_empty_slot()
        try:
            job = asyncio.ensure_future(asyncio.to_thread(self._exchange, validator, source, room))
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                validator.kill()  # the thread then sees EOF at once
                with contextlib.suppress(BaseException):
                    canonical, _info = await job
                    canonical.close()  # it had finished: nobody will own it
                raise
        finally:
            self._refill(validator)  # used once, whatever happened

    async def _fork_for_empty_slot(self) -> Validator:
        """A validator for a slot that has none (its replacement failed), forked now.

        The slot is this call's until the fork returns. Cancelled meanwhile, the fork goes on
        in its thread: what it forks becomes the slot's spare (it has read nothing), as a
        refill's would, so that no validator is left without an owner until ``close``.
        """
        fork = asyncio.ensure_future(asyncio.to_thread(self._fork_or_fail))
        try:
            return await asyncio.shield(fork)
        except asyncio.CancelledError:
            self._refills.add(fork)
            fork.add_done_callback(self._refilled)
            raise
        except BaseException:
            self._refill(None)  # the slot stays; a background fork tries again
            raise

    def _refill(self, used: Validator | None) -> None:
        """Reap ``used`` and put a freshly forked validator in its slot, in the background."""
        refill = asyncio.ensure_future(asyncio.to_thread(self._replace, used))
        self._refills.add(refill)
        refill.add_done_callback(self._refilled)

    def _refilled(self, refill: _SlotFork) -> None:
        self._refills.discard(refill)
        fresh = None
        if not refill.cancelled():
            failed = refill.exception()  # only a slot's own fork raises (_replace logs)
            if failed is None:
                fresh = refill.result()
            elif not self._closed:
                log.error("could not start an ONNX validator: %s", failed)
        if self._closed or self._idle is None:
            if fresh is not None:
                fresh.kill()  # close() reaps everything in _live
            return
        self._idle.put_nowait(fresh)

    def _replace(self, used: Validator | None) -> Validator | None:
        if used is not None:
            used.reap()
            self._live.discard(used)
        if self._closed:
            return None
        try:
            return self._fork()
        except Exception as exc:  # OSError, ValueError, AirlockError from a template that died
            if not self._closed:  # closing kills a template still starting: nothing went wrong
                log.error("could not start an ONNX validator: %s", exc)  # the next job retries
        return None

    def _fork_or_fail(self) -> Validator:
        try:
            return self._fork()
        except (OSError, ValueError) as exc:
            raise error(Reason.INTERNAL, f"cannot start an ONNX validator: {exc}") from exc

    def _fork(self) -> Validator:
        """A fresh validator from the template (restarted first if it died). Blocking."""
        with self._template_lock:
            if self._closed:
                raise OSError("the ONNX validator pool is closed")
            template = self._template
            if template is None or not template.alive():
                if template is not None:
                    template.reap()
                    log.error("the ONNX validator template died (exit code %s); restarting it",
                              template.process.returncode)
                template = self._template = self._new_template()
            template.await_ready(self.settings.start_timeout_seconds)
            try:
                validator = template.spawn(self.settings.start_timeout_seconds,
                                           self.settings.max_stderr_bytes)
            except OSError:
                template.kill()  # a template that cannot fork is started afresh next time
                raise
            self._live.add(validator)
            self.started += 1
            self.forked.append(validator.pid)
            return validator

    def _exchange(self, validator: Validator, source: Path,
                  room: Room | None) -> tuple[CanonicalOnnx, OnnxInfo]:
        """One request and answer, blocking (runs in a thread)."""
        # A missing, linked, special or oversize file is refused here and costs no validator's
        # work (the validator is replaced all the same: it is single-use).
        handle, st = open_regular_file(source)
        with handle:
            check_onnx_size(st.st_size, self.limits)
            return self._exchange_fd(validator, handle.fileno(), room)

    def _exchange_fd(self, validator: Validator, fd: int,
                     room: Room | None) -> tuple[CanonicalOnnx, OnnxInfo]:
        deadline = time.monotonic() + self.settings.timeout_seconds
        canonical = CanonicalWriter(self.canonical_dir, room)
        try:
            hello = _receive(validator, deadline, 16, self.settings)
            if hello != READY:
                validator.join(1.0)
                raise error(Reason.INTERNAL,
                            f"an ONNX validator could not confine itself (exit code "
                            f"{validator.exitcode}; its stderr is in the broker's log)")
            validator.conn.send_bytes(json.dumps({"validate": True}).encode())
            _send_fd(validator.conn, fd)
            answer = _receive(validator, deadline, MAX_ANSWER_BYTES, self.settings)
            info = interpret(answer, validator)
            size = _receive_into(validator, deadline, self.limits.max_onnx_bytes,
                                 self.settings, canonical)
            if not size:
                raise error(Reason.OUTPUT_INVALID, "ONNX validator sent no canonical model")
            return canonical.finish(), info
        except (OSError, EOFError) as exc:  # the pipe broke under a write: it died
            raise error(Reason.OUTPUT_INVALID, f"ONNX validator died: {exc}") from None
        finally:
            canonical.close()
            validator.kill()

    async def close(self) -> None:
        """Kill every validator and the template and wait for them; work in flight fails."""
        self._closed = True
        validators = list(self._live)
        for validator in validators:
            validator.kill()
        # A refill may be waiting for the template to finish its imports (a second or more):
        # one still starting is killed, so that wait ends now instead of being waited out.
        if self._template is not None:
            self._template.kill_if_starting()
        if self._refills:
            await asyncio.wait(set(self._refills))
        validators = list(self._live | set(validators))
        self._live.clear()
        template, self._template = self._template, None
        await asyncio.to_thread(_reap_all, validators, template)


def _send_fd(conn: Connection, fd: int) -> None:
    """Pass ``fd`` (a read-only descriptor of the file to validate) to the worker."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        socket.send_fds(sock, [FD_MARK], [fd])
    finally:
        sock.detach()  # the Connection owns the descriptor


def _reap_all(validators: list[Validator], template: Template | None) -> None:
    for validator in validators:
        validator.reap()
    if template is not None:
        template.reap()


def _receive(worker: Validator, deadline: float, limit: int,
             settings: ValidatorSettings) -> bytes | None:
    """The next message, or None if the process died first (its exit code says how);
    refuses overlong or late ones. The deadline covers the message's last byte, not only its
    first: one that stops half-way is as late as one that never starts."""
    try:
        return read_message(worker.conn.fileno(), deadline, limit)
    except (Late, BadLength) as exc:
        raise _refusal(worker, settings, exc) from None


def _receive_into(worker: Validator, deadline: float, limit: int,
                  settings: ValidatorSettings, writer: CanonicalWriter) -> int | None:
    """``_receive``, its bytes written by ``writer`` as they come, never held whole; their
    count, or None as ``_receive`` says."""
    try:
        return read_message_into(worker.conn.fileno(), deadline, limit, writer.begin)
    except (Late, BadLength) as exc:
        raise _refusal(worker, settings, exc) from None


def _refusal(worker: Validator, settings: ValidatorSettings,
             exc: Late | BadLength) -> AirlockError:
    """A late message (its validator killed) or an overlong one, as the job's verdict."""
    if isinstance(exc, Late):
        worker.kill()
        return error(Reason.OUTPUT_INVALID,
                     f"ONNX validation did not finish in {settings.timeout_seconds:g} s "
                     f"({exc} by then)")
    return error(Reason.OUTPUT_INVALID, f"ONNX validator answered too much: {exc}")

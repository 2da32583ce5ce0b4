"""Idempotency keys: a retried Convert attaches to its first attempt instead of converting twice.

The client sends one key per logical call and the same key on every retry. The broker keys
its memory by (principal, key) and binds each key to what it was first used for: the input's
sha256 and the request's options. A request whose key matches

- a job still in flight waits for it, then answers with its result;
- a job completed within ``ttl_seconds`` gets that job's result (or its refusal) again,
  without a sandbox, marked ``replayed``;
- either of those, but for a different artifact or different options, is refused with
  IDEMPOTENCY_KEY_REUSED.

A job that failed for a reason worth retrying (BUSY, the engine down, a cancelled call) is
forgotten, so the retry converts. Only metadata lives in memory: a stored result's bytes are
a file under ``<spool>/results/`` (0600): the very file its first answer was sent from
(answers.py writes it; ``Claim.store`` hands it to this store, which owns it from then on).
The total is bounded by ``max_bytes`` and the entries by ``max_entries``, evicted oldest first
and on expiry. A reader holds an open descriptor, so eviction never cuts a replay short. The
directory is emptied at start-up (``workspace.reap_stale``) and the store's files on ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from airlock_broker.conversion.input_digest import InputDigest
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.sandboxes.workspace import remove_soon
from airlock_broker.security.state_dirs import open_private_file

log = logging.getLogger(__name__)

#: Failures that say nothing about the artifact: a retry must be allowed to convert again.
FORGOTTEN_REASONS = frozenset({
    Reason.BUSY, Reason.DEADLINE_EXCEEDED, Reason.CANCELLED, Reason.SANDBOX_UNAVAILABLE,
    Reason.SANDBOX_KILLED, Reason.INTERNAL, Reason.IDEMPOTENCY_KEY_REUSED,
    # The broker's disk or the caller's: the moment's, not the artifact's.
    Reason.SPOOL_FULL, Reason.LOCAL_WRITE_FAILED,
    # The caller's deadline (not among the key's options) and the machine's load as much as
    # the artifact: a retry that asks for more time must get it.
    Reason.SANDBOX_TIMEOUT,
})


@dataclass(frozen=True)
class IdempotencySettings:
    """``ttl_seconds = 0`` turns de-duplication off (every request converts)."""

    ttl_seconds: float = 600.0
    max_entries: int = 1024
    #: Bytes of stored results on disk; a result larger than this is not kept.
    max_bytes: int = 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.ttl_seconds < 0 or self.max_entries < 1 or self.max_bytes < 0:
            raise ValueError("need ttl_seconds >= 0, max_entries >= 1, max_bytes >= 0")


@dataclass(frozen=True)
class StoredResult:
    """A completed job's answer: its result header (opaque bytes) and output, or its refusal."""

    job_id: str
    header: bytes = b""
    path: Path | None = None
    size: int = 0
    error: tuple[Reason, str] | None = None
    #: Done once ``path`` is written, when the store writes it (``Claim.store``'s ``write``).
    written: asyncio.Future[None] | None = None

    @property
    def pending(self) -> bool:
        """Its file is still being written: a replay must wait for it."""
        return self.written is not None and not self.written.done()


@dataclass
class _Entry:
    #: The first attempt's input, perhaps still being hashed while it converts.
    input: InputDigest
    options: str
    job_id: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stored: StoredResult | None = None
    expires: float = 0.0


@dataclass
class Claim:
    """What a request got from the store: a stored result to replay, or the duty to convert
    (and to offer its result to the store: ``store``)."""

    stored: StoredResult | None
    _store: IdempotencyStore | None = None
    _entry: _Entry | None = None
    waited: bool = False

    @property
    def writing(self) -> asyncio.Future[None] | None:
        """The stored result's file being written by the store (``store``'s ``write``), until
        it is: whoever accounts for the file's room holds it until then."""
        stored = None if self._entry is None else self._entry.stored
        if stored is None or not stored.pending:
            return None
        return stored.written

    @property
    def stores(self) -> bool:
        """Whether this request's result will be stored (it has a key and converts)."""
        return self._entry is not None

    def would_store(self, size: int) -> bool:
        """Whether a result of ``size`` bytes will be stored (``store``): it has a key, it
        converts, and it is within the store's ``max_bytes``."""
        return self._store is not None and self._entry is not None \
            and size <= self._store.settings.max_bytes

    def store(self, header: bytes, path: Path, size: int, *,
              write: Callable[[], None] | None = None) -> bool:
        """Make the result replayable, from ``path`` (a file of ``size`` bytes in the store's
        directory). True: the store owns the file from now on. False (no key, or larger than
        the store): it stays the caller's, and a retry converts again.

        ``write``: the file is not there yet; the store makes it by calling ``write`` on a
        worker thread (the copy of an answer already delivered, fastpath/). A retry meanwhile
        waits for it; if it fails, the result is forgotten and a retry converts again."""
        if self._store is None or self._entry is None:
            return False
        if not self.would_store(size):
            log.info("job %s: output of %d bytes is over the idempotency store's %d; a retry "
                     "will convert again", self._entry.job_id, size,
                     self._store.settings.max_bytes)
            return False
        self._store.complete(self._entry, StoredResult(job_id=self._entry.job_id,
                                                       header=header, path=path, size=size),
                             write=write)
        return True


async def _waiting(store: IdempotencyStore, wait: Awaitable[object]) -> None:
    """``wait``, counted in ``store.waiting``."""
    store.waiting += 1
    try:
        await wait
    finally:
        store.waiting -= 1


def options_digest(*parts: object) -> str:
    """A digest of the request options a key is bound to (target, policy, inputs, ...)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _reused(principal: str, job_id: str, *, same_input: bool) -> str:
    """Why a key is refused. A principal's keys are its own, so it is told which job used it
    and what differs; unauthenticated callers ("") share one key space, so they are told
    neither: another caller's job id, nor whether a guessed artifact is the one it sent."""
    if not principal:
        return ("idempotency key already used with a different artifact or different "
                "options (unauthenticated callers share one key space: nothing more is said "
                "of that call); use a new key per call")
    if not same_input:
        return (f"idempotency key already used for job {job_id} with a different artifact "
                "(sha256 differs); use a new key per call")
    return (f"idempotency key already used for job {job_id} with the same artifact but "
            "different options; use a new key per call")


class IdempotencyStore:
    def __init__(self, spool_root: Path, settings: IdempotencySettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.spool_root = spool_root
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._bytes = 0
        #: Removals of evicted answers' files, and writes of stored ones, under way.
        self._removing: set[asyncio.Future[None]] = set()
        #: Requests waiting for a first attempt still in flight (for status and tests).
        self.waiting = 0
        self._purger: asyncio.Task[None] | None = None

    @property
    def stored_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def start(self) -> None:
        if self.settings.ttl_seconds > 0:
            self._purger = asyncio.create_task(self._purge_forever(), name="idempotency-purge")

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        for key in list(self._entries):
            self._drop(key)
        await self.settle()

    async def settle(self) -> None:
        """Wait until the files of stored entries are written and those of dropped entries
        removed (on worker threads)."""
        while self._removing:  # not gather: cancelling this wait must not cancel them
            await asyncio.wait(set(self._removing))

    @contextlib.asynccontextmanager
    async def claim(self, principal: str, key: str, input_digest: InputDigest, options: str,
                    job_id: str) -> AsyncIterator[Claim]:
        """Replay, wait for, or take on the job for ``key``; see the module docstring.
        ``input_digest`` is awaited only when the key was seen before."""
        if not key or self.settings.ttl_seconds <= 0:
            yield Claim(stored=None)
            return
        ident = (principal, key)
        waited = False
        while True:
            self.purge()
            entry = self._entries.get(ident)
            if entry is None:
                break
            # Both hashes may still be running (the fast path's, input_digest.py).
            theirs = await entry.input.settled()
            mine = await input_digest.value()
            if self._entries.get(ident) is not entry:
                continue  # it was forgotten meanwhile
            if theirs is None:  # its attempt gave its hash up: it is ending, unstored
                if entry.stored is not None:  # its refusal, then its hash failed: forgotten
                    self._drop(ident)
                    continue
                waited = True
                await _waiting(self, entry.done.wait())
                continue
            if theirs != mine or entry.options != options:
                raise error(Reason.IDEMPOTENCY_KEY_REUSED,
                            _reused(principal, entry.job_id, same_input=theirs == mine))
            if entry.stored is not None and entry.stored.pending:
                waited = True  # its file is being written; if that fails, it is forgotten
                assert entry.stored.written is not None
                await _waiting(self, asyncio.wait({entry.stored.written}))
                continue
            if entry.stored is not None:
                yield self._replayed(entry.stored, waited)
                return
            waited = True
            await _waiting(self, entry.done.wait())  # the first attempt is converting
        entry = _Entry(input=input_digest, options=options, job_id=job_id)
        self._entries[ident] = entry
        self._evict(keep=entry)
        claim = Claim(stored=None, _store=self, _entry=entry)
        try:
            yield claim
        except AirlockError as exc:
            if exc.reason not in FORGOTTEN_REASONS and entry.stored is None:
                self.complete(entry, StoredResult(job_id=entry.job_id,
                                                   error=(exc.reason, exc.message)))
            raise
        finally:
            if entry.stored is None and self._entries.get(ident) is entry:
                del self._entries[ident]  # nothing to replay: a retry converts again
            entry.done.set()

    @staticmethod
    def open_stored(stored: StoredResult) -> int:
        """An open descriptor on a stored output: it survives the entry's eviction."""
        assert stored.path is not None
        return open_private_file(stored.path, os.O_RDONLY)  # no link, the broker's file

    def purge(self) -> int:
        """Forget completed entries past their TTL and delete their files."""
        now = self._clock()
        expired = [k for k, e in self._entries.items() if e.stored is not None and e.expires <= now]
        for key in expired:
            self._drop(key)
        return len(expired)

    # -- internals -------------------------------------------------------------------------

    def _replayed(self, stored: StoredResult, waited: bool) -> Claim:
        if stored.error is not None:
            reason, message = stored.error
            raise error(reason, f"{message} (the answer of job {stored.job_id}, replayed for "
                                "the same idempotency key)")
        return Claim(stored=stored, waited=waited)

    def complete(self, entry: _Entry, stored: StoredResult, *,
                 write: Callable[[], None] | None = None) -> None:
        if write is not None:
            written = asyncio.ensure_future(asyncio.to_thread(write))
            self._removing.add(written)
            written.add_done_callback(self._removing.discard)
            written.add_done_callback(functools.partial(self._written, entry))
            stored = dataclasses.replace(stored, written=written)
        entry.stored = stored
        entry.expires = self._clock() + self.settings.ttl_seconds
        self._bytes += stored.size
        entry.done.set()
        self._evict(keep=entry)

    def _evict(self, keep: _Entry | None = None) -> None:
        """Until within ``max_entries`` and ``max_bytes``: the oldest completed entry of the
        principal whose completed entries hold the most (bytes while over ``max_bytes``, else
        entries), so that one principal's answers cannot push out every other's. Entries in
        flight are never evicted; admission bounds how many there can be."""
        while len(self._entries) > self.settings.max_entries \
                or self._bytes > self.settings.max_bytes:
            by_bytes = self._bytes > self.settings.max_bytes
            held: dict[str, int] = {}
            oldest: dict[str, tuple[str, str]] = {}
            for ident, entry in self._entries.items():
                if entry is keep or entry.stored is None:
                    continue
                held[ident[0]] = held.get(ident[0], 0) + (entry.stored.size if by_bytes else 1)
                oldest.setdefault(ident[0], ident)
            if not held:
                return
            self._drop(oldest[max(held, key=held.__getitem__)])  # ties: the oldest entry's

    def _written(self, entry: _Entry, written: asyncio.Future[None]) -> None:
        """A stored file's write ended: if it failed (or was cancelled, at shutdown), the
        entry is forgotten."""
        if not written.cancelled() and written.exception() is None:
            return
        why = "cancelled" if written.cancelled() else written.exception()
        log.warning("job %s: its answer could not be kept for retries (%s); a retry will "
                    "convert again", entry.job_id, why)
        for ident, known in list(self._entries.items()):
            if known is entry:
                self._drop(ident)

    def _drop(self, ident: tuple[str, str]) -> None:
        entry = self._entries.pop(ident)
        stored = entry.stored
        if stored is not None:
            if stored.pending:  # removed once written (a thread cannot be stopped)
                assert stored.written is not None
                stored.written.add_done_callback(lambda _: self._remove(stored))
            else:
                self._remove(stored)
        entry.done.set()

    def _remove(self, stored: StoredResult) -> None:
        """Its file goes, and only now leaves ``stored_bytes``: one still being written
        counts against ``max_bytes`` until then."""
        self._bytes -= stored.size
        if stored.path is not None:
            removing = remove_soon(stored.path)  # may be GiB: off the loop
            if removing is not None:
                self._removing.add(removing)
                removing.add_done_callback(self._removing.discard)

    async def _purge_forever(self) -> None:
        period = min(30.0, max(1.0, self.settings.ttl_seconds / 4))
        while True:
            await asyncio.sleep(period)
            self.purge()

"""The same-host fast path as a conversion's ``Transfer`` (conversion/answers.py): the artifact
comes from the caller's input descriptor, the answer goes into its output descriptor, and only
the result header travels on the gRPC stream."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.conversion.answers import Answer
from airlock_broker.conversion.file_copy import copy_file, write_at
from airlock_broker.conversion.intake import IntakeLimits, Spooled
from airlock_broker.conversion.outputs import COMMIT_BYTES, ValidatedOutput
from airlock_broker.errors import AirlockError
from airlock_broker.fastpath.local_handles import LocalFiles
from airlock_broker.fastpath.local_io import spool_from_peer, write_to_peer
from airlock_broker.fastpath.local_transfer import LocalTransferServer
from airlock_broker.tracing import NO_TRACE, Trace

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PeerTransfer:
    """One call's descriptors, owned: ``close`` once (after the answer that used them)."""

    files: LocalFiles
    limits: IntakeLimits
    trace: Trace = NO_TRACE

    @property
    def name(self) -> str:
        return "local"

    @property
    def peer(self) -> Mapping[str, int]:
        cred = self.files.peer
        return {"pid": cred.pid, "uid": cred.uid, "gid": cred.gid}

    async def receive(self, fd: int, meta: pb.ConvertMetadata, *,
                      in_ram: bool = False, owner: str = "") -> Spooled:
        # No Chunk follows the metadata: the input comes from the descriptor.
        return await spool_from_peer(self.files, fd, meta, self.limits, in_ram=in_ram,
                                     owner=owner)

    async def deliver(self, output: ValidatedOutput, *, pending: bool = False) -> bool:
        """A fresh output into the caller's own file, from the dead sandbox's tmpfs (within
        the time ``write_to_peer`` allows for its size). The job's run slot is held
        meanwhile: at most that time, as a job's deadline would hold it, and a local file
        does not read at a remote caller's pace. ``pending``: its first bytes are zeroed
        after the copy, on the copy's own thread, so that whenever that thread ends they
        are zero until ``commit`` (outputs.Delivery)."""
        write = functools.partial(_pending, output.write_into) if pending else output.write_into
        with self.trace.span("peer_write"):
            await write_to_peer(self.files, write, output.size, self.limits)
        return True

    async def commit(self, output: ValidatedOutput) -> None:
        head = output.head()
        await write_to_peer(self.files, functools.partial(write_at, head, 0), len(head),
                            self.limits)

    async def retract(self) -> None:
        """The caller's file emptied (its output failed the integrity comparison), after the
        copy: the client never renames it into place, and it holds nothing of the refused
        output. Best effort when the copy was given up (the caller's filesystem stopped
        answering: its thread may still write after this), or no thread is free; what then
        stays is still pending (its header length zero: no loader takes it), and the client
        removes its temp file on any error anyway."""
        try:
            await write_to_peer(self.files, lambda out: os.ftruncate(out, 0), 0, self.limits)
        except AirlockError as exc:
            log.warning("could not empty the caller's file after a refused output: %s", exc)

    async def send(self, answer: Answer) -> AsyncIterator[pb.ConvertResponse]:
        """The output into the caller's own file unless it is there already (a stored answer
        is copied from the store's file, within the time ``write_to_peer`` allows for its
        size), then the header alone."""
        size = answer.size
        if not answer.delivered:
            assert answer.fd is not None  # never delivered: its copy is kept
            with self.trace.span("peer_write"):
                await write_to_peer(self.files, lambda out, src: copy_file(src, out, size),
                                    size, self.limits, answer.fd)
        yield pb.ConvertResponse(result=answer.result)

    def close(self) -> None:
        self.files.close()


@dataclass(frozen=True)
class FastPathTickets:
    """The fast path as the pipeline asks for it: the descriptors a ticket holds, claimed by
    the principal it was issued to (local_handles.py), as a ``PeerTransfer``."""

    server: LocalTransferServer
    limits: IntakeLimits
    trace: Trace = NO_TRACE

    def claim(self, ticket: str, principal: str) -> PeerTransfer:
        return PeerTransfer(self.server.claim(ticket, principal), self.limits, self.trace)


def _pending(write_into: Callable[[int], None], out: int) -> None:
    """``write_into(out)``, then its first ``COMMIT_BYTES`` zeroed."""
    write_into(out)
    write_at(bytes(COMMIT_BYTES), 0, out)

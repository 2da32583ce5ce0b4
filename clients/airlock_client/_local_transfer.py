"""The same-host fast path, client side: hand the broker descriptors instead of bytes.

On one machine, streaming 400 MB through gRPC twice costs more than the conversion itself.
Here the client gets a ticket (``OpenLocalTransfer``, over the authenticated channel), passes
its input opened read-only and a fresh temp output file (``SCM_RIGHTS``) on the socket the
broker named, and calls Convert with the ticket and no chunks. The broker reads the input,
converts and validates as always, writes the validated output into the temp file and answers
with the result header alone. The client checks the signed provenance and renames, as on the
streaming path.

Anything that fails *before the job starts* (not offered, socket missing or untrusted,
permission, ticket refused) raises ``LocalTransferUnavailable``: the caller streams instead
and logs why. Failures after that are the job's own and are raised as usual.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from airlock.v1 import airlock_pb2 as pb
from airlock_client import _channel, _part_files, _signed_answer, _wire
from airlock_client._errors import AirlockError, IntegrityError
from airlock_client._types import ConversionResult
from airlock_client.provenance import check_output

_MAX_REPLY = 4096
#: Refusals of the ticket that happen before any job starts: streaming is the answer.
_BEFORE_JOB = frozenset({"LOCAL_TRANSFER_DISABLED", "LOCAL_HANDLE_INVALID", "UNIMPLEMENTED"})

Metadata = tuple[tuple[str, str], ...]


class LocalTransferUnavailable(Exception):
    """Why the fast path was not used (the client streams instead). ``not_offered``: the
    broker does not have it at all (no need to ask again)."""

    def __init__(self, message: str, *, not_offered: bool = False) -> None:
        super().__init__(message)
        self.not_offered = not_offered


def open_ticket(stub: Any, metadata: Metadata, timeout: float) -> pb.OpenLocalTransferResponse:
    try:
        reply: pb.OpenLocalTransferResponse = stub.OpenLocalTransfer(
            pb.OpenLocalTransferRequest(), timeout=min(timeout, 30.0), metadata=metadata)
    except grpc.RpcError as exc:
        err = _wire.error_from_rpc(exc)
        reason = getattr(err, "reason", "")
        raise LocalTransferUnavailable(
            f"no ticket: {err}",
            not_offered=reason in ("LOCAL_TRANSFER_DISABLED", "UNIMPLEMENTED")) from None
    return reply


def check_socket(path: Path) -> None:
    """The socket must be one that only root, this user or the broker's uid could have put
    there, by the rule the broker's own socket is held to (``_channel.check_socket``: the
    socket and every directory on its real path): otherwise someone else could receive our
    files. Only its directory was checked before: a directory of root's in one anyone could
    write passed."""
    try:
        _channel.check_socket(Path(os.path.realpath(path)), _channel.trusted_owners())
    except (_channel.UntrustedSocket, ValueError) as exc:
        raise LocalTransferUnavailable(f"socket {path}: {exc}") from None
    except OSError as exc:
        raise LocalTransferUnavailable(f"socket {path}: {exc.strerror}") from None


def hand_over(path: Path, ticket: str, input_fd: int, output_fd: int, timeout: float) -> None:
    """Attach the two descriptors to ``ticket`` on the broker's socket."""
    check_socket(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            # The ticket alone first: the broker takes descriptors only on a connection
            # whose ticket is live (it answers {"ready": true}), then the two of them. A
            # broker that refuses (BUSY) may have answered and hung up already: its reply,
            # still queued, says why.
            with contextlib.suppress(BrokenPipeError):
                sock.send(ticket.encode())
            _answer(read_reply(sock), "ready")
            with contextlib.suppress(BrokenPipeError):
                socket.send_fds(sock, [b"descriptors"], [input_fd, output_fd])
            _answer(read_reply(sock), "ok")
    except OSError as exc:
        raise LocalTransferUnavailable(f"socket {path}: {exc}") from None


def _answer(raw: bytes, step: str) -> None:
    """Nothing if the broker's reply says ``step`` is true; why not otherwise."""
    try:
        reply = json.loads(raw)
    except ValueError:
        raise LocalTransferUnavailable("the broker's socket answered garbage") from None
    if not isinstance(reply, dict) or reply.get(step) is not True:
        reason = reply.get("reason") if isinstance(reply, dict) else None
        message = reply.get("message") if isinstance(reply, dict) else None
        raise LocalTransferUnavailable(f"descriptors refused: {reason}: {message}")


def read_reply(sock: socket.socket) -> bytes:
    """The broker's one reply. If it hung up with our request unread (it refused before
    reading it), the kernel reports ECONNRESET first and the queued reply after."""
    try:
        return sock.recv(_MAX_REPLY)
    except ConnectionResetError:
        return sock.recv(_MAX_REPLY)


def convert_local(stub: Any, metadata: Metadata, in_fd: int, output: Path,
                  first: pb.ConvertRequest, size: int,
                  progress: Callable[[int, int], None] | None, timeout: float, key: Any,
                  key_source: str) -> ConversionResult:
    """Convert via the fast path; ``LocalTransferUnavailable`` if it cannot start. ``in_fd``:
    the input, a regular file the caller opened (and closes).

    The output is *not* hashed again here, by choice: its bytes never crossed a network or
    left the kernel. The broker wrote them, after validation, from the very file whose sha256
    it signed in the provenance (verified below, so the header's hash and size are the
    signed ones), into a 0600 temp file this client created and only this user (or root)
    can write. The file's size must be the signed size, which catches a short or missing
    write. A second pass would only re-check the broker's own copy, and a broker that lied
    about its copy could as well sign a lie; it was tried (2026-12-07) and cost S3 half a
    second, 0.80 s against 1.32 s end to end for 400 MiB (2.33x against 3.58x its in-process
    baseline, one run each). Whoever wants the bytes checked again has ``airlock verify``,
    which hashes the placed file against its record. (The streaming path does hash what it
    receives: those bytes crossed a channel.)

    The input is not hashed here either: the broker read it from the descriptor and the
    provenance records the sha256 of what it read and converted.
    """
    ticket = open_ticket(stub, metadata, timeout)
    output.parent.mkdir(parents=True, exist_ok=True)
    out_fd = -1
    part: _part_files.Part | None = None
    try:
        part = _part_files.new_file(output)
        out_fd = part.fd
        hand_over(Path(ticket.socket_path), ticket.ticket, in_fd, out_fd,
                  timeout=min(timeout, 10.0))
        request = pb.ConvertRequest()
        request.CopyFrom(first)
        request.metadata.local_handle = ticket.ticket
        try:
            header = _header(stub.Convert(iter([request]), timeout=timeout, metadata=metadata))
        except grpc.RpcError as exc:
            err = _wire.error_from_rpc(exc)
            if getattr(err, "reason", "") in _BEFORE_JOB:
                raise LocalTransferUnavailable(f"ticket refused: {err}") from None
            raise err from None
        if progress is not None:
            progress(size, size)
        record = _signed_answer.signed_record(header, first.metadata, key)
        written = os.fstat(out_fd).st_size
        check_output(record, sha256=header.output_sha256, size=written)
        if written != header.output_size:
            raise IntegrityError("the output file's size is not the one announced")
        part.place_file(output)
    finally:
        if out_fd >= 0:
            os.close(out_fd)
        if part is not None:
            part.remove()  # unless it was put in place
            part.release()
    return _signed_answer.result(header, record, output, key_source)


def _header(responses: Any) -> pb.ConvertResult:
    """The result header, which must be the only message and say the output is written."""
    first = next(responses, None)
    if first is None or first.WhichOneof("payload") != "result":
        raise AirlockError("the broker's response did not start with a result")
    if first.result.transfer != "local":
        raise IntegrityError("the broker did not write the output into the local file")
    with contextlib.suppress(StopIteration):
        next(responses)
        raise IntegrityError("unexpected message after a local transfer's result")
    result: pb.ConvertResult = first.result
    return result

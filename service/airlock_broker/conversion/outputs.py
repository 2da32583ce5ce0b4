"""Turning what a dead sandbox left in its output tmpfs into a validated, canonical output."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from airlock_broker.conversion.file_copy import (
    BLOCK_BYTES,
    copy_file,
    copy_identical,
    open_identical,
    open_validated,
    write_canonical_from,
    write_canonical_safetensors,
)
from airlock_broker.errors import Reason, error
from airlock_broker.validation.files import collect_output, open_regular_file
from airlock_broker.validation.limits import OutputLimits
from airlock_broker.validation.onnx_canonical import CanonicalOnnx, Room
from airlock_broker.validation.onnx_pool import OnnxValidatorPool
from airlock_broker.validation.safetensors_canonical import (
    FileIdentity,
    SafetensorsInfo,
    same_canonical,
    with_digest,
)
from airlock_broker.validation.safetensors_check import validate_safetensors
from airlock_sandbox.contract import MODEL_OUTPUTS, OUTPUT_NAMES, OutputFormat, Target
from airlock_sandbox.data_files import MAX_DATA_BYTES, EncodingCheck
from airlock_sandbox.formats import ArtifactFormat

#: What a delivery still under check leaves zero (``Delivery.deliver``): a safetensors file's
#: header length, without which no loader takes the file.
COMMIT_BYTES = 8


@dataclass(frozen=True)
class ValidatedOutput:
    """A validated output in canonical form, ``size`` bytes (``write_into``)."""

    format: OutputFormat
    size: int
    sha256: str
    path: Path
    #: Makes the same ``size`` bytes the whole content of a file descriptor: explicit
    #: offsets, by kernel copy where it can (blocking: a worker thread). Makes the answer's
    #: file (answers.py), which the caller, the fast path and idempotent retries are served from.
    write_into: Callable[[int], None]
    #: The validator's findings for a safetensors output (None for ONNX and data files).
    safetensors: SafetensorsInfo | None = None
    #: A data file's output as validated (it is copied from its file, never held).
    identity: FileIdentity | None = None
    #: An ONNX output's canonical bytes, in a file of the broker's alone (never in its
    #: memory): whoever validated the output closes it (``close``) once it is answered.
    onnx: CanonicalOnnx | None = None

    def close(self) -> None:
        """Frees what only this output holds (an ONNX output's file); ``pin`` first for a
        copy after it. Once, by the job that validated it (jobs.py), after its answer."""
        if self.onnx is not None:
            self.onnx.close()

    def head(self) -> bytes:
        """Its first ``COMMIT_BYTES``: a safetensors output's header length (what a pending
        delivery writes last)."""
        assert self.safetensors is not None, "only a safetensors output is delivered pending"
        return self.safetensors.canonical_header[:COMMIT_BYTES]

    def pin(self) -> PinnedOutput:
        """The output held open from now on (the file validation described), so that it can
        be copied after its slot is destroyed: a lazy unmount leaves open files readable.
        An ONNX output's file is held by a descriptor of its own, past its job's ``close``."""
        if self.identity is not None:  # a data file
            held = open_identical(self.path, self.identity)
            return PinnedOutput(self.size, lambda fd: copy_file(held.fileno(), fd, self.size),
                                held.close)
        if self.onnx is not None:
            canonical = self.onnx.dup()
            return PinnedOutput(self.size, lambda fd: _copy_canonical(canonical, fd),
                                canonical.close)
        info = self.safetensors
        if info is None:  # its write_into holds what it writes (a test's, a stand-in's)
            return PinnedOutput(self.size, self.write_into)
        handle = open_validated(self.path, info)
        return PinnedOutput(self.size, lambda fd: write_canonical_from(handle, info, fd),
                            handle.close)


@dataclass(frozen=True)
class PinnedOutput:
    """``ValidatedOutput.pin``: ``write_into`` as long as it is not closed; ``close`` once."""

    size: int
    write_into: Callable[[int], None]
    close: Callable[[], None] = lambda: None


class Delivery(Protocol):
    """Where a validated output can go before its answer (the same-host fast path's caller's
    file), even before its integrity comparison ends, and be taken back from if that fails.
    answers.Transfer is one."""

    async def deliver(self, output: ValidatedOutput, *, pending: bool = False) -> bool:
        """Put a fresh output where it goes, now; True if it did (the answer then carries the
        header alone), False if the output can only travel with the answer. ``pending``: a
        check of it still runs (integrity.py): its first ``COMMIT_BYTES`` are left zero, and
        what is there is no safetensors file until ``commit``, even where a ``retract``
        failed or came before a copy its watchdog gave up on had finished."""
        ...

    async def commit(self, output: ValidatedOutput) -> None:
        """The first bytes a pending ``deliver`` left zero: the check passed."""
        ...

    async def retract(self) -> None:
        """Empty what ``deliver`` wrote: its output failed a check that ran meanwhile
        (integrity.py's ``assurance_delivering``). Logs, never raises."""
        ...


def expected_format(out_dir: Path, target: Target) -> OutputFormat:
    """The output the broker will accept: the requested one, or for AUTO whichever exists."""
    if target is Target.ONNX:
        return OutputFormat.ONNX
    if target is Target.SAFETENSORS:
        return OutputFormat.SAFETENSORS
    if target is Target.DATA:
        return OutputFormat.DATA
    # lexists: a link the sandbox left is an entry, never followed (on the host, as root).
    present = [fmt for fmt in MODEL_OUTPUTS if os.path.lexists(out_dir / OUTPUT_NAMES[fmt])]
    if len(present) != 1:
        raise error(Reason.OUTPUT_INVALID,
                    "the sandbox exited 0 but left no single model file "
                    f"(found {len(present)} candidates)")
    return present[0]


async def validate_output(out_dir: Path, target: Target, limits: OutputLimits,
                          onnx_validator: OnnxValidatorPool, *,
                          digest: bool = True,
                          kind: ArtifactFormat | None = None,
                          spool: Room | None = None) -> ValidatedOutput:
    """Collect the single output file and validate it as hostile data (DESIGN §1.5).

    An ONNX output is parsed only by ``onnx_validator``'s processes, never in the broker;
    the canonical bytes they send back are what the caller receives, hashed as they come and
    kept in a file of the broker's (``onnx_canonical``), never in its memory: the caller owns
    it and must ``close`` the output once it is answered. ``spool``: the job's claim on the
    spool those bytes are drawn on (``OutputRoom.canonical``; None: not accounted).
    ``digest=False`` leaves a safetensors output's sha256 empty: the caller must then give it
    one (:func:`with_sha256` or :func:`compute_digest`) before anyone sees the output.
    A data file's output (``Target.DATA``; ``kind``: its declared format) is hashed and
    checked a block at a time, at most ``MAX_DATA_BYTES``, never held: the caller must then
    find it to be the input (jobs.py).
    """
    fmt = expected_format(out_dir, target)
    path = collect_output(out_dir, OUTPUT_NAMES[fmt], limits)
    if fmt is OutputFormat.DATA:
        assert kind is not None, "a data file's output is checked as its kind"
        return await asyncio.to_thread(_data_output, path, kind)
    if fmt is OutputFormat.SAFETENSORS:
        # Reads the header and hashes the data section: off the event loop.
        info = await asyncio.to_thread(validate_safetensors, path, limits, digest=digest)
        return ValidatedOutput(format=fmt, size=info.canonical_size,
                               sha256=info.canonical_sha256, path=path,
                               write_into=lambda fd: write_canonical_safetensors(path, info, fd),
                               safetensors=info)
    canonical, _info = await onnx_validator.validate(path, spool)
    return ValidatedOutput(format=fmt, size=canonical.size, sha256=canonical.sha256, path=path,
                           write_into=lambda fd: _copy_canonical(canonical, fd),
                           onnx=canonical)


def _copy_canonical(canonical: CanonicalOnnx, dst: int) -> None:
    """An ONNX output's canonical bytes as the whole of the file behind ``dst``, by kernel
    copy from the broker's file (explicit offsets: it may be copied twice at once)."""
    copy_file(canonical.fileno(), dst, canonical.size)


def _data_output(path: Path, kind: ArtifactFormat) -> ValidatedOutput:
    """Hashed and checked a block at a time: the broker holds none of it (a carried
    ``tokenizer.json`` may be tens of MB), and copies it from its file when it is asked for."""
    handle, st = open_regular_file(path)
    digest, check, size = hashlib.sha256(), EncodingCheck(kind), 0
    with handle:
        if st.st_size > MAX_DATA_BYTES:
            raise error(Reason.OUTPUT_TOO_LARGE, f"the data file's output is {st.st_size} "
                                                 f"bytes, over the {MAX_DATA_BYTES}-byte cap")
        while block := handle.read(BLOCK_BYTES):
            digest.update(block)
            check.feed(block)
            size += len(block)
    problem = check.problem()
    if problem is not None:
        raise error(Reason.OUTPUT_INVALID, f"the data file's output {problem}")
    identity = FileIdentity.of(st)
    if size != identity.size:
        raise error(Reason.OUTPUT_INVALID, "the data file's output changed while it was read")
    return ValidatedOutput(format=OutputFormat.DATA, size=size, sha256=digest.hexdigest(),
                           path=path, identity=identity,
                           write_into=lambda fd: copy_identical(path, identity, fd))


async def same_output(output: ValidatedOutput, twin: ValidatedOutput) -> bool:
    """Whether two safetensors outputs have the same canonical form (compared, not hashed)."""
    mine, theirs = output.safetensors, twin.safetensors
    if mine is None or theirs is None:
        return False
    return await asyncio.to_thread(same_canonical, output.path, mine, twin.path, theirs)


def with_sha256(output: ValidatedOutput, sha256: str) -> ValidatedOutput:
    """``output`` carrying ``sha256``: only for a digest proved to be of its canonical bytes
    (that of a twin :func:`same_output` found identical)."""
    info = output.safetensors
    return replace(output, sha256=sha256,
                   safetensors=None if info is None else replace(info, canonical_sha256=sha256))


async def compute_digest(output: ValidatedOutput) -> ValidatedOutput:
    """``output`` with its sha256, if validation left it out."""
    if output.sha256 or output.safetensors is None:
        return output
    info = await asyncio.to_thread(with_digest, output.path, output.safetensors)
    return replace(output, sha256=info.canonical_sha256, safetensors=info)


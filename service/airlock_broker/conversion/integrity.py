"""Integrity verification (DESIGN §5): beyond format safety.

The conversion ran in a sandbox where the artifact could execute code and tamper with the
converter ("Silent Sabotage"). A second, fresh sandbox reads the same artifact without
calling anything the artifact names: a PyTorch checkpoint with a pickle reader that only
accepts tensor-rebuild globals, an estimator pickle with the policy loader (allowlisted data
classes only). When both outputs are the same (the same tensors byte for byte; the same
canonical ONNX bytes), the result is *integrity-verified*; when they differ the conversion is
rejected; when the second reading is impossible the result stays *format-safe only*. Both
files have already passed the strict validator. A reading that goes first and refuses nothing
is the answer by itself (jobs.py): no conversion runs, so there is nothing to compare.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from airlock_broker.conversion.outputs import (
    Delivery,
    ValidatedOutput,
    same_output,
    with_sha256,
)
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.futures import retrieved
from airlock_broker.sandboxes.sandbox import Outcome
from airlock_broker.validation.files import open_regular_file
from airlock_broker.validation.safetensors_canonical import (
    SafetensorsInfo,
    canonical_and_data_digests,
)
from airlock_sandbox.formats import ArtifactFormat

log = logging.getLogger(__name__)

T = TypeVar("T")

VERIFIED_NOTE = "matches a reading of the artifact that executed nothing"
#: A data file (airlock_sandbox.data_files): checked in its sandbox, and the output is the input.
CARRIED_NOTE = "a data file, checked as its kind and carried unchanged (sha256 of the input)"
READ_ALONE_NOTE = ("converted from a reading of the artifact that executed nothing and "
                   "refused no global")


class Assurance(enum.StrEnum):
    """What the broker vouches for in an output: the values the signed provenance records and
    the client's ``airlock_client.Assurance`` reads (the wire has its own enum, api/wire.py)."""

    #: Valid and code-free, but the artifact may have run code: its weights are not proven.
    FORMAT_SAFE_ONLY = "format_safe_only"
    #: A second sandbox read the same weights without running the artifact's code.
    INTEGRITY_VERIFIED = "integrity_verified"


@dataclass(frozen=True)
class Extraction:
    """The integrity extraction's validated output, if it produced one; otherwise why the
    result can only be format-safe."""

    output: ValidatedOutput | None
    note: str
    #: The output's sha256, computed in the background from the moment it was validated.
    digest: asyncio.Task[ValidatedOutput] | None = None
    #: What the reading says it did not call (its report: the reading executed nothing the
    #: artifact names, so this is believed as far as its sandbox is).
    refused: tuple[str, ...] = ()
    #: The reading's sandbox outcome and report, and the host's format of the artifact.
    outcome: Outcome | None = None
    report: dict[str, Any] = field(default_factory=dict)
    format: ArtifactFormat = ArtifactFormat.UNKNOWN
    #: Why the broker refused the reading's output, when its sandbox exited 0.
    invalid: AirlockError | None = None
    #: The sha256 of the reading's data section, when it reported that in place of writing
    #: the bytes (an output on disk: JobSpec.data_digest_only); its file is then the header
    #: and a hole.
    data_sha256: str = ""

    async def sha256(self) -> str:
        """The extraction output's digest ("" if it could not be computed)."""
        if self.digest is None:
            return ""
        try:
            return (await self.digest).sha256
        except AirlockError as exc:
            log.warning("the integrity extraction's digest failed: %s", exc)
            return ""


async def assurance_of(output: ValidatedOutput, extraction: Extraction | None
                       ) -> tuple[ValidatedOutput, Assurance, str]:
    """``INTEGRITY_VERIFIED`` or ``FORMAT_SAFE_ONLY`` with why; ``INTEGRITY_MISMATCH`` when the
    two readings disagree. The output comes back with the extraction's digest when it is the
    same file."""
    if extraction is None:
        return output, Assurance.FORMAT_SAFE_ONLY, ""
    extracted = extraction.output
    if extracted is None:
        return output, Assurance.FORMAT_SAFE_ONLY, extraction.note
    if output.format is not extracted.format:
        raise _mismatch(extraction, f"the conversion wrote {output.format.value}, the reading "
                                    f"that executed nothing wrote {extracted.format.value}")
    if output.safetensors is None:  # ONNX: the validator's canonical bytes, hashed
        if output.sha256 == extracted.sha256:
            return output, Assurance.INTEGRITY_VERIFIED, VERIFIED_NOTE
        raise _mismatch(extraction, "the ONNX graphs differ: sha256 "
                                    f"{output.sha256[:12]}… against {extracted.sha256[:12]}…")
    assert extracted.safetensors is not None
    if extraction.data_sha256:
        return await _by_digest(output, extracted.safetensors, extraction)
    # Compare while the extraction's hash finishes: two threads, two cores.
    same, sha256 = await asyncio.gather(same_output(output, extracted), extraction.sha256())
    if same:
        return (with_sha256(output, sha256) if sha256 else output,
                Assurance.INTEGRITY_VERIFIED, VERIFIED_NOTE)
    differs = await asyncio.to_thread(difference, output.path, output.safetensors,
                                      extracted.path, extracted.safetensors)
    if differs is not None:
        raise _mismatch(extraction, differs)
    return output, Assurance.INTEGRITY_VERIFIED, VERIFIED_NOTE


async def assurance_delivering(output: ValidatedOutput, extraction: Extraction | None,
                               delivery: Delivery | None, *,
                               before_commit: Callable[[], Awaitable[object]] | None = None
                               ) -> tuple[ValidatedOutput, Assurance, str, bool]:
    """``assurance_of``, with the output delivered meanwhile when a comparison of tensor data
    (a hash and a byte comparison, 240-290 ms for S3's 400 MiB) would otherwise come first:
    the two use the two cores, and on the fast path the caller's file is written in that
    time. The caller's client renames that file into place only on success; if the
    comparison fails, the file is emptied once the copy is done (``Delivery.retract``), and
    the refusal is what the job raises. The last item: whether the output was delivered.
    ``before_commit``: what else must succeed before a delivered output is committed (the
    input's digest, input_digest.py); its failure retracts it the same way."""
    compared = (extraction is not None and extraction.output is not None
                and output.safetensors is not None
                and extraction.output.safetensors is not None)
    if delivery is None or not compared:
        return (*await assurance_of(output, extraction), False)
    assured, delivered = await _delivering(assurance_of(output, extraction), output, delivery,
                                           before_commit)
    return (*assured, delivered)


async def digest_delivering(reading: Extraction, delivery: Delivery | None, *,
                            before_commit: Callable[[], Awaitable[object]] | None = None
                            ) -> tuple[ValidatedOutput, bool]:
    """The output of a reading that converted the artifact alone, with its digest (hashed in
    the background since it was validated: 240 ms for 400 MiB), delivered meanwhile as in
    :func:`assurance_delivering`; taken back if the digest fails (the file changed), or
    ``before_commit`` does."""
    assert reading.output is not None
    if reading.digest is None:
        return reading.output, False
    if delivery is None:
        return await reading.digest, False
    return await _delivering(reading.digest, reading.output, delivery, before_commit)


async def _delivering(work: Awaitable[T], output: ValidatedOutput, delivery: Delivery,
                      before_commit: Callable[[], Awaitable[object]] | None = None
                      ) -> tuple[T, bool]:
    """``work`` awaited while ``output`` is delivered; a safetensors output pending (its
    header length zero: no loader takes the file), committed once ``work`` and
    ``before_commit()`` succeeded. On a failure of either the delivery is waited for and
    retracted, and the failure raised; a retract that cannot happen, or a copy that outlives
    it, leaves a file that is still pending. (An
    estimator's ONNX reading is delivered whole: it was validated, and its digest is a hash
    of bytes held in memory.) The second item: whether it was delivered."""
    pending = output.safetensors is not None
    delivering = asyncio.ensure_future(delivery.deliver(output, pending=pending))
    delivering.add_done_callback(retrieved)  # a refusal or a cancellation is what counts
    try:
        done = await work
        if before_commit is not None:
            await before_commit()  # it ran meanwhile
    except asyncio.CancelledError:
        delivering.cancel()  # the caller left: its copy thread finishes alone (peer_io.py)
        raise
    except BaseException:
        await asyncio.wait({delivering})  # bounded by the delivery's own time limit
        await delivery.retract()
        raise
    delivered = await delivering
    if delivered and pending:
        await delivery.commit(output)
    return done, delivered


async def _by_digest(output: ValidatedOutput, ext: SafetensorsInfo, extraction: Extraction
                     ) -> tuple[ValidatedOutput, Assurance, str]:
    """The comparison with a reading that reported its data section's digest: the same
    canonical header (names, dtypes, shapes, layout, metadata), then the same data digest,
    taken in the pass that hashes the output for its answer."""
    conv = output.safetensors
    assert conv is not None
    if conv.canonical_header != ext.canonical_header or conv.data_bytes != ext.data_bytes:
        raise _mismatch(extraction, header_difference(conv, ext)
                        or "the tensors are laid out in another order")
    whole, data = await asyncio.to_thread(canonical_and_data_digests, output.path, conv)
    if data != extraction.data_sha256:
        raise _mismatch(extraction, "the tensor data differs: sha256 of the data section "
                                    f"{data[:12]}… against {extraction.data_sha256[:12]}… "
                                    "(an output on disk is compared by digest)")
    return with_sha256(output, whole), Assurance.INTEGRITY_VERIFIED, VERIFIED_NOTE


def _mismatch(extraction: Extraction, differs: str) -> AirlockError:
    if extraction.refused:
        why = (f"; loading it calls {', '.join(extraction.refused[:3])}, which the reading "
               "did not: that code tampered with the conversion, or the model needs it, and "
               "then it cannot be verified")
    else:
        why = ": the artifact tampered with its conversion"
    return error(Reason.INTEGRITY_MISMATCH,
                 "the converted model differs from the one stored in the artifact, read "
                 f"without executing it ({differs}){why}")

_BLOCK = 1024 * 1024


def difference(converted: Path, conv: SafetensorsInfo, extracted: Path,
               ext: SafetensorsInfo) -> str | None:
    """None when both files hold the same tensors and metadata; else the first difference."""
    if conv.canonical_sha256 and conv.canonical_sha256 == ext.canonical_sha256:
        return None
    a, b = _entries(conv), _entries(ext)
    differs = _entries_difference(a, b)
    if differs is not None:
        return differs
    with open_regular_file(converted)[0] as fa, open_regular_file(extracted)[0] as fb:
        for name in sorted(a):
            ea, eb = a[name], b[name]
            if not _same_bytes(fa, conv.source_data_offset + ea["data_offsets"][0],
                               fb, ext.source_data_offset + eb["data_offsets"][0],
                               ea["data_offsets"][1] - ea["data_offsets"][0]):
                return f"tensor {name[:80]!r}: values differ"
    return None


def header_difference(conv: SafetensorsInfo, ext: SafetensorsInfo) -> str | None:
    """The first difference in metadata, tensor names, dtypes or shapes; None if none."""
    return _entries_difference(_entries(conv), _entries(ext))


def _entries_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """``header_difference`` of two parsed headers; their ``__metadata__`` is taken out."""
    if a.pop("__metadata__", None) != b.pop("__metadata__", None):
        return "the metadata (tied-weight names) differs"
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:3]
        return f"the tensor names differ (e.g. {only})"
    for name in sorted(a):
        if (a[name]["dtype"], a[name]["shape"]) != (b[name]["dtype"], b[name]["shape"]):
            return f"tensor {name[:80]!r}: dtype or shape differs"
    return None


def _entries(info: SafetensorsInfo) -> dict[str, Any]:
    # The canonical header was produced by the broker from a validated file.
    doc: dict[str, Any] = json.loads(info.canonical_header[8:])
    return doc


def _same_bytes(fa: Any, offset_a: int, fb: Any, offset_b: int, length: int) -> bool:
    fa.seek(offset_a)
    fb.seek(offset_b)
    while length > 0:
        n = min(_BLOCK, length)
        if fa.read(n) != fb.read(n):
            return False
        length -= n
    return True

"""The spool's disk: a reserve of free space no upload may take, and spool files that cost what
their data really occupies.

What costs what. A client's 4 GiB sparse file costs it no disk. Read through the same-host
fast path and written densely into the spool, it cost the broker 4 GiB (and a stream of
zeros cost it as much). A spool file now leaves every all-zero block a hole, so it occupies
what its data really does; the sandbox reads the same bytes. What a spool file may still
need is accounted before it is written: the declared size of a stream, or the blocks a peer's
file really occupies (its allocated size, ``st_blocks``, not its length). An upload is refused
(``SPOOL_FULL``) when that, plus what the uploads in progress may still write, would take
the filesystem's free space below the reserve; while it is written the reserve is checked
again (a peer can fill its file's holes meanwhile, and other programs use the disk too).

A job's answer is a spool file too (answers.py): the validated output, about as large as the
input's data for a checkpoint. Its room is claimed once the input is spooled, before any
sandbox starts (``answer_bytes``, the host's estimate from what the spool file occupies), and
held until the answer is written: a 16 GiB checkpoint on a disk with room for its upload but
not its output is refused before the conversion, not after it. At its peak one conversion of
N bytes holds about 2 N on the spool's disk (the input, until its sandboxes are destroyed, and
the answer), and 2 N of RAM in the output tmpfs of its two sandboxes (the conversion's and
the integrity reading's). A job whose output is too large for a tmpfs writes it to the spool
instead (output_room.py): about 4 N of disk and no output in RAM, all of it claimed up front.
An ONNX output's canonical bytes, as its validator sends them, are a spool file too until its
job is answered (validation/onnx_canonical.py): about its answer's size again, claimed with
the answer's room, before any sandbox starts, for a job that may come back as ONNX
(``canonical_bytes``; pipeline.py). The validator's writer draws on that claim as the bytes
arrive (``SpoolClaim.more``: refused then only if the real size outgrew the estimate and does
not fit), and the job gives it back once its output is validated, or in its ``finally``.

An input that fits the RAM spool (``<root>/ram``, a tmpfs of ``[spool] ram_bytes``:
input_room.py) is not on this disk at all: its upload claims nothing here (it is claimed
against the RAM spool's budget instead) and the job holds about N on the disk, its answer's,
which is claimed here as for any job.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from airlock_broker.conversion.upload_limits import MiB, UploadLimits
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.validation.limits import OutputLimits
from airlock_sandbox.contract import Target

#: Below this much written since the last look, the filesystem is not asked again.
_CHECK_EVERY = 4 * MiB
_ZEROS = bytes(4 * MiB)  # never touched: reading it maps the kernel's zero page, no memory


class SpoolSpace:
    """The spool's filesystem, its reserve, and what the uploads in progress may still write.
    Thread-safe: the fast path writes its spool file on a worker thread."""

    def __init__(self, root: Path, limits: UploadLimits,
                 statvfs: Callable[[Path], os.statvfs_result] = os.statvfs) -> None:
        self.root = root
        self.limits = limits
        self._statvfs = statvfs
        self._lock = threading.Lock()
        self._claims: set[SpoolClaim] = set()

    def claim(self, expected: int, purpose: str = "this upload", *,
              owner: str = "") -> SpoolClaim:
        """Room for ``purpose`` (an upload, an answer) that will write about ``expected``
        bytes, or SPOOL_FULL. ``owner``: the caller an upload is for (``Principal.quota``),
        whose uploads together stay within ``[upload] spool_share_per_caller``; "" for none
        (an answer: claimed for data that has arrived)."""
        made = SpoolClaim(self, max(expected, 0), purpose, owner)
        with self._lock:
            self._check(made, new=True)
            self._claims.add(made)
        return made

    def _promised(self, but: SpoolClaim | None = None) -> int:
        return sum(c.outstanding for c in self._claims if c is not but)

    def _check(self, claim: SpoolClaim, *, new: bool = False) -> None:
        """Lock held. SPOOL_FULL if what ``claim`` may still write does not fit above the
        reserve, after what the other uploads in progress may still write; and, for a
        ``new`` claim, if its owner would hold more than its share. (An upload once
        promised is not stopped for its share later, as others' data lands.)"""
        st = self._statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        reserve = max(self.limits.spool_min_free_bytes,
                      int(self.limits.spool_min_free_ratio * st.f_blocks * st.f_frsize))
        others = self._promised(but=claim)
        need = claim.outstanding
        if free - others - need >= reserve:
            if new:
                self._check_share(claim, free - reserve)
            return
        raise error(Reason.SPOOL_FULL,
                    f"the spool's filesystem ({self.root}) has {_mib(free)} free, "
                    f"{_mib(others)} of it promised to jobs in progress (uploads and answers); "
                    f"{claim.purpose} needs {_mib(need)} more and the broker keeps "
                    f"{_mib(reserve)} free ([upload] "
                    "spool_min_free_bytes / spool_min_free_ratio). Retry when other jobs have "
                    "finished, or ask the operator to free space")

    def _check_share(self, claim: SpoolClaim, room: int) -> None:
        """Lock held. SPOOL_FULL if ``claim``'s owner would hold more than its share of
        ``room`` (the free space above the reserve), counting what its uploads in progress
        may still write. An upload of a caller whose others may write nothing more may take
        all the room, as any upload may (one job of one caller is never refused by the
        share)."""
        share = self.limits.spool_share_per_caller
        if not claim.owner or share >= 1:
            return
        held = sum(c.outstanding for c in self._claims
                   if c.owner == claim.owner and c is not claim)
        if not held:
            return
        allowed = int(share * room)
        if held + claim.outstanding <= allowed:
            return
        raise error(Reason.SPOOL_FULL,
                    f"your uploads in progress may still write {_mib(held)} on the spool "
                    f"({self.root}); {claim.purpose} needs {_mib(claim.outstanding)} more, and "
                    f"one caller's uploads may hold at most {_mib(allowed)}, {share:.0%} of "
                    f"its {_mib(room)} free above the reserve ([upload] "
                    "spool_share_per_caller). Retry when some of your jobs have finished, or "
                    "send fewer at once (a model directory: airlock convert DIR --jobs 1)")

    def _release(self, claim: SpoolClaim) -> None:
        with self._lock:
            self._claims.discard(claim)


class SpoolClaim:
    """One upload's share of the spool: ``wrote`` after each write, ``release`` when done."""

    def __init__(self, space: SpoolSpace, expected: int, purpose: str = "this upload",
                 owner: str = "") -> None:
        self._space = space
        self.expected = expected
        self.purpose = purpose
        self.owner = owner
        self.written = 0
        self._checked = 0

    @property
    def outstanding(self) -> int:
        """What this upload may still write: the rest of what it claimed (an upload that
        outgrew its claim claims the next few MiB at a time, each checked)."""
        return max(self.expected - self.written, 0)

    def wrote(self, count: int) -> None:
        """``count`` more bytes are on disk; SPOOL_FULL if the disk crossed the reserve."""
        space = self._space
        with space._lock:
            self.written += count
            if self.written - self._checked < _CHECK_EVERY and self.written <= self.expected:
                return  # within the claim: the free space it was checked against is unchanged
            self._checked = self.written
            if self.written > self.expected:
                self.expected = self.written + _CHECK_EVERY  # the next blocks, checked now
            space._check(self)

    def expect(self, total: int) -> None:
        """This will write ``total`` bytes in all, more than it claimed: SPOOL_FULL now if
        the rest does not fit above the reserve (an answer, once its size is known)."""
        with self._space._lock:
            self._expect(total)

    def more(self, count: int) -> None:
        """``count`` bytes more than it has written are about to be written (the next file a
        job's claim covers, once its size is known): SPOOL_FULL now if that goes past what
        it claimed and the rest does not fit above the reserve."""
        with self._space._lock:
            self._expect(self.written + count)

    def _expect(self, total: int) -> None:
        """Lock held: ``expect``."""
        if total <= self.expected:
            return
        claimed, self.expected = self.expected, total
        try:
            self._space._check(self)
        except AirlockError:
            self.expected = claimed  # refused: it promises no more than before
            raise

    def release(self) -> None:
        self._space._release(self)


class SpoolWriter:
    """Writes one spool file at explicit offsets; an all-zero block stays a hole (not written,
    not counted) unless ``holes`` is false. ``finish`` gives the file its length.

    A file on the RAM spool (a tmpfs) is written whole: its room there is claimed at its
    declared size anyway, and a sandbox that maps a hole of a tmpfs file is charged for the
    page its read allocates, in its own memory limit (a checkpoint with 2 GiB of zeros got
    its reading killed for memory when the input's holes and its output were charged to it)."""

    def __init__(self, fd: int, claim: SpoolClaim | None, *, holes: bool = True) -> None:
        self.fd = fd
        self.claim = claim
        self.holes = holes
        #: The bytes of the blocks that were not all zero: the input's data, wherever the
        #: zeros went (what a job's answer is estimated from, spool_space.answer_bytes).
        self.data_bytes = 0

    def write(self, data: bytes | bytearray, offset: int) -> bool:
        """``data`` at ``offset``; False: it is all zero and left a hole."""
        if is_zero(data):
            if self.holes:
                return False
        else:
            self.data_bytes += len(data)
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n
        if self.claim is not None:
            self.claim.wrote(len(data))
        return True

    def finish(self, size: int) -> None:
        os.ftruncate(self.fd, size)  # trailing holes


def answer_bytes(input_size: int, target: Target, limits: OutputLimits) -> int:
    """What a job's answer will take on the spool, as far as the host can tell before the
    conversion: about its input (weights in, the same weights out; a pickled model in, its
    ONNX graph out), never more than the cap of the format it may come back in."""
    cap = limits.max_onnx_bytes if target is Target.ONNX else limits.max_output_bytes
    return max(min(input_size, cap), 0)


def canonical_bytes(input_size: int, target: Target, limits: OutputLimits) -> int:
    """What a job's ONNX canonical copies will take on the spool, before the conversion:
    one copy of an answer in ONNX (``answer_bytes``) for a job that may come back as ONNX
    (``ONNX``, or ``AUTO``: the host cannot tell a pickled module from a state dict before
    the sandbox has looked), else nothing. A second copy (an integrity reading's ONNX
    output) is claimed as it arrives (``SpoolClaim.more``)."""
    if target not in (Target.ONNX, Target.AUTO):
        return 0
    return answer_bytes(input_size, Target.ONNX, limits)


def is_zero(data: bytes | bytearray) -> bool:
    """All bytes zero (and at least one). A ``memcmp`` after two cheap looks: real model data
    is rejected by its first or last byte almost always."""
    n = len(data)
    if n == 0 or data[0] or data[-1]:
        return False
    if n > len(_ZEROS):
        return data == bytes(n)
    # bytearray compares with any buffer by memcmp; bytes only with bytes (a slice copies).
    return data == (memoryview(_ZEROS)[:n] if isinstance(data, bytearray) else _ZEROS[:n])


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"

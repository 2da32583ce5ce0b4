"""A large ONNX output never sits whole in the broker's memory.

The tenth review's known gap: a validator's canonical bytes (up to ``[output] max_onnx_bytes``,
512 MiB) were read into the broker's memory, hashed there and held until the answer was
written, so two large ONNX jobs at once added about 1 GiB to its RSS. Now they are written, a
block at a time as they come, into an unnamed file only the broker holds, hashed as written,
and copied from that file into the answer."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from airlock_broker.conversion.outputs import validate_output
from airlock_broker.errors import AirlockError, Reason
from airlock_broker.validation import OutputLimits, validate_onnx_bytes
from airlock_broker.validation.onnx_pool import OnnxValidatorPool, ValidatorSettings
from airlock_broker.validation.onnx_worker import tiny_model
from airlock_sandbox.contract import OUTPUT_NAMES, OutputFormat, Target

LIMITS = OutputLimits()
MiB = 1 << 20
#: The model's size: far above any block the broker may hold of it.
MODEL_BYTES = 64 * MiB
#: What the broker's Python heap may grow by while it validates and answers the model: its
#: blocks (1 MiB) and bookkeeping, nothing of the model's size.
BROKER_PEAK_BYTES = 8 * MiB


def large_model() -> bytes:
    """``y = x + W``, W an initializer of 64 MiB of random floats (incompressible)."""
    count = MODEL_BYTES // 4
    weights = np.random.default_rng(0).standard_normal(count, dtype=np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [count])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [count])
    graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "large", [x], [y],
                              initializer=[numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


def test_a_large_onnx_output_is_validated_and_answered_without_holding_it(
    tmp_path: Path
) -> None:
    data = large_model()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / OUTPUT_NAMES[OutputFormat.ONNX]).write_bytes(data)
    spool = tmp_path / "spool"
    spool.mkdir()
    answer = tmp_path / "answer"

    async def main() -> tuple[int, int, str]:
        pool = OnnxValidatorPool(LIMITS, ValidatorSettings(processes=1),
                                 canonical_dir=spool)
        pool.start()
        try:
            tracemalloc.start()
            try:
                output = await validate_output(out_dir, Target.ONNX, LIMITS, pool)
                try:
                    # Nothing of it has a name in the spool's directory.
                    assert os.listdir(spool) == []
                    fd = os.open(answer, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        await asyncio.to_thread(output.write_into, fd)
                    finally:
                        os.close(fd)
                finally:
                    output.close()
                _now, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            return peak, output.size, output.sha256
        finally:
            await pool.close()

    peak, size, sha256 = asyncio.run(main())
    assert peak < BROKER_PEAK_BYTES, (
        f"the broker's heap peaked at {peak / MiB:.1f} MiB while it validated and answered a "
        f"{MODEL_BYTES // MiB} MiB ONNX output")
    canonical, _info = validate_onnx_bytes(data, LIMITS)
    assert size == len(canonical) > MODEL_BYTES
    assert sha256 == hashlib.sha256(canonical).hexdigest()
    assert answer.read_bytes() == canonical
    assert os.listdir(tmp_path / "spool") == []


class Claims:
    """A job's claim on the spool that records what is drawn on it and written, and refuses
    to go past ``room`` (``SPOOL_FULL``, as ``spool_space.SpoolClaim.more`` does)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.drawn: list[int] = []
        self.written = 0
        self.released = 0

    def more(self, count: int) -> None:
        if self.written + count > self.room:
            raise AirlockError(Reason.SPOOL_FULL, f"the canonical copy needs {count} bytes")
        self.drawn.append(count)

    def wrote(self, count: int) -> None:
        self.written += count

    def release(self) -> None:
        self.released += 1


def test_the_canonical_file_is_drawn_on_its_jobs_claim_and_refused_when_it_does_not_fit(
    tmp_path: Path
) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(tiny_model())
    canonical_size = len(validate_onnx_bytes(source.read_bytes(), LIMITS)[0])

    async def run(room: int) -> tuple[Claims, AirlockError | None]:
        claims = Claims(room)
        pool = OnnxValidatorPool(LIMITS, ValidatorSettings(processes=1),
                                 canonical_dir=tmp_path)
        pool.start()
        try:
            try:
                canonical, _info = await pool.validate(source, claims)
            except AirlockError as exc:
                return claims, exc
            with canonical:
                assert os.fstat(canonical.fileno()).st_nlink == 0  # no name anywhere
            return claims, None
        finally:
            await pool.close()

    fits, refused = asyncio.run(run(1 << 30))
    assert refused is None
    assert fits.drawn == [canonical_size] and fits.written == canonical_size
    assert fits.released == 0  # the claim is its job's to give back (pipeline.py)
    full, refused = asyncio.run(run(canonical_size - 1))
    assert refused is not None and refused.reason is Reason.SPOOL_FULL
    assert full.drawn == [] and full.written == 0
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_a_jobs_two_onnx_outputs_draw_on_one_claim_and_the_spool_promises_nothing_after(
    tmp_path: Path
) -> None:
    """A job's canonical claim, on the spool's real bookkeeping (``SpoolSpace``, on a fake
    disk): the conversion's copy is drawn within its estimate; the integrity reading's second
    copy takes only what goes past it, checked against what the first left free; a refused
    or cancelled validation leaves the claim as it was; and once the job gives it back
    (twice: after validation, then in its ``finally``) nothing is promised."""
    from airlock_broker.conversion.spool_space import SpoolSpace
    from airlock_broker.conversion.upload_limits import UploadLimits
    from tests.unit.test_spool_space import Disk

    source = tmp_path / "model.onnx"
    source.write_bytes(large_model())
    size = len(validate_onnx_bytes(source.read_bytes(), LIMITS)[0])
    reserve = 100 * MiB
    disk = Disk(10_000 * MiB, reserve + size + MiB)  # one copy and a little, not two
    space = SpoolSpace(tmp_path, UploadLimits(spool_min_free_bytes=reserve,
                                              spool_min_free_ratio=0), statvfs=disk)

    async def run() -> None:
        pool = OnnxValidatorPool(LIMITS, ValidatorSettings(processes=1),
                                 canonical_dir=tmp_path)
        pool.start()
        claim = space.claim(size, "this job's ONNX output's canonical copy")
        try:
            first, _ = await pool.validate(source, claim)
            assert (claim.expected, claim.written, claim.outstanding) == (size, size, 0)
            disk.free -= size  # the first copy is on the disk now
            try:
                await pool.validate(source, claim)
            except AirlockError as exc:
                assert exc.reason is Reason.SPOOL_FULL, exc
            else:
                raise AssertionError("a second copy that does not fit was written")
            assert (claim.expected, claim.written, claim.outstanding) == (size, size, 0)
            disk.free += size  # room for the second copy now
            # Cancelled while its validator works: the thread is waited for, nothing kept.
            cancelled = asyncio.ensure_future(pool.validate(source, claim))
            await asyncio.sleep(0)
            cancelled.cancel()
            try:
                await cancelled
            except asyncio.CancelledError:
                pass
            else:  # it finished first: it is the caller's to close
                cancelled.result()[0].close()
            second, _ = await pool.validate(source, claim)
            assert claim.written >= 2 * size and claim.outstanding == 0
            first.close()
            second.close()
        finally:
            claim.release()
            claim.release()  # the job's second give-back (its finally) changes nothing
            await pool.close()
        assert not space._claims and space._promised() == 0

    asyncio.run(run())
    assert os.listdir(tmp_path) == ["model.onnx"]

"""integrity.assurance_delivering: on the fast path the output goes into the caller's file
while the two readings are compared; a refused comparison takes it back (the file is emptied
once the copy is done), and the refusal is what the job raises. integrity.digest_delivering:
the same while a reading that converted alone is hashed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from airlock_broker.conversion.integrity import (
    Assurance,
    Extraction,
    assurance_delivering,
    digest_delivering,
)
from airlock_broker.conversion.outputs import ValidatedOutput
from airlock_broker.errors import AirlockError, Reason
from airlock_sandbox.contract import OutputFormat
from tests.unit.test_integrity_digest import WEIGHTS, _output, _reading


class Recorder:
    """A ``Delivery`` that says what happened, in order; its copy waits for ``release``."""

    def __init__(self, *, fails: bool = False) -> None:
        self.events: list[str] = []
        self.release = asyncio.Event()
        self.fails = fails

    async def deliver(self, output: ValidatedOutput, *, pending: bool = False) -> bool:
        self.events.append("deliver pending" if pending else "deliver")
        await self.release.wait()
        self.events.append("delivered")
        if self.fails:
            raise AirlockError(Reason.LOCAL_WRITE_FAILED, "disk full")
        return True

    async def commit(self, output: ValidatedOutput) -> None:
        self.events.append(f"commit {output.head().hex()}")

    async def retract(self) -> None:
        self.events.append("retract")


def _commit(output: ValidatedOutput) -> str:
    """The event of committing ``output``: its header length, little-endian."""
    assert output.safetensors is not None
    return f"commit {output.safetensors.canonical_header[:8].hex()}"


def _compared_reading(tmp_path: Path, weights: dict[str, np.ndarray]) -> Extraction:
    """A reading that wrote its data: compared byte for byte (no data digest)."""
    reading = _output(tmp_path / "read.safetensors", weights, digest=True)
    return Extraction(reading, "")


async def _copying(output: ValidatedOutput, extraction: Extraction, delivery: Recorder
                   ) -> asyncio.Future[tuple[ValidatedOutput, Assurance, str, bool]]:
    """``assurance_delivering`` under way, once its copy has started."""
    running = asyncio.ensure_future(assurance_delivering(output, extraction, delivery))
    while not delivery.events:
        await asyncio.sleep(0.001)
    return running


def test_the_output_is_delivered_while_the_readings_are_compared(tmp_path: Path) -> None:
    output = _output(tmp_path / "out.safetensors", WEIGHTS)

    async def scenario() -> None:
        delivery = Recorder()
        # the copy started before the comparison ended ...
        running = await _copying(output, _compared_reading(tmp_path, WEIGHTS), delivery)
        await asyncio.sleep(0.05)
        assert not running.done()  # ... and the result waits for it
        delivery.release.set()
        _out, assurance, _note, delivered = await running
        assert assurance is Assurance.INTEGRITY_VERIFIED and delivered
        # delivered pending (its header length zero), committed once the comparison passed
        assert delivery.events == ["deliver pending", "delivered", _commit(output)]

    asyncio.run(scenario())


@pytest.mark.parametrize("reading", ["bytes", "digest"])
def test_a_refused_comparison_takes_the_delivered_output_back(tmp_path: Path,
                                                                reading: str) -> None:
    changed = {**WEIGHTS, "layer.bias": WEIGHTS["layer.bias"] + np.float32(1)}
    output = _output(tmp_path / "out.safetensors", changed)
    extraction = (_compared_reading(tmp_path, WEIGHTS) if reading == "bytes"
                  else _reading(tmp_path / "read.safetensors", WEIGHTS))

    async def scenario() -> None:
        delivery = Recorder(fails=True)  # its own failure is not the one raised
        running = asyncio.ensure_future(assurance_delivering(output, extraction, delivery))
        await _taken_back(running, delivery, Reason.INTEGRITY_MISMATCH)

    asyncio.run(scenario())


async def _taken_back(running: asyncio.Future[object], delivery: Recorder,
                      reason: Reason) -> None:
    """``running`` fails with ``reason`` and retracts its delivery, after the copy ended."""
    await asyncio.sleep(0.2)
    assert delivery.events == ["deliver pending"]  # failed, but the copy is not done yet
    delivery.release.set()
    with pytest.raises(AirlockError) as caught:
        await running
    assert caught.value.reason is reason
    assert delivery.events == ["deliver pending", "delivered", "retract"]  # never committed


def test_without_a_comparison_of_data_nothing_is_delivered_early(tmp_path: Path) -> None:
    output = _output(tmp_path / "out.safetensors", WEIGHTS, digest=True)

    async def scenario() -> None:
        delivery = Recorder()
        for extraction in (None, Extraction(None, "the reading failed")):
            _out, assurance, _note, delivered = await assurance_delivering(
                output, extraction, delivery)
            assert assurance is Assurance.FORMAT_SAFE_ONLY and not delivered
        assert delivery.events == []

    asyncio.run(scenario())


def test_a_caller_that_leaves_during_the_comparison_gives_its_copy_up(tmp_path: Path) -> None:
    output = _output(tmp_path / "out.safetensors", WEIGHTS)

    async def scenario() -> None:
        delivery = Recorder()
        running = await _copying(output, _compared_reading(tmp_path, WEIGHTS), delivery)
        running.cancel()  # the client disconnected
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(10):  # not held until the copy ends
                await running
        await asyncio.sleep(0)
        assert delivery.events == ["deliver pending"]  # given up at once, neither waited for nor
        # retracted (the copy's thread finishes alone; the client is gone)

    asyncio.run(scenario())


def _hashing(output: ValidatedOutput, hashed: asyncio.Event, *, fails: bool = False
             ) -> Extraction:
    """A reading that converted alone, its digest done once ``hashed`` is set."""
    async def digest() -> ValidatedOutput:
        await hashed.wait()
        if fails:
            raise AirlockError(Reason.OUTPUT_INVALID, "output changed after it was validated")
        return output

    return Extraction(output, "", asyncio.ensure_future(digest()))


def test_a_reading_alone_is_delivered_while_it_is_hashed(tmp_path: Path) -> None:
    output = _output(tmp_path / "out.safetensors", WEIGHTS)

    async def scenario() -> None:
        delivery, hashed = Recorder(), asyncio.Event()
        running = asyncio.ensure_future(digest_delivering(_hashing(output, hashed), delivery))
        while not delivery.events:  # the copy starts before the hash is done
            await asyncio.sleep(0.001)
        delivery.release.set()
        await asyncio.sleep(0.05)
        assert not running.done()  # delivered, but the answer waits for its digest
        hashed.set()
        assert await running == (output, True)
        assert delivery.events == ["deliver pending", "delivered", _commit(output)]
        # no delivery given: the digest alone, nothing delivered
        assert await digest_delivering(_hashing(output, hashed), None) == (output, False)

    asyncio.run(scenario())


def test_a_reading_whose_hash_fails_takes_its_delivered_output_back(tmp_path: Path) -> None:
    output = _output(tmp_path / "out.safetensors", WEIGHTS)

    async def scenario() -> None:
        delivery, hashed = Recorder(), asyncio.Event()
        running = asyncio.ensure_future(
            digest_delivering(_hashing(output, hashed, fails=True), delivery))
        hashed.set()
        await _taken_back(running, delivery, Reason.OUTPUT_INVALID)

    asyncio.run(scenario())


def test_an_onnx_reading_alone_is_delivered_whole(tmp_path: Path) -> None:
    """An estimator's reading converts to ONNX, validated and held in memory: delivered as
    it is, with nothing to commit (a header length is a safetensors file's)."""
    onnx = ValidatedOutput(format=OutputFormat.ONNX, size=4, sha256="", path=tmp_path / "x",
                           write_into=lambda fd: None)

    async def scenario() -> None:
        delivery, hashed = Recorder(), asyncio.Event()
        delivery.release.set()
        hashed.set()
        assert await digest_delivering(_hashing(onnx, hashed), delivery) == (onnx, True)
        assert delivery.events == ["deliver", "delivered"]

    asyncio.run(scenario())


@pytest.mark.parametrize("via", ["comparison", "reading alone"])
def test_an_input_digest_that_fails_takes_the_delivered_output_back(tmp_path: Path,
                                                                     via: str) -> None:
    """The output is right but the input's digest, computed meanwhile (input_digest.py),
    fails: nothing is committed, the delivery is taken back, the digest's failure raised."""
    output = _output(tmp_path / "out.safetensors", WEIGHTS)

    async def input_digest() -> str:
        raise AirlockError(Reason.INTERNAL, "the spooled input ended while it was hashed")

    async def scenario() -> None:
        delivery, hashed = Recorder(), asyncio.Event()
        hashed.set()
        running: asyncio.Future[object] = asyncio.ensure_future(
            assurance_delivering(output, _compared_reading(tmp_path, WEIGHTS), delivery,
                                 before_commit=input_digest) if via == "comparison"
            else digest_delivering(_hashing(output, hashed), delivery,
                                   before_commit=input_digest))
        await _taken_back(running, delivery, Reason.INTERNAL)

    asyncio.run(scenario())

"""Turning what a dead sandbox left in its output tmpfs into a validated, canonical output."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from airlock_broker.errors import Reason, error
from airlock_broker.validation.files import collect_output
from airlock_broker.validation.limits import OutputLimits
from airlock_broker.validation.onnx_pool import OnnxValidatorPool
from airlock_broker.validation.safetensors_check import (
    SafetensorsInfo,
    copy_canonical,
    iter_canonical,
    validate_safetensors,
    write_all,
)
from airlock_sandbox.contract import OUTPUT_NAMES, OutputFormat, Target


@dataclass(frozen=True)
class ValidatedOutput:
    """A validated output in canonical form. ``chunks`` streams exactly ``size`` bytes."""

    format: OutputFormat
    size: int
    sha256: str
    chunks: Callable[[int], Iterator[bytes]]
    path: Path
    #: Writes the same ``size`` bytes into a file descriptor, by kernel copy where it can.
    write_to: Callable[[int], int]
    #: The validator's findings for a safetensors output (None for ONNX).
    safetensors: SafetensorsInfo | None = None


def expected_format(out_dir: Path, target: Target) -> OutputFormat:
    """The output the broker will accept: the requested one, or for AUTO whichever exists."""
    if target is Target.ONNX:
        return OutputFormat.ONNX
    if target is Target.SAFETENSORS:
        return OutputFormat.SAFETENSORS
    present = [fmt for fmt, name in OUTPUT_NAMES.items() if (out_dir / name).exists()
               or (out_dir / name).is_symlink()]
    if len(present) != 1:
        raise error(Reason.OUTPUT_INVALID,
                    "the sandbox exited 0 but left no single model file "
                    f"(found {len(present)} candidates)")
    return present[0]


async def validate_output(out_dir: Path, target: Target, limits: OutputLimits,
                          onnx_validator: OnnxValidatorPool) -> ValidatedOutput:
    """Collect the single output file and validate it as hostile data (DESIGN §1.5).

    An ONNX output is parsed only by ``onnx_validator``'s processes, never in the broker;
    the canonical bytes they send back are what the caller receives, hashed here.
    """
    fmt = expected_format(out_dir, target)
    path = collect_output(out_dir, OUTPUT_NAMES[fmt], limits)
    if fmt is OutputFormat.SAFETENSORS:
        # Reads the header and hashes the data section: off the event loop.
        info = await asyncio.to_thread(validate_safetensors, path, limits)
        return ValidatedOutput(format=fmt, size=info.canonical_size,
                               sha256=info.canonical_sha256,
                               # No second hash while streaming: the sandbox is dead, the
                               # tmpfs is the broker's, and the client checks the sha256.
                               chunks=lambda n: iter_canonical(path, info, n, rehash=False),
                               path=path,
                               write_to=lambda fd: copy_canonical(path, info, fd),
                               safetensors=info)
    canonical, _info = await onnx_validator.validate(path)
    return ValidatedOutput(format=fmt, size=len(canonical),
                           sha256=hashlib.sha256(canonical).hexdigest(),
                           chunks=lambda n: _slices(canonical, n), path=path,
                           write_to=lambda fd: _write_bytes(fd, canonical))


def _write_bytes(fd: int, data: bytes) -> int:
    write_all(fd, data)
    return len(data)


def _slices(data: bytes, size: int) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start:start + size])

"""Integrity by digest (an output on disk): the reading reports the sha256 of its safetensors
data section instead of writing it, and the broker compares it with the conversion's own, in
the pass that hashes the output for its answer (conversion/integrity.py). The same tensors
are verified and take the output's canonical digest; a changed value, name or shape is an
INTEGRITY_MISMATCH that says what differs."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from airlock_broker.conversion.integrity import Assurance, Extraction, assurance_of
from airlock_broker.conversion.outputs import ValidatedOutput
from airlock_broker.errors import AirlockError, Reason
from airlock_broker.validation.limits import OutputLimits
from airlock_broker.validation.safetensors_check import validate_safetensors
from airlock_sandbox.contract import OutputFormat

WEIGHTS = {"layer.weight": np.arange(4096 * 300, dtype=np.float32).reshape(4096, 300),
           "layer.bias": np.linspace(-1, 1, 300, dtype=np.float32)}


def _output(path: Path, tensors: dict[str, np.ndarray], *, digest: bool = False
            ) -> ValidatedOutput:
    save_file(tensors, str(path), metadata={"format": "pt"})
    info = validate_safetensors(path, OutputLimits(), digest=digest)
    return ValidatedOutput(format=OutputFormat.SAFETENSORS, size=info.canonical_size,
                           sha256=info.canonical_sha256, path=path,
                           write_into=lambda fd: None, safetensors=info)


def _reading(path: Path, tensors: dict[str, np.ndarray]) -> Extraction:
    """What a digest-only reading leaves: the header, a hole as long as the data, and the
    data's sha256 (taken here from a full file of the same tensors)."""
    full = path.with_suffix(".full")
    save_file(tensors, str(full), metadata={"format": "pt"})
    raw = full.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    with open(path, "wb") as fh:
        fh.write(raw[:header_end])
        fh.truncate(len(raw))
    data_sha256 = hashlib.sha256(raw[header_end:]).hexdigest()
    info = validate_safetensors(path, OutputLimits(), digest=False)
    extracted = ValidatedOutput(format=OutputFormat.SAFETENSORS, size=info.canonical_size,
                                sha256="", path=path, write_into=lambda fd: None,
                                safetensors=info)
    return Extraction(extracted, "", data_sha256=data_sha256)


def test_the_same_tensors_are_verified_and_take_the_outputs_canonical_digest(
        tmp_path: Path) -> None:
    output = _output(tmp_path / "out.safetensors", WEIGHTS)
    reading = _reading(tmp_path / "read.safetensors", WEIGHTS)
    assert os.stat(reading.output.path).st_blocks * 512 < 1024 * 1024  # type: ignore[union-attr]
    verified, assurance, _note = asyncio.run(assurance_of(output, reading))
    assert assurance is Assurance.INTEGRITY_VERIFIED
    expected = validate_safetensors(output.path, OutputLimits(), digest=True).canonical_sha256
    assert verified.sha256 == expected and verified.safetensors is not None
    assert verified.safetensors.canonical_sha256 == expected


@pytest.mark.parametrize(("change", "said"), [
    (lambda w: {**w, "layer.bias": w["layer.bias"] + np.float32(1e-6)}, "tensor data differs"),
    (lambda w: {**w, "extra": np.ones(3, np.float32)}, "tensor names differ"),
    (lambda w: {**w, "layer.bias": w["layer.bias"].reshape(3, 100)}, "dtype or shape differs"),
])
def test_a_conversion_that_differs_from_the_reading_is_a_mismatch_that_says_how(
        tmp_path: Path, change: object, said: str) -> None:
    output = _output(tmp_path / "out.safetensors", change(WEIGHTS))  # type: ignore[operator]
    reading = _reading(tmp_path / "read.safetensors", WEIGHTS)
    with pytest.raises(AirlockError) as caught:
        asyncio.run(assurance_of(output, reading))
    assert caught.value.reason is Reason.INTEGRITY_MISMATCH
    assert said in caught.value.message, caught.value.message


def test_a_digest_of_other_data_is_a_mismatch(tmp_path: Path) -> None:
    """The hole reads as zeros: were it ever compared as a file, it would differ too; the
    digest is what decides."""
    output = _output(tmp_path / "out.safetensors", WEIGHTS)
    reading = _reading(tmp_path / "read.safetensors", WEIGHTS)
    forged = Extraction(reading.output, "", data_sha256=hashlib.sha256(b"other").hexdigest())
    with pytest.raises(AirlockError) as caught:
        asyncio.run(assurance_of(output, forged))
    assert caught.value.reason is Reason.INTEGRITY_MISMATCH

"""A safetensors header is bounded by the work it costs to parse, not only by its bytes: a
header built to be costly (millions of tiny keys, long numbers, deep nesting) is refused before
the parser builds anything, with a reason; benign headers with many tensors still pass
(#11 §7: the parse used to cost ~22 times the header's size)."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from pathlib import Path

import pytest

from airlock_broker.errors import AirlockError, Reason
from airlock_broker.validation import OutputLimits, validate_safetensors

LIMITS = OutputLimits()
MiB = 1024**2


def st_file(tmp_path: Path, body: bytes, data: bytes = b"") -> Path:
    body += b" " * (-len(body) % 8)
    path = tmp_path / "out.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def costly_headers() -> dict[str, tuple[bytes, Reason, str]]:
    n = 1_400_000  # ~15 MiB, under the 16 MiB byte cap
    return {
        "tiny_keys": (b"{" + b",".join(b'"%x":0' % i for i in range(n)) + b"}",
                      Reason.OUTPUT_TOO_LARGE, "JSON values"),
        "tiny_metadata_keys": (b'{"__metadata__":{' + b",".join(
            b'"%x":""' % i for i in range(n)) + b"}}", Reason.OUTPUT_TOO_LARGE, "JSON values"),
        "long_numbers": (b'{"a":{"dtype":"F32","shape":[' + b",".join([b"9" * 4000] * 3000)
                         + b'],"data_offsets":[0,0]}}', Reason.OUTPUT_INVALID, "20 digits"),
        "deep_nesting": (b'{"a":' + b"[" * 4_000_000 + b"]" * 4_000_000 + b"}",
                         Reason.OUTPUT_INVALID, "recursion"),
    }


@pytest.mark.parametrize("name", sorted(costly_headers()))
def test_a_header_built_to_be_costly_is_refused_before_it_is_parsed(
    tmp_path: Path, name: str
) -> None:
    body, reason, words = costly_headers()[name]
    assert len(body) <= LIMITS.max_safetensors_header_bytes
    path = st_file(tmp_path, body)
    tracemalloc.start()
    began = time.process_time()
    try:
        with pytest.raises(AirlockError) as caught:
            validate_safetensors(path, LIMITS, second_opinion=False, digest=False)
        cpu = time.process_time() - began
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Reading the header costs its bytes (and decoding it as many again); parsing it into
    # objects would cost ~20 times that.
    assert peak < 3 * len(body) + MiB, f"refusing it cost {peak / MiB:.0f} MiB ({caught.value})"
    assert cpu < 2.0, f"refusing it cost {cpu:.2f} s of CPU ({caught.value})"
    assert caught.value.reason is reason and words in caught.value.message, caught.value


def test_a_benign_header_with_many_tensors_passes(tmp_path: Path) -> None:
    n = 20_000
    doc = {f"model.layers.{i}.weight": {"dtype": "F32", "shape": [1, 1, 1, 1],
                                         "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    body = json.dumps(doc, separators=(",", ":")).encode()
    info = validate_safetensors(st_file(tmp_path, body, b"\0" * (4 * n)), LIMITS,
                                second_opinion=False, digest=False)
    assert info.tensor_count == n


def test_the_budget_admits_the_tensor_cap_at_rank_5() -> None:
    from airlock_broker.validation.header_budget import check_header_work

    # The parse itself is slow at this size; the budget's arithmetic is what is checked here.
    entry = ('"t%d":{"data_offsets":[0,0],"dtype":"F32","shape":[1,1,1,1,1]}')
    body = ("{" + ",".join(entry % i for i in range(LIMITS.max_tensors)) + "}").encode()
    check_header_work(body, LIMITS)
    with pytest.raises(AirlockError) as caught:
        check_header_work(body, OutputLimits(max_safetensors_header_values=1_000_000))
    assert caught.value.reason is Reason.OUTPUT_TOO_LARGE
    assert "1200001 JSON values" in caught.value.message or "over the 1000000 cap" in \
        caught.value.message

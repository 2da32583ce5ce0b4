"""The safetensors validator refuses every hostile header shape and passes what real writers write.

Each refusal test is named after the defect a subverted converter could plant; the builders in
``hostile_outputs`` add exactly that one defect to an otherwise valid file.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airlock_broker.conversion.file_copy import write_canonical_safetensors
from airlock_broker.errors import AirlockError, Reason
from airlock_broker.validation import (
    OutputLimits,
    SafetensorsInfo,
    iter_canonical,
    same_canonical,
    validate_safetensors,
    with_digest,
)
from tests.unit.hostile_outputs import entry, st_file, two_f32_tensors

LIMITS = OutputLimits()
OUTPUT_REASONS = {Reason.OUTPUT_INVALID, Reason.OUTPUT_TOO_LARGE}


def write(tmp_path: Path, data: bytes, name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(
    path: Path, reason: Reason = Reason.OUTPUT_INVALID, limits: OutputLimits = LIMITS
) -> AirlockError:
    with pytest.raises(AirlockError) as caught:
        validate_safetensors(path, limits)
    assert caught.value.reason is reason, caught.value
    return caught.value


def canonical_bytes(path: Path, info: SafetensorsInfo, chunk_size: int = 1 << 20) -> bytes:
    return b"".join(iter_canonical(path, info, chunk_size))


def with_tensors(**tensors: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Header for the given entries; data is zeros up to the largest end offset."""
    end = max((e["data_offsets"][1] for e in tensors.values()), default=0)
    return dict(tensors), bytes(end)


# --- the length prefix ------------------------------------------------------------------------


def test_header_length_beyond_eof_is_rejected(tmp_path: Path) -> None:
    header, data = two_f32_tensors()
    real = len(st_file(header)) - 8
    refused(write(tmp_path, st_file(header, data, header_len=real + len(data) + 1)))


def test_header_length_2_pow_63_is_rejected(tmp_path: Path) -> None:
    header, data = two_f32_tensors()
    refused(write(tmp_path, st_file(header, data, header_len=2**63)))


def test_header_length_max_u64_is_rejected(tmp_path: Path) -> None:
    refused(write(tmp_path, st_file("{}", header_len=2**64 - 1)))


@pytest.mark.parametrize("length", [0, 1])
def test_header_length_zero_or_one_is_rejected(tmp_path: Path, length: int) -> None:
    refused(write(tmp_path, st_file("{}", header_len=length)))


def test_file_shorter_than_length_prefix_is_rejected(tmp_path: Path) -> None:
    refused(write(tmp_path, b"\x02\x00\x00"))


def test_header_over_policy_cap_is_too_large(tmp_path: Path) -> None:
    header = {"__metadata__": {"k": "v" * 5000}}
    small = OutputLimits(max_safetensors_header_bytes=4096)
    refused(write(tmp_path, st_file(header)), Reason.OUTPUT_TOO_LARGE, small)


# --- the JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["[]", '"x"', "12", "null"])
def test_header_not_starting_with_brace_is_rejected(tmp_path: Path, text: str) -> None:
    refused(write(tmp_path, st_file(text)))


@pytest.mark.parametrize("text", [" {}", "\n{}", "\t{}", "\ufeff{}"])
def test_leading_whitespace_or_bom_is_rejected(tmp_path: Path, text: str) -> None:
    # safetensors itself accepts leading whitespace, against the spec's MUST.
    refused(write(tmp_path, st_file(text)))


def test_invalid_utf8_is_rejected(tmp_path: Path) -> None:
    refused(write(tmp_path, st_file(b'{"__metadata__":{"k":"\xff\xfe"}}')))


def test_overlong_utf8_encoding_is_rejected(tmp_path: Path) -> None:
    refused(write(tmp_path, st_file(b'{"__metadata__":{"k":"\xc0\xaf"}}')))


@pytest.mark.parametrize("tail", ["\n", "\t", "x", "{}", "\x00"])
def test_padding_other_than_spaces_is_rejected(tmp_path: Path, tail: str) -> None:
    refused(write(tmp_path, st_file("{}" + tail, pad=False)))


def test_duplicate_tensor_key_is_rejected(tmp_path: Path) -> None:
    # safetensors keeps the last duplicate: two readers could see two different tensors.
    text = (
        '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    )
    refused(write(tmp_path, st_file(text, bytes(8))))


def test_duplicate_key_inside_an_entry_is_rejected(tmp_path: Path) -> None:
    text = '{"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}'
    refused(write(tmp_path, st_file(text, bytes(4))))


def test_duplicate_metadata_key_is_rejected(tmp_path: Path) -> None:
    refused(write(tmp_path, st_file('{"__metadata__":{"k":"1","k":"2"}}')))


def test_duplicate_metadata_block_is_rejected(tmp_path: Path) -> None:
    refused(write(tmp_path, st_file('{"__metadata__":{},"__metadata__":{"k":"v"}}')))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_constants_are_rejected(tmp_path: Path, constant: str) -> None:
    text = f'{{"a":{{"dtype":"F32","shape":[{constant}],"data_offsets":[0,4]}}}}'
    refused(write(tmp_path, st_file(text, bytes(4))))


def test_integer_beyond_digit_limit_is_rejected(tmp_path: Path) -> None:
    text = '{"a":{"dtype":"F32","shape":[' + "9" * 5000 + '],"data_offsets":[0,4]}}'
    refused(write(tmp_path, st_file(text, bytes(4))))


def test_deep_nesting_is_rejected_without_crashing(tmp_path: Path) -> None:
    depth = 200_000
    text = '{"__metadata__":' + "[" * depth + "]" * depth + "}"
    refused(write(tmp_path, st_file(text)))


@pytest.mark.parametrize(
    "metadata", [{"k": 1}, {"k": None}, {"k": ["v"]}, {"k": {"nested": "v"}}, ["k", "v"], "kv"]
)
def test_non_string_metadata_is_rejected(tmp_path: Path, metadata: Any) -> None:
    refused(write(tmp_path, st_file({"__metadata__": metadata})))


def test_lone_surrogate_in_metadata_is_rejected(tmp_path: Path) -> None:
    refused(write(tmp_path, st_file('{"__metadata__":{"k":"\\ud800"}}')))


# --- tensor entries ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["F4", "F6_E2M3", "F8_E8M0", "F8_E4M3FNUZ", "Q4", "f32", 4, None])
def test_unknown_or_exotic_dtype_is_rejected(tmp_path: Path, dtype: Any) -> None:
    header, data = with_tensors(a=entry("F32", [4], 0, 4))
    header["a"]["dtype"] = dtype
    refused(write(tmp_path, st_file(header, data)))


def test_extra_field_in_entry_is_rejected(tmp_path: Path) -> None:
    header, data = two_f32_tensors()
    header["a"]["strides"] = [1]
    refused(write(tmp_path, st_file(header, data)))


@pytest.mark.parametrize("missing", ["dtype", "shape", "data_offsets"])
def test_missing_field_in_entry_is_rejected(tmp_path: Path, missing: str) -> None:
    header, data = two_f32_tensors()
    del header["a"][missing]
    refused(write(tmp_path, st_file(header, data)))


@pytest.mark.parametrize("value", [[1, 2], "F32", 7, None])
def test_entry_that_is_not_an_object_is_rejected(tmp_path: Path, value: Any) -> None:
    refused(write(tmp_path, st_file({"a": value})))


@pytest.mark.parametrize("dim", [-1, True, False, 1.0, "2", None, [2]])
def test_negative_bool_float_or_string_dims_are_rejected(tmp_path: Path, dim: Any) -> None:
    header, data = with_tensors(a=entry("U8", [dim], 0, 1))
    refused(write(tmp_path, st_file(header, data)))


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], [0.0, 4], [True, 4], "0-4", [-4, 0]])
def test_malformed_data_offsets_are_rejected(tmp_path: Path, offsets: Any) -> None:
    header, data = with_tensors(a=entry("F32", [1], 0, 4))
    header["a"]["data_offsets"] = offsets
    refused(write(tmp_path, st_file(header, data)))


def test_rank_over_the_cap_is_rejected_before_dims_are_walked(tmp_path: Path) -> None:
    header, data = with_tensors(a=entry("U8", [1] * 65, 0, 1))
    refused(write(tmp_path, st_file(header, data)))
    header, data = with_tensors(a=entry("U8", [1] * 64, 0, 1))
    validate_safetensors(write(tmp_path, st_file(header, data), "ok"), LIMITS)


def test_shape_times_dtype_not_matching_length_is_rejected(tmp_path: Path) -> None:
    header, data = with_tensors(a=entry("F32", [3], 0, 8))
    refused(write(tmp_path, st_file(header, data)))


def test_shape_product_overflow_is_rejected(tmp_path: Path) -> None:
    # 2**32 * 2**32 * 2**32 * 4 wraps to 0 in 64-bit arithmetic; Python ints do not wrap.
    header, data = with_tensors(a=entry("F32", [2**32, 2**32, 2**32], 0, 0))
    refused(write(tmp_path, st_file(header, data)))


def test_dim_beyond_int64_is_rejected_even_in_an_empty_tensor(tmp_path: Path) -> None:
    header, data = with_tensors(a=entry("F32", [0, 2**64], 0, 0))
    refused(write(tmp_path, st_file(header, data)))


def test_end_before_begin_is_rejected(tmp_path: Path) -> None:
    header, data = with_tensors(a=entry("U8", [0], 4, 0), b=entry("U8", [4], 0, 4))
    refused(write(tmp_path, st_file(header, data)))


def test_overlapping_offsets_are_rejected(tmp_path: Path) -> None:
    # Many tensors over one region was a known amplification (DoS) trick.
    header, data = with_tensors(a=entry("F32", [2], 0, 8), b=entry("F32", [2], 4, 12))
    refused(write(tmp_path, st_file(header, data)))


def test_two_tensors_over_the_same_bytes_are_rejected(tmp_path: Path) -> None:
    header, data = with_tensors(a=entry("F32", [2], 0, 8), b=entry("F32", [2], 0, 8))
    refused(write(tmp_path, st_file(header, data)))


def test_hole_between_tensors_is_rejected(tmp_path: Path) -> None:
    # A hole is room for a second file inside this one (a polyglot).
    header, data = with_tensors(a=entry("F32", [1], 0, 4), b=entry("F32", [1], 8, 12))
    refused(write(tmp_path, st_file(header, data)))


def test_offsets_not_starting_at_zero_are_rejected(tmp_path: Path) -> None:
    header, _ = with_tensors(a=entry("F32", [1], 4, 8))
    refused(write(tmp_path, st_file(header, bytes(8))))


def test_trailing_bytes_after_data_are_rejected(tmp_path: Path) -> None:
    header, data = two_f32_tensors()
    refused(write(tmp_path, st_file(header, data + b"PK\x03\x04")))


def test_offsets_past_end_of_file_are_rejected(tmp_path: Path) -> None:
    header, data = two_f32_tensors()
    refused(write(tmp_path, st_file(header, data[:-4])))


def test_data_section_without_tensors_is_rejected(tmp_path: Path) -> None:
    refused(write(tmp_path, st_file("{}", b"hidden payload")))


def test_too_many_tensors_is_too_large(tmp_path: Path) -> None:
    header = {f"t{i}": entry("U8", [0], 0, 0) for i in range(11)}
    refused(write(tmp_path, st_file(header)), Reason.OUTPUT_TOO_LARGE, OutputLimits(max_tensors=10))


# --- tensor names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a\x00b", "line\nbreak", "\x1b[31mred", "tab\there", "del\x7f",
        "a\u2028b", "\x85", "a\u200bb",
    ],
)
def test_control_characters_in_names_are_rejected(tmp_path: Path, name: str) -> None:
    header, data = with_tensors(**{name: entry("U8", [1], 0, 1)})
    refused(write(tmp_path, st_file(header, data)))


def test_lone_surrogate_name_is_rejected(tmp_path: Path) -> None:
    text = '{"\\udc00":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    refused(write(tmp_path, st_file(text, b"\x00")))


def test_empty_name_is_rejected(tmp_path: Path) -> None:
    header, data = with_tensors(**{"": entry("U8", [1], 0, 1)})
    refused(write(tmp_path, st_file(header, data)))


@pytest.mark.parametrize("name", ["__meta__", "__metadata", "__"])
def test_reserved_dunder_names_are_rejected(tmp_path: Path, name: str) -> None:
    header, data = with_tensors(**{name: entry("U8", [1], 0, 1)})
    refused(write(tmp_path, st_file(header, data)))


def test_overlong_name_is_rejected(tmp_path: Path) -> None:
    header, data = with_tensors(**{"n" * 1025: entry("U8", [1], 0, 1)})
    refused(write(tmp_path, st_file(header, data)))


def test_symlinked_output_is_rejected(tmp_path: Path) -> None:
    header, data = two_f32_tensors()
    target = write(tmp_path, st_file(header, data), "real.safetensors")
    link = tmp_path / "model.safetensors"
    link.symlink_to(target)
    refused(link)


# --- metadata policy --------------------------------------------------------------------------


def test_metadata_over_the_caps_is_dropped_not_kept(tmp_path: Path) -> None:
    header, data = two_f32_tensors()
    header["__metadata__"] = {"format": "pt", "blob": "x" * 300}
    limits = OutputLimits(max_metadata_value_len=256)
    path = write(tmp_path, st_file(header, data))
    info = validate_safetensors(path, limits)
    assert info.metadata is None
    assert info.metadata_dropped is not None
    assert b"__metadata__" not in info.canonical_header
    assert safetensors.safe_open(str(path), "numpy").metadata()["blob"]  # it was there


@pytest.mark.parametrize("value", ["\x1b[31mred", "line\r\nINJECTED", "\u202eevil", "nul\x00"])
def test_metadata_with_control_characters_is_dropped(tmp_path: Path, value: str) -> None:
    header, data = two_f32_tensors()
    header["__metadata__"] = {"format": "pt", "note": value}
    info = validate_safetensors(write(tmp_path, st_file(header, data)), OutputLimits())
    assert info.metadata is None and info.metadata_dropped
    assert b"__metadata__" not in info.canonical_header


def test_metadata_with_too_many_entries_is_dropped(tmp_path: Path) -> None:
    header, data = two_f32_tensors()
    header["__metadata__"] = {str(i): "v" for i in range(5)}
    info = validate_safetensors(
        write(tmp_path, st_file(header, data)), OutputLimits(max_metadata_entries=4)
    )
    assert info.metadata is None and info.metadata_dropped


# --- the second opinion -----------------------------------------------------------------------


def test_reference_parser_refusal_rejects_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise safetensors.SafetensorError("simulated refusal")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    header, data = two_f32_tensors()
    error = refused(write(tmp_path, st_file(header, data)))
    assert "safetensors refused" in error.message


def test_the_second_opinion_reads_a_stand_in_with_no_name_in_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A named stand-in in the system's temporary directory could be opened or replaced by
    # whoever else writes there, and a broker killed mid-check left it behind.
    seen: list[tuple[str, int, int]] = []
    reference = safetensors.safe_open

    def watch(path: str, *args: Any, **kwargs: Any) -> Any:
        status = os.stat(path)
        seen.append((path, status.st_nlink, status.st_size))
        return reference(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", watch)
    header, data = two_f32_tensors()
    source = write(tmp_path, st_file(header, data))
    validate_safetensors(source, LIMITS)
    [(path, links, size)] = seen
    assert links == 0, f"the stand-in {path} has {links} link(s) in the file system"
    assert size == source.stat().st_size, (path, size)


def test_second_opinion_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("safe_open must not be called")

    monkeypatch.setattr(safetensors, "safe_open", explode)
    header, data = two_f32_tensors()
    validate_safetensors(write(tmp_path, st_file(header, data)), LIMITS, second_opinion=False)


def test_missing_safetensors_library_is_a_bug_not_a_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)
    header, data = two_f32_tensors()
    with pytest.raises(ImportError):
        validate_safetensors(write(tmp_path, st_file(header, data)), LIMITS)


# --- good files -------------------------------------------------------------------------------


def numpy_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "weight": rng.standard_normal((3, 5)).astype(np.float32),
        "bias": rng.standard_normal(5).astype(np.float64),
        "scalar": np.array(42, dtype=np.int64),  # 0-dim
        "empty": np.zeros((0, 7), dtype=np.float16),  # zero-size
        "also_empty": np.zeros((4, 0), dtype=np.int32),
        "mask": np.array([True, False, True]),
        "bytes": np.arange(10, dtype=np.uint8),
        "small": np.arange(6, dtype=np.int8).reshape(2, 3),
        "u16": np.arange(3, dtype=np.uint16),
        "i16": np.arange(3, dtype=np.int16),
        "u32": np.arange(3, dtype=np.uint32),
        "u64": np.arange(3, dtype=np.uint64),
        "complex": np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
        "model.layers.0.attn.q_proj.weight": rng.standard_normal((2, 2)).astype(np.float32),
        "ünïcode名": np.ones(2, dtype=np.float32),
    }


def check_canonical(path: Path, info: SafetensorsInfo) -> bytes:
    """The canonical stream hashes to the promised digest and has the promised length."""
    canon = canonical_bytes(path, info)
    assert len(canon) == info.canonical_size
    assert hashlib.sha256(canon).hexdigest() == info.canonical_sha256
    (n,) = struct.unpack("<Q", canon[:8])
    assert n % 8 == 0 and canon[8:9] == b"{"
    assert canon[8 : 8 + n] == info.canonical_header[8:]
    return canon


def test_numpy_written_file_passes_and_canonical_is_byte_identical(tmp_path: Path) -> None:
    tensors = numpy_tensors()
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "np", "note": "é"})
    info = validate_safetensors(path, LIMITS)
    assert info.tensor_count == len(tensors)
    assert info.metadata == {"format": "np", "note": "é"}
    assert info.data_bytes == sum(t.nbytes for t in tensors.values())
    canon = check_canonical(path, info)
    reloaded = safetensors.numpy.load(canon)
    assert set(reloaded) == set(tensors)
    for name, array in tensors.items():
        assert reloaded[name].dtype == array.dtype and reloaded[name].shape == array.shape
        assert reloaded[name].tobytes() == array.tobytes()


def test_torch_written_file_with_bf16_passes_and_reloads_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {
        "w": torch.randn(4, 3, dtype=torch.bfloat16),
        "h": torch.randn(2, dtype=torch.float16),
        "f8": torch.randn(3).to(torch.float8_e4m3fn),
        "f8b": torch.randn(3).to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    info = validate_safetensors(path, LIMITS)
    assert {"BF16", "F16", "F8_E4M3", "F8_E5M2", "F32"} <= info.dtypes
    canon = check_canonical(path, info)
    reloaded = safetensors.torch.load(canon)
    for name, tensor in tensors.items():
        assert reloaded[name].dtype == tensor.dtype
        assert reloaded[name].shape == tensor.shape
        assert bytes(reloaded[name].reshape(-1).view(torch.uint8).tolist()) == bytes(
            tensor.reshape(-1).view(torch.uint8).tolist()
        )


def test_empty_header_with_no_data_passes(tmp_path: Path) -> None:
    path = write(tmp_path, st_file("{}"))
    info = validate_safetensors(path, LIMITS)
    assert info.tensor_count == 0 and info.data_bytes == 0
    assert safetensors.numpy.load(check_canonical(path, info)) == {}


def test_trailing_space_padding_is_accepted_and_normalised(tmp_path: Path) -> None:
    header, data = two_f32_tensors()
    text = json.dumps(header, indent=2) + " " * 37  # pretty-printed and oddly padded
    path = write(tmp_path, st_file(text, data, pad=False))
    info = validate_safetensors(path, LIMITS)
    canon = check_canonical(path, info)
    assert b"\n" not in canon[:8 + 64] and b": " not in info.canonical_header
    assert safetensors.numpy.load(canon)["a"].tolist() == [1.0, 2.0]


def test_canonical_header_sorts_keys_and_is_the_same_for_equivalent_files(tmp_path: Path) -> None:
    header, data = two_f32_tensors()
    first = validate_safetensors(write(tmp_path, st_file(header, data), "one"), LIMITS)
    reordered = dict(reversed(list(header.items())))
    second = validate_safetensors(
        write(tmp_path, st_file(json.dumps(reordered, indent=1), data), "two"), LIMITS
    )
    assert first.canonical_header == second.canonical_header
    assert first.canonical_sha256 == second.canonical_sha256


def test_iter_canonical_respects_the_chunk_size(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(numpy_tensors(), str(path))
    info = validate_safetensors(path, LIMITS)
    chunks = list(iter_canonical(path, info, chunk_size=7))
    assert all(0 < len(c) <= 7 for c in chunks)
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == info.canonical_sha256


def test_output_changed_after_validation_is_not_streamed(tmp_path: Path) -> None:
    header, data = two_f32_tensors()
    path = write(tmp_path, st_file(header, data))
    info = validate_safetensors(path, LIMITS)
    path.write_bytes(st_file(header, data[::-1]))  # same size, new content and mtime
    os.utime(path, ns=(1, 1))
    with pytest.raises(AirlockError) as caught:
        b"".join(iter_canonical(path, info))
    assert caught.value.reason is Reason.OUTPUT_INVALID


def test_the_canonical_file_becomes_a_descriptors_whole_content(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(numpy_tensors(), str(path), metadata={"format": "np"})
    info = validate_safetensors(path, LIMITS)
    (tmp_path / "copy").write_bytes(b"x" * (info.canonical_size + 100))  # longer: truncated
    fd = os.open(tmp_path / "copy", os.O_WRONLY, 0o600)
    try:
        os.lseek(fd, 6, os.SEEK_SET)  # the descriptor's position is not used
        write_canonical_safetensors(path, info, fd)
    finally:
        os.close(fd)
    copied = (tmp_path / "copy").read_bytes()
    assert copied == canonical_bytes(path, info)
    assert hashlib.sha256(copied).hexdigest() == info.canonical_sha256


def test_output_changed_after_validation_is_not_copied(tmp_path: Path) -> None:
    header, data = two_f32_tensors()
    path = write(tmp_path, st_file(header, data))
    info = validate_safetensors(path, LIMITS)
    path.write_bytes(st_file(header, data[:-4]))  # shrank after validation
    fd = os.open(tmp_path / "copy", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(AirlockError) as caught:
            write_canonical_safetensors(path, info, fd)
    finally:
        os.close(fd)
    assert caught.value.reason is Reason.OUTPUT_INVALID


def _twins(tmp_path: Path, **changes: np.ndarray) -> tuple[Path, Path]:
    """The same tensors saved twice; the second file with ``changes`` applied."""
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    safetensors.numpy.save_file(numpy_tensors(), str(first), metadata={"k": "v"})
    safetensors.numpy.save_file({**numpy_tensors(), **changes}, str(second), metadata={"k": "v"})
    return first, second


def test_an_identical_file_takes_the_digest_of_its_twin(tmp_path: Path) -> None:
    first, second = _twins(tmp_path)
    unhashed = validate_safetensors(first, LIMITS, digest=False)
    hashed = validate_safetensors(second, LIMITS)
    assert unhashed.canonical_sha256 == "" and hashed.canonical_sha256
    assert same_canonical(first, unhashed, second, hashed)
    assert with_digest(first, unhashed).canonical_sha256 == hashed.canonical_sha256


def test_one_changed_byte_makes_the_twins_differ(tmp_path: Path) -> None:
    bias = numpy_tensors()["bias"].copy()
    bias[-1] = np.nextafter(bias[-1], np.inf)
    first, second = _twins(tmp_path, bias=bias)
    one, other = (validate_safetensors(p, LIMITS, digest=False) for p in (first, second))
    assert one.canonical_header == other.canonical_header  # same layout, other values
    assert not same_canonical(first, one, second, other)
    # The digest computed later is the file's own, not its twin's.
    assert with_digest(first, one).canonical_sha256 != with_digest(second, other).canonical_sha256


def test_a_twin_changed_after_validation_is_refused(tmp_path: Path) -> None:
    first, second = _twins(tmp_path)
    one, other = (validate_safetensors(p, LIMITS) for p in (first, second))
    second.write_bytes(second.read_bytes())  # same bytes, a new mtime
    os.utime(second, ns=(1, 1))
    with pytest.raises(AirlockError) as caught:
        same_canonical(first, one, second, other)
    assert caught.value.reason is Reason.OUTPUT_INVALID


def test_large_file_is_validated_without_loading_its_data(tmp_path: Path) -> None:
    # 256 MiB of (sparse) tensor data: validation and hashing must stream, not slurp.
    count = 64 * 1024 * 1024
    header = {"big": entry("F32", [count], 0, count * 4)}
    path = write(tmp_path, st_file(header))
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size + count * 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info = validate_safetensors(path, LIMITS)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert info.data_bytes == count * 4
    assert grown_kib < 64 * 1024


# --- fuzzing ----------------------------------------------------------------------------------


def _seed_file() -> bytes:
    header, data = two_f32_tensors()
    header["__metadata__"] = {"format": "pt"}
    header["c"] = entry("BF16", [2, 0], 12, 12)
    return st_file(header, data)


SEED = _seed_file()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 7)), min_size=1, max_size=4
    ),
    cut=st.one_of(st.none(), st.integers(0, len(SEED))),
    tail=st.binary(max_size=16),
)
def test_mutated_files_only_ever_fail_as_output_errors(
    tmp_path_factory: pytest.TempPathFactory,
    flips: list[tuple[int, int]],
    cut: int | None,
    tail: bytes,
) -> None:
    data = bytearray(SEED)
    for position, bit in flips:
        data[position] ^= 1 << bit
    mutated = bytes(data[:cut]) + tail if cut is not None else bytes(data)
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    path.write_bytes(mutated)
    try:
        info = validate_safetensors(path, LIMITS)
    except AirlockError as exc:
        assert exc.reason in OUTPUT_REASONS
        return
    # Whatever survives must be canonical and readable by the reference parser.
    assert len(safetensors.deserialize(canonical_bytes(path, info))) == info.tensor_count

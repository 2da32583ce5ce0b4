"""``tokenizer.model`` is carried over only when it is a SentencePiece model: a real one,
trained here with the sentencepiece library, passes; anything else named so is refused with
where and why, and the model-directory reader skips it with that sentence."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest

from airlock_client import _hf_dir
from airlock_sandbox import data_files
from airlock_sandbox import sentencepiece as _sentencepiece
from airlock_sandbox.formats import ArtifactFormat

TEXT = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen jugs",
        "how vexingly quick daft zebras jump", "sphinx of black quartz judge my vow"] * 20


@pytest.fixture(scope="module")
def model() -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=out,
                                   vocab_size=60, model_type="bpe", minloglevel=2)
    return out.getvalue()


def _field(number: int, wire: int, payload: bytes) -> bytes:
    """One protobuf field (the test's own encoder, for hand-made damage)."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    body = varint(len(payload)) + payload if wire == 2 else payload
    return varint(number << 3 | wire) + body


def test_a_trained_model_is_a_sentencepiece_model(model: bytes) -> None:
    assert _sentencepiece.problem(model) is None
    import sentencepiece as spm  # and the library reads it back: the fixture is real

    assert spm.SentencePieceProcessor(model_proto=model).get_piece_size() == 60


@pytest.mark.parametrize(("damage", "says"), [
    ("truncated", "are left"),
    ("json", "wire type"),
    ("pickle", ""),
    ("empty", "no pieces"),
    ("unknown field", "field 7"),
    ("piece not utf-8", "not UTF-8"),
    ("piece extra field", "field 9"),
    ("group", "wire type 3"),
    ("endless varint", "longer than 10 bytes"),
])
def test_anything_else_is_refused(model: bytes, damage: str, says: str) -> None:
    raw = {
        "truncated": model[:-3],
        "json": json.dumps({"model": "bpe"}).encode(),
        "pickle": pickle.dumps({"pieces": ["a"]}),
        "empty": b"",
        "unknown field": model + _field(7, 2, b"x"),
        "piece not utf-8": model + _field(1, 2, _field(1, 2, b"\xff\xfe")),
        "piece extra field": model + _field(1, 2, _field(1, 2, b"ok") + _field(9, 0, b"\x01")),
        "group": model + bytes([1 << 3 | 3]),
        "endless varint": model + _field(2, 0, b"\xff" * 11),
    }[damage]
    why = _sentencepiece.problem(raw)
    assert why is not None and why.startswith("not a SentencePiece model")
    assert says in why


def test_the_directory_reader_sends_it_as_sentencepiece_and_the_check_says_why_not(
        tmp_path: Path, model: bytes) -> None:
    """The client reads neither file: both go to the broker declared ``sentencepiece``, and
    the sandbox's check (this one) passes the model and refuses the pickle."""
    root = tmp_path / "m"
    root.mkdir()
    (root / "pytorch_model.bin").write_bytes(b"PK opaque")
    (root / "tokenizer.model").write_bytes(model)
    (root / "spiece.model").write_bytes(pickle.dumps("not a model"))
    found = _hf_dir.inspect(root)
    assert [(d.name, d.kind.value) for d in found.data_files] == [
        ("spiece.model", "sentencepiece"), ("tokenizer.model", "sentencepiece")]
    assert data_files.problem(ArtifactFormat.DATA_SENTENCEPIECE, model) is None
    assert data_files.problem(ArtifactFormat.DATA_SENTENCEPIECE, pickle.dumps("not a model")) \
        == "its leading bytes are those of pickle"

"""``tokenizer.model`` checked as what it claims to be: a SentencePiece ``ModelProto``.

Llama-family and T5 directories keep their tokenizer as a serialized protocol buffer, not
JSON. Before such a file is carried into an output directory it is walked, on the wire
format alone, without building any object from it: every field well-formed and inside the
file; at the top level only ModelProto's fields (1 ``pieces``; 2 ``trainer_spec``;
3 ``normalizer_spec``; 4 ``self_test_data``; 5 ``denormalizer_spec``), all length-delimited;
each piece holding only ``piece`` (UTF-8 text), ``score`` (a 32-bit float) and ``type`` (a
varint), with at least one piece. The specs are checked to be well-formed sequences of
fields (they hold options and numbers: nothing in them is code).

Hand-written rather than parsed by the protobuf runtime: the runtime would need sentencepiece's
schema, keeps unknown fields silently, and does not check proto2 strings for UTF-8; each of
those would have to be checked here anyway. The file is capped by the caller.
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT, I64, LEN, I32 = 0, 1, 2, 5
_MODEL_FIELDS = frozenset({1, 2, 3, 4, 5})
_PIECE_FIELDS = {1: LEN, 2: I32, 3: VARINT}
#: Large-vocabulary models (Gemma) hold 256 000 pieces.
MAX_PIECES = 1_000_000


def problem(raw: bytes) -> str | None:
    """Why ``raw`` is not a SentencePiece model (None: it is one)."""
    try:
        check(raw)
    except ValueError as exc:
        return f"not a SentencePiece model: {exc}"
    return None


def check(raw: bytes) -> None:
    """``ValueError`` saying where and why ``raw`` is not a SentencePiece model."""
    pieces = 0
    for number, wire, value, at in _fields(memoryview(raw), 0):
        if number not in _MODEL_FIELDS or wire != LEN:
            raise ValueError(f"field {number} (wire type {wire}) at byte {at} is not "
                                   "one of ModelProto's")
        assert isinstance(value, memoryview)
        if number == 1:
            pieces += 1
            if pieces > MAX_PIECES:
                raise ValueError(f"more than {MAX_PIECES} pieces")
            _check_piece(value, at)
        else:
            _check_message(value, at)
    if pieces == 0:
        raise ValueError("it holds no pieces")


def _check_piece(piece: memoryview, at: int) -> None:
    for number, wire, value, _ in _fields(piece, at):
        if _PIECE_FIELDS.get(number) != wire:
            raise ValueError(f"the piece at byte {at} has field {number} (wire type "
                                   f"{wire}), which a piece does not have")
        if number == 1:
            assert isinstance(value, memoryview)
            try:
                bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"the piece at byte {at} is not UTF-8 text") from None


def _check_message(message: memoryview, at: int) -> None:
    """A spec: a well-formed sequence of fields (their values are options and numbers)."""
    for _ in _fields(message, at):
        pass


def _fields(buf: memoryview, base: int) -> Iterator[tuple[int, int, int | memoryview, int]]:
    """(field number, wire type, value, offset of the field in the file), in order."""
    pos = 0
    end = len(buf)
    while pos < end:
        at = base + pos
        key, pos = _varint(buf, pos, at)
        number, wire = key >> 3, key & 7
        if number == 0 or number > 536_870_911:
            raise ValueError(f"field number {number} at byte {at}")
        if wire == VARINT:
            value, pos = _varint(buf, pos, at)
            yield number, wire, value, at
        elif wire in (I64, I32):
            size = 8 if wire == I64 else 4
            if pos + size > end:
                raise ValueError(f"a fixed-size field at byte {at} runs past its end")
            yield number, wire, int.from_bytes(buf[pos:pos + size], "little"), at
            pos += size
        elif wire == LEN:
            length, pos = _varint(buf, pos, at)
            if length > end - pos:
                raise ValueError(f"a field at byte {at} claims {length} bytes; "
                                       f"{end - pos} are left")
            yield number, wire, buf[pos:pos + length], at
            pos += length
        else:  # 3 and 4 (groups) are deprecated and never written by sentencepiece; 6, 7 none
            raise ValueError(f"wire type {wire} at byte {at}")


def _varint(buf: memoryview, pos: int, at: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(10):
        if pos + i >= len(buf):
            raise ValueError(f"a number at byte {at} runs past the end")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ValueError(f"a number at byte {at} is longer than 10 bytes")

"""A JSON reader for attacker-written documents: one meaning per document, or a refusal.

Python's ``json`` keeps the last of duplicate keys, accepts ``NaN`` / ``Infinity`` and skips
leading whitespace; other readers of the same bytes (serde_json in safetensors, for one) differ
on each, and a document two parsers read differently is a polyglot. So we refuse all three.
"""

from __future__ import annotations

import json
from typing import Any


class StrictJSONError(ValueError):
    """The text is not JSON a strict reader accepts; the message says why (never echoes it)."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise StrictJSONError(f"duplicate key {key[:64]!a}")
        doc[key] = value
    return doc


def _refuse_constant(name: str) -> Any:
    raise StrictJSONError(f"non-standard constant {name}")


_DECODER = json.JSONDecoder(object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)


def loads_strict(text: str, *, padding: str = " \t\r\n") -> Any:
    """Parse one JSON value that starts at ``text[0]`` and is followed only by ``padding``.

    Duplicate keys at any depth, ``NaN`` / ``Infinity``, leading whitespace, integers beyond
    Python's digit limit and nesting deep enough to exhaust the recursion limit are all refused
    with :class:`StrictJSONError`.
    """
    if not text or text[0] in " \t\r\n":
        raise StrictJSONError("empty document or leading whitespace")
    try:
        value, end = _DECODER.raw_decode(text, 0)
    except StrictJSONError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit, nesting
        raise StrictJSONError(str(exc)[:200]) from None
    if text[end:].strip(padding):
        raise StrictJSONError(f"unexpected data after the JSON value at offset {end}")
    return value

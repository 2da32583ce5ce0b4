"""Text from outside the broker, made safe to log, sign, send and show: one place decides how.

A sandbox's report, a validator's stderr, a peer's certificate name: any of it may come from an
attacker, with terminal escapes, line breaks that forge log records, bidi overrides, or sheer
length. Three uses, three renderings, one rule each:

* ``sanitize``: a sandbox's claims that go into messages, audit records and signed provenance:
  printable ASCII only, everything else ``?``, capped (with ``...``).
* ``printable_name``: a name a caller presented (certificate subject, peer address): printable
  Unicode kept (names are not always ASCII), everything else ``?``, capped.
* ``escape``: diagnostics for the operator (a validator's stderr): nothing dropped, every
  control character, line break, backslash and non-UTF-8 byte shown as its escape.
"""

from __future__ import annotations

import re

_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
MAX_DETAIL = 400
MAX_NAME = 253


def sanitize(text: object, limit: int = MAX_DETAIL) -> str:
    """Hostile text as printable ASCII, capped."""
    flat = _NOT_PRINTABLE_ASCII.sub("?", str(text))
    return flat if len(flat) <= limit else flat[:limit] + "..."


def printable_name(raw: bytes | str, limit: int = MAX_NAME) -> str:
    """A presented name with every non-printable character as ``?``, capped."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def escape(data: bytes) -> str:
    """``data`` as one line of printable text: control characters, line breaks, a backslash,
    and bytes that are not UTF-8 are shown as Python escapes (``\\x1b``, ``\\n``, ``\\\\``)."""
    text = data.decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode()
                   for c in text)

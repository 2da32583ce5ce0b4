"""Text from the broker, made safe to print on a terminal.

Error messages, report fields, formats, notes and principals come from the broker, and some
of it from the sandbox or the artifact before that (a converter's warning, a file name). A
terminal obeys what it is sent: an ANSI escape can rewrite the line above ("converted"), set
the window title, or on some terminals write files; a bidi override makes ``exe.onnx`` read as
``xnno.exe``; a newline forges a line of output. So the CLI passes every broker-supplied string
through ``printable`` before it prints it: every character that is not printable (C0 and C1
controls, DEL, escape, bidi overrides and isolates, zero-width and other format characters,
line and paragraph separators, unassigned code points) is shown as its ``\\xNN``/``\\uNNNN``
escape instead. ``--json`` output needs nothing more: ``json.dumps`` escapes all of these.
"""

from __future__ import annotations


def printable(value: object) -> str:
    """``str(value)`` with every non-printable character shown as its escape."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


__all__ = ["printable"]

"""A model directory's plain data files (``config.json``, tokenizer files, a README), checked
as what they claim to be before they are carried into a converted directory.

Such a file is converted like any artifact, in a sandbox of its own, so that the broker signs
a provenance record for it: the caller declares its kind (``json``, ``text`` or
``sentencepiece``: these have no magic bytes, so a declaration is what names them, and bytes
that look like any artifact format contradict it); the worker checks it with :func:`problem`
and writes it unchanged; the broker accepts the output only if it is the input, byte for byte
(conversion/outputs.py, :class:`EncodingCheck`). The client reads none of it: it chooses data
files by name and size, and skips one the sandbox refuses (its ``model_dir``).

A data file runs nothing: ``config.json`` can still steer a loader (``auto_map`` names code
for ``trust_remote_code``), which is why it is signed with the weights, not why it is refused.
"""

from __future__ import annotations

import codecs

from airlock_sandbox.formats import DATA_FORMATS, PREFIX_BYTES, ArtifactFormat, detect_prefix
from airlock_sandbox.strict_json import StrictJSONError, loads_strict

#: Per data file. Large-vocabulary ``tokenizer.json`` files reach ~35 MB (Gemma's).
MAX_DATA_BYTES = 64 * 1024 * 1024

#: The declarations that name a data file, and the formats they name.
KINDS: dict[str, ArtifactFormat] = {
    "json": ArtifactFormat.DATA_JSON,
    "text": ArtifactFormat.DATA_TEXT,
    "sentencepiece": ArtifactFormat.DATA_SENTENCEPIECE,
}


def problem(kind: ArtifactFormat, raw: bytes) -> str | None:
    """Why ``raw`` is not a file of ``kind`` (None: it is one)."""
    if kind not in DATA_FORMATS:
        return f"{kind.value} is not a data file's kind"
    if len(raw) > MAX_DATA_BYTES:
        return f"{len(raw)} bytes, over the {MAX_DATA_BYTES}-byte cap for data files"
    looks = detect_prefix(raw[:PREFIX_BYTES], len(raw))
    if looks is not ArtifactFormat.UNKNOWN:  # what the broker refuses from the same bytes
        return f"its leading bytes are those of {looks.value}"
    if kind is ArtifactFormat.DATA_SENTENCEPIECE:
        from airlock_sandbox import sentencepiece

        return sentencepiece.problem(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 (byte {exc.start})"
    if kind is ArtifactFormat.DATA_JSON:
        try:
            loads_strict(text)
        except StrictJSONError as exc:
            return f"not strict JSON: {str(exc)[:200]}"
        return None
    if "\0" in text:
        return "not text: holds a NUL character"
    return None


class EncodingCheck:
    """What the broker checks of a data file's output beyond its being the input, fed a block
    at a time: a JSON or text file is UTF-8 without NUL (no document is built, so the check's
    memory does not grow with the file: the sandbox parsed it)."""

    def __init__(self, kind: ArtifactFormat) -> None:
        self._decoder = (None if kind is ArtifactFormat.DATA_SENTENCEPIECE
                         else codecs.getincrementaldecoder("utf-8")())
        self._problem: str | None = None

    def feed(self, block: bytes) -> None:
        if self._decoder is None or self._problem is not None:
            return
        if b"\0" in block:
            self._problem = "holds a NUL byte"
            return
        try:
            self._decoder.decode(block)
        except UnicodeDecodeError:
            self._problem = "not UTF-8"

    def problem(self) -> str | None:
        """Why what was fed is not what its kind must be (None: it is); call once, at the end."""
        if self._decoder is not None and self._problem is None:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self._problem = "not UTF-8"
        return self._problem

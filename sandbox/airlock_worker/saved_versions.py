"""The scikit-learn version that saved a model, beside the one that reads it.

scikit-learn records its version in every estimator it pickles (``_sklearn_version``, kept in
skops files too) and warns, ``InconsistentVersionWarning``, when another version reads it:
the state of an estimator is that version's, and another may read it differently or not at
all. The worker runs with warnings off (__main__.py); while a model loads, :func:`noted` lets
that one warning through and reports it. Parity cannot see such a difference: it compares
the ONNX graph with this reading, not with the environment that saved the model.

The version and the class names come from the artifact: they are reported (capped, one
line), never acted on.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from .report import Report

#: At most this many of a version's estimator classes are named (last: a warning is cut at
#: ``REPORT_WARNING_CHARS``), each cut to this length.
MAX_NAMES = 3
MAX_NAME_CHARS = 40
MAX_VERSION_CHARS = 16


class Versions:
    """The version warnings one load raised."""

    def __init__(self) -> None:
        self.found: list[Any] = []

    def clause(self) -> str:
        """For a failed load's message: which versions saved and read the model, or ""."""
        pairs = sorted({_pair(w) for w in self.found})
        return "".join(f" (saved with scikit-learn {saved}, read with {reading})"
                       for saved, reading in pairs[:2])

    def sentences(self) -> list[str]:
        """One warning per version that saved part of the model, its classes named last."""
        by_version: dict[tuple[str, str], list[str]] = {}
        for w in self.found:
            names = by_version.setdefault(_pair(w), [])
            name = _short(getattr(w, "estimator_name", "?"), MAX_NAME_CHARS)
            if name not in names:
                names.append(name)
        out = []
        for (saved, reading), names in sorted(by_version.items()):
            listed = ", ".join(sorted(names)[:MAX_NAMES])
            if len(names) > MAX_NAMES:
                listed += f" and {len(names) - MAX_NAMES} more"
            out.append(f"saved with scikit-learn {saved}, read with {reading}, which may give "
                       f"other results; parity compares with this reading only ({listed})")
        return out


@contextlib.contextmanager
def noted(report: Report, versions: Versions) -> Iterator[None]:
    """While the block loads a model, collect scikit-learn's version warnings into
    ``versions`` and report them (other warnings stay as the worker's filters have them).
    Nothing to do where scikit-learn is not imported."""
    exceptions = sys.modules.get("sklearn.exceptions")
    category = getattr(exceptions, "InconsistentVersionWarning", None)
    if not isinstance(category, type):
        yield
        return
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def keep(message: Any, kind: type[Warning], *rest: Any, **named: Any) -> None:
            if isinstance(message, category):
                versions.found.append(message)
            else:
                shown(message, kind, *rest, **named)

        warnings.showwarning = keep
        warnings.filterwarnings("always", category=category)
        try:
            yield
        finally:
            for line in versions.sentences():
                report.warn(line)


def _pair(w: Any) -> tuple[str, str]:
    return (_short(getattr(w, "original_sklearn_version", "?"), MAX_VERSION_CHARS),
            _short(getattr(w, "current_sklearn_version", "?"), MAX_VERSION_CHARS))


def _short(value: Any, limit: int) -> str:
    """A string as it is, cut; anything else by its type's name (the pickle chose the value:
    its ``repr`` is not called)."""
    text = value if isinstance(value, str) else f"<{type(value).__name__}>"
    return text[:limit]

"""Docstrings no one reads in a sandbox, not parsed while a container imports.

SciPy (1.15 and later) rewrites the docstrings of about 450 functions while ``scipy.stats``
imports: its decorators (``xp_capabilities``, ``_axis_nan_policy``, ``_transition_to_rng``,
deprecations) parse each docstring into numpydoc sections, add a note or a parameter, and
render it back. scikit-learn imports ``scipy.stats`` (``sklearn.utils.fixes``), so every
sklearn container paid it: a sixth of its warm-up (the sandbox image, ``--cpus 1``, 6 runs
each: 851-923 ms of CPU with the parse, 731-782 ms without).

What is skipped is the parse alone: the sections stay empty, so each rewritten docstring holds
only what the decorator added. Nothing else reads those sections (signatures come from
``inspect``), so no function behaves differently; the conversions give the same bytes
(``tests/unit/test_doc_parsing.py``). A SciPy that renames the parser leaves this a no-op
(the test fails then, to say so); one without it, or without SciPy, is left alone.
"""

from __future__ import annotations

import importlib


def skip_scipy_docstring_parsing() -> bool:
    """Before anything imports ``scipy.stats``: SciPy's docstring parser parses nothing.
    True if it was found and replaced."""
    try:
        docscrape = importlib.import_module("scipy._lib._docscrape")
    except ImportError:
        return False
    reader = getattr(docscrape, "NumpyDocString", None)
    if reader is None or not callable(getattr(reader, "_parse", None)):
        return False
    reader._parse = _no_sections
    return True


def _no_sections(self: object) -> None:
    """``NumpyDocString._parse`` that leaves every section at its empty default."""

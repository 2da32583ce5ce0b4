"""``import skops.io`` without importing torch.

skops builds its default trusted-type list at import time from scikit-learn's
``all_estimators()``, which walks every sklearn package with ``pkgutil.walk_packages``. The walk
imports each *package* to look inside it, even those whose modules it then skips, and one of
them is ``sklearn.externals.array_api_compat.torch``, whose ``__init__`` imports torch: in the
sandbox image that is 1.3 of the 1.5 CPU-s ``import skops.io`` costs, paid by every MLflow
sklearn model MLflow 3 saved (it saves them as skops), in a container whose profile never needs
torch. No estimator lives under ``sklearn.externals`` (``all_estimators`` skips it), so the
trusted list comes out the same (``tests/unit/test_worker_skops_import.py`` compares it).

While skops is imported, that one package is hidden (``deferred_imports.hidden``: importing
it raises ImportError, which ``walk_packages`` ignores); right after, a later import of it works
as usual. Nothing else is hidden, and torch is not touched: a job that needs torch still
imports it.
"""

from __future__ import annotations

import sys
from types import ModuleType

from .deferred_imports import hidden

#: The sklearn package whose import drags torch into ``all_estimators()``'s walk.
TORCH_SHIM = "sklearn.externals.array_api_compat.torch"


def import_skops_io() -> ModuleType:
    """``skops.io``, imported (once per process) without importing torch for it."""
    loaded = sys.modules.get("skops.io")
    if loaded is not None:
        return loaded
    with hidden(frozenset({TORCH_SHIM})):
        import skops.io
    return skops.io

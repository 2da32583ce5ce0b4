"""The fitted estimators inside a scikit-learn model, as its converters see them.

``get_params(deep=True)`` lists a ``ColumnTransformer``'s transformers as they were given,
unfitted (it fits clones, ``transformers_``); this walks what was fitted: pipelines' steps,
column transformers' fitted transformers, unions' members. The model is the artifact's
object: the walk is bounded in depth and in the estimators it visits.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 8
MAX_VISITED = 4096


def walk(model: Any) -> list[Any]:
    """``model`` and every fitted estimator in it, to ``MAX_DEPTH`` and ``MAX_VISITED``."""
    out: list[Any] = []
    todo: list[tuple[Any, int]] = [(model, 0)]
    while todo and len(out) < MAX_VISITED:
        step, depth = todo.pop()
        if isinstance(step, str) or step is None:  # "drop", "passthrough"
            continue
        out.append(step)
        if depth >= MAX_DEPTH:
            continue
        for attribute in ("steps", "transformers_", "transformer_list"):
            entries = getattr(step, attribute, None)
            if isinstance(entries, list):
                todo.extend((e[1], depth + 1) for e in entries[:MAX_VISITED]
                            if isinstance(e, tuple) and len(e) >= 2)
    return out

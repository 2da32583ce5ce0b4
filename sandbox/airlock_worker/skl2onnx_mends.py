"""One mend to skl2onnx (1.20.0, the newest release) for the onnx the image pins (1.23).

skl2onnx's ``HistGradientBoostingClassifier`` / ``Regressor`` converter writes a leaf's
``nodes_missing_value_tracks_true`` as Python ``False`` among the branches' integers
(``tree_ensemble.add_tree_to_attribute_pairs_hist_gradient_boosting``), and onnx's
``make_attribute`` now refuses a boolean in an ``ints`` attribute ("Expected an int, got a
boolean"): every histogram gradient boosting model, scikit-learn's recommended boosting
model, failed to convert. :func:`apply` makes the value an ``int`` on its way in, the value
it already was for a branch (``missing_go_to_left``, a ``uint8``); nothing else changes, and
parity checks the graph as for every model. Remove it once skl2onnx writes an integer.
"""

from __future__ import annotations

from typing import Any


def apply() -> None:
    """Idempotent; imports only what skl2onnx's converters already imported."""
    from skl2onnx.common import tree_ensemble

    add_node = tree_ensemble.add_node
    if getattr(add_node, "airlock_mended", False):
        return

    def mended(*args: Any, nodes_missing_value_tracks_true: Any = 0, **kwargs: Any) -> Any:
        return add_node(*args, nodes_missing_value_tracks_true=int(
            nodes_missing_value_tracks_true), **kwargs)

    mended.airlock_mended = True  # type: ignore[attr-defined]
    tree_ensemble.add_node = mended

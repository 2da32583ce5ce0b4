"""Two mends to skl2onnx (1.20.0, the newest release), each a value it writes wrong.

* Histogram gradient boosting: its converter writes a leaf's
  ``nodes_missing_value_tracks_true`` as Python ``False`` among the branches' integers
  (``tree_ensemble.add_tree_to_attribute_pairs_hist_gradient_boosting``), and onnx 1.23's
  ``make_attribute`` refuses a boolean in an ``ints`` attribute ("Expected an int, got a
  boolean"): every ``HistGradientBoostingClassifier`` / ``Regressor`` failed to convert. The
  value goes in as the ``int`` it already is for a branch.
* Decision trees and the ensembles made of them (forests, extra trees, gradient boosting,
  isolation forests): scikit-learn routes a missing value (NaN) at each split the way it
  learned (``tree_.missing_go_to_left``, from the rows with NaN it was fitted on), and
  ``tree_ensemble.add_tree_to_attribute_pairs`` never reads it, so every NaN took the
  ``false`` branch in ONNX Runtime: a forest fitted on data with missing values converted,
  parity passed (it draws no NaN), and the graph gave other labels for 30 % of the rows with
  one (onnx/sklearn-onnx#1253). The flag is copied, as the histogram converter already does:
  the ``true`` branch of ``BRANCH_LEQ`` is scikit-learn's left child.

:func:`apply` installs both once; nothing else changes, and parity checks every graph. Remove
them once skl2onnx writes these values itself.
"""

from __future__ import annotations

import importlib
from typing import Any

#: skl2onnx's converter modules that bind ``add_tree_to_attribute_pairs`` at import.
_TREE_CONVERTERS = ("decision_tree", "random_forest", "gradient_boosting", "isolation_forest")


def apply() -> None:
    """Idempotent; imports only what skl2onnx's converters already imported."""
    from skl2onnx.common import tree_ensemble

    if not getattr(tree_ensemble.add_node, "airlock_mended", False):
        tree_ensemble.add_node = _integer_flags(tree_ensemble.add_node)
    original = tree_ensemble.add_tree_to_attribute_pairs
    if getattr(original, "airlock_mended", False):
        return
    mended = _routing_missing_values(original)
    tree_ensemble.add_tree_to_attribute_pairs = mended
    for name in _TREE_CONVERTERS:
        module = importlib.import_module(f"skl2onnx.operator_converters.{name}")
        if getattr(module, "add_tree_to_attribute_pairs", None) is original:
            module.add_tree_to_attribute_pairs = mended  # type: ignore[attr-defined]


def _integer_flags(add_node: Any) -> Any:
    def mended(*args: Any, nodes_missing_value_tracks_true: Any = 0, **kwargs: Any) -> Any:
        return add_node(*args, nodes_missing_value_tracks_true=int(
            nodes_missing_value_tracks_true), **kwargs)

    mended.airlock_mended = True  # type: ignore[attr-defined]
    return mended


def _routing_missing_values(add_tree: Any) -> Any:
    def mended(attr_pairs: dict[str, list[Any]], is_classifier: bool, tree: Any,
               *args: Any, **kwargs: Any) -> Any:
        first = len(attr_pairs["nodes_nodeids"])
        result = add_tree(attr_pairs, is_classifier, tree, *args, **kwargs)
        left = getattr(tree, "missing_go_to_left", None)
        flags = attr_pairs.get("nodes_missing_value_tracks_true")
        if left is not None and flags is not None:
            ids, modes = attr_pairs["nodes_nodeids"], attr_pairs["nodes_modes"]
            for k in range(first, len(ids)):
                if modes[k] != "LEAF":
                    flags[k] = int(left[ids[k]])
        return result

    mended.airlock_mended = True  # type: ignore[attr-defined]
    return mended

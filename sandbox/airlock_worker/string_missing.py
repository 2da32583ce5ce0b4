"""A missing value in a string column: NaN to scikit-learn, the empty string in the graph.

The pipeline scikit-learn's documentation gives for mixed types imputes a string column
before encoding it, ``SimpleImputer(strategy="most_frequent")`` with its default
``missing_values=np.nan`` (pandas' marker in an object column; ``None`` is another). An ONNX
string tensor cannot hold NaN, and skl2onnx's imputer converter refuses such a marker for
string inputs ("implemented when the missing values are string"), so the most common tabular
model did not convert. Here those imputers are converted with the empty string as their
marker (skl2onnx's own string path, on a copy: the model is not changed): the graph imputes
``""`` where the model imputes NaN, and the result says so, naming the columns. Where the
model has seen ``""`` as a value (an encoder's category, an imputer's fill), the empty string
cannot mean missing: nothing changes and skl2onnx's refusal stands.

Parity exercises it (column_inputs.py): such a column's draws include ``""`` for the graph and
the model's own marker for the original.
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Any

import numpy as np

from . import fitted_steps

#: What a missing value is in the graph's string inputs.
EMPTY = ""


def is_marker(value: Any) -> bool:
    """Whether ``missing_values`` is a marker a string tensor cannot carry: NaN, None or
    pandas' NA."""
    return (value is None or (isinstance(value, float) and math.isnan(value))
            or type(value).__name__ == "NAType")


def imputes_strings(step: Any) -> bool:
    """A fitted ``SimpleImputer`` of string columns whose marker is NaN, None or NA."""
    impute = sys.modules.get("sklearn.impute")  # imported by a model that holds one
    simple = getattr(impute, "SimpleImputer", None)
    if not isinstance(simple, type) or type(step) is not simple or not is_marker(
            getattr(step, "missing_values", EMPTY)):
        return False
    stats = getattr(step, "statistics_", None)
    return (isinstance(stats, np.ndarray) and stats.dtype.kind == "O" and stats.size > 0
            and all(isinstance(v, str) for v in stats.tolist()))


def conversion_functions(model: Any) -> dict[type, Any] | None:
    """skl2onnx's ``custom_conversion_functions`` for ``model``: its string imputers converted
    with ``""`` for their marker, or None when it has none or has seen ``""`` as a value."""
    steps = fitted_steps.walk(model)
    imputers = [s for s in steps if imputes_strings(s)]
    if not imputers or any(_has_empty(s) for s in steps):
        return None
    from skl2onnx.common.data_types import StringTensorType
    from skl2onnx.operator_converters.imputer_op import convert_sklearn_imputer

    def convert(scope: Any, operator: Any, container: Any) -> None:
        original = operator.raw_operator
        if not (imputes_strings(original)
                and all(isinstance(i.type, StringTensorType) for i in operator.inputs)):
            convert_sklearn_imputer(scope, operator, container)
            return
        stand_in = copy.copy(original)
        stand_in.missing_values = EMPTY
        operator.raw_operator = stand_in
        try:
            convert_sklearn_imputer(scope, operator, container)
        finally:
            operator.raw_operator = original

    return {type(imputers[0]): convert}


def _has_empty(step: Any) -> bool:
    """Whether a fitted step has seen ``""`` as a value: an encoder's category, an imputer's
    statistic or fill value."""
    found = getattr(step, "categories_", None)
    arrays = list(found) if isinstance(found, list) else []
    stats = getattr(step, "statistics_", None)
    if isinstance(stats, np.ndarray):
        arrays.append(stats)
    fill = getattr(step, "fill_value", None)
    if isinstance(fill, str) and fill == EMPTY:
        return True
    return any(isinstance(a, np.ndarray) and a.dtype.kind in "OUS"
               and EMPTY in a.reshape(-1).tolist() for a in arrays)

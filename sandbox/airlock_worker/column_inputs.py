"""One ONNX input per column, for a scikit-learn model fitted on a pandas DataFrame.

A model fitted on a DataFrame records its column names (``feature_names_in_``), and a
``ColumnTransformer`` in it selects columns by those names, so the default single ``X`` input
cannot be converted: skl2onnx wants one input per column, named as the column, each
``[rows, 1]``, as its documentation converts a DataFrame (it rewrites a name C-style where
needed, ``first name`` -> ``first_name``: ``bind`` pairs inputs and columns by position).
The types are read from the fitted model, never from data (there is none in a pickle):

* a column an encoder consumes (``categories_``: one-hot, ordinal, target encoders, alone or
  first in a pipeline) has its categories' type: strings are a string input, integers
  ``int64``;
* any other column is ``float32``, as the single input would have been (an integer column
  fed as floats converts the same; the graph casts).

Columns the model drops stay inputs, so the graph takes the same DataFrame the model did.

Parity runs the original model on a DataFrame built from the same feeds (pandas: in the image
for this, hidden from the warm-up and imported only then), on rows drawn where the model has
seen data:
each categorical column from its own categories (an imputed one missing an eighth of the time:
``""`` to the graph, the model's marker to the model, string_missing.py), each numeric one
from the first step of its transformer that says where its data lay (parity_inputs.py),
standard normals otherwise. A
string column no encoder lists categories for cannot be drawn; parity then runs on the
model's example only, or not at all, with a warning.

Everything read here is the artifact's object: attributes of the wrong kind or size give no
columns (the caller is asked for the input shapes, as before), and every list is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from airlock_sandbox.contract import TensorSpec

from . import parity_inputs, string_missing
from .parity import Sampler, Unsupported, random_feeds

#: The most columns made inputs; a wider model is asked for its input shapes.
MAX_COLUMNS = 4096
#: The longest column name taken as an input name.
MAX_NAME_CHARS = 256
#: How deep pipelines nest before the first step that sees the columns is looked for.
MAX_DEPTH = 8

#: A string column's dtype (``spec_types.SKL2ONNX_TYPES``: a StringTensorType input).
STRING = "str"
#: The share of an imputed string column's parity draws that are missing.
MISSING_SHARE = 0.125


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str
    #: The values parity draws from (an encoder's categories); None: see ``draw``.
    values: np.ndarray | None = None
    #: Otherwise rows drawn for its transformer's columns (shared by them, drawn once per
    #: batch), of which this column is ``index``; None: no fitted step says where it lay.
    draw: parity_inputs.Draw | None = None
    index: int = 0
    #: The graph's input for it: skl2onnx names it after the column, rewritten C-style where
    #: needed (``first name`` -> ``first_name``); see ``bind``.
    feed: str = ""
    #: A string column the model imputes: ``(its marker,)`` (NaN, None), which the graph
    #: takes as ``""`` (string_missing.py); parity draws some of it. None: not imputed.
    missing: tuple[Any] | None = None

    @property
    def input_name(self) -> str:
        return self.feed or self.name


def columns(model: Any) -> list[Column]:
    """The model's columns in fitting order, typed and with their draws; [] when it was not
    fitted on named columns or they cannot be read."""
    try:
        names = _names(getattr(model, "feature_names_in_", None))
        if not names:
            return []
        found: dict[str, Column] = {}
        transformer = _first_step(model)
        for step, selected in _transformers(transformer, names):
            found.update(_typed(step, selected))
        return [found.get(name, Column(name, "float32")) for name in names]
    except Exception:  # the artifact's attributes: odd ones mean no columns
        return []


def specs(cols: list[Column]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(c.name, c.dtype, (-1, 1)) for c in cols)


def bind(cols: list[Column], graph_inputs: list[str]) -> list[Column]:
    """The columns with the names the converted graph gave their inputs: skl2onnx keeps the
    order it was given, so the k-th input is the k-th column."""
    if len(graph_inputs) != len(cols):
        return cols
    return [replace(c, feed=name) for c, name in zip(cols, graph_inputs, strict=True)]


def describe(cols: list[Column], most: int = 8) -> str:
    """``city (string), age (float32), first_name (string, column 'first name') ... and N
    more``, for the report: what a caller feeds."""
    shown = ", ".join(
        f"{c.input_name} ({'string' if c.dtype == STRING else c.dtype}"
        + (f", column {c.name[:64]!r})" if c.input_name != c.name else ")")
        for c in cols[:most])
    return shown + (f" and {len(cols) - most} more" if len(cols) > most else "")


def matches(cols: list[Column], inputs: tuple[TensorSpec, ...]) -> bool:
    """Whether a request's (or an MLflow signature's) inputs are these columns, one each."""
    return (len(inputs) == len(cols) > 1
            and {s.name for s in inputs} == {c.name for c in cols}
            and all(len(s.shape) == 2 and s.shape[1] == 1 for s in inputs))


def sampler(cols: list[Column]) -> Sampler:
    """Parity feeds ``[rows, 1]`` per column, drawn as the module says."""
    by_name = {c.input_name: c for c in cols}

    def sample(inputs: list[dict[str, Any]], rows: int, seed: int) -> dict[str, np.ndarray]:
        if {spec["name"] for spec in inputs} != set(by_name):
            return random_feeds(inputs, rows, seed)
        rng = np.random.default_rng(seed)
        feeds = {}
        drawn: dict[int, np.ndarray] = {}  # one draw per transformer, whatever its width
        for spec in inputs:
            column = by_name[spec["name"]]
            dtype = np.dtype(spec["dtype"])
            if column.values is not None:
                values = rng.choice(column.values, size=rows)
                if column.missing is not None:  # some missing: "" to the graph
                    values[rng.random(rows) < MISSING_SHARE] = string_missing.EMPTY
            elif column.draw is not None:
                key = id(column.draw)
                if key not in drawn:
                    drawn[key] = column.draw(rng, rows)
                values = drawn[key][:, column.index]
            elif dtype.kind in "OUS":
                raise Unsupported(f"no encoder of this model lists the values of string column "
                                  f"{column.name[:64]!r}")
            else:
                values = rng.standard_normal(rows)
            feeds[column.input_name] = np.asarray(values).astype(dtype).reshape(rows, 1)
        return feeds

    return sample


def frame(cols: list[Column], feeds: dict[str, np.ndarray]) -> Any:
    """The DataFrame the original model is run on: its columns in fitting order, floats in
    float64 as most models are fitted, strings as Python strings."""
    import pandas as pd

    data = {}
    for column in cols:
        values = np.asarray(feeds[column.input_name]).reshape(-1)
        if column.missing is not None:  # the graph's "" is the model's own marker, kept as
            # it is in an object column (pandas' string dtype would make None a NaN)
            data[column.name] = pd.Series(
                [column.missing[0] if v == string_missing.EMPTY else v for v in values.tolist()],
                dtype=object)
            continue
        data[column.name] = values.astype(np.float64) if values.dtype.kind == "f" else values
    return pd.DataFrame(data)


# -- reading the fitted model ---------------------------------------------------------------


def _names(raw: Any) -> list[str]:
    if not isinstance(raw, np.ndarray) or raw.ndim != 1 or not 1 <= raw.size <= MAX_COLUMNS:
        return []
    names = [n for n in raw.tolist() if isinstance(n, str) and 0 < len(n) <= MAX_NAME_CHARS]
    return names if len(names) == raw.size and len(set(names)) == len(names) else []


def _first_step(model: Any) -> Any:
    for _ in range(MAX_DEPTH):
        steps = getattr(model, "steps", None)
        if not isinstance(steps, list) or not steps:
            break
        model = steps[0][1]
    return model


def _transformers(step: Any, names: list[str]) -> list[tuple[Any, list[str]]]:
    """``(transformer, its columns)`` of a fitted ColumnTransformer; [] for anything else."""
    fitted = getattr(step, "transformers_", None)
    if not isinstance(fitted, list) or len(fitted) > MAX_COLUMNS:
        return []
    out = []
    for entry in fitted:
        if not isinstance(entry, tuple) or len(entry) != 3 or isinstance(entry[1], str):
            continue  # "drop" and "passthrough": the column keeps the default type
        out.append((entry[1], _selected(entry[2], names)))
    return out


def _selected(spec: Any, names: list[str]) -> list[str]:
    """A transformer's columns as names: a name, an index, a list of either, a boolean mask."""
    if isinstance(spec, str | int | np.integer):
        spec = [spec]
    values = np.asarray(spec)
    if values.ndim != 1 or values.size > len(names):
        return []
    if values.dtype.kind == "b":
        return [n for n, keep in zip(names, values.tolist(), strict=False) if keep]
    picked = []
    for value in values.tolist():
        if isinstance(value, str) and value in names:
            picked.append(value)
        elif isinstance(value, int) and -len(names) <= value < len(names):
            picked.append(names[value])
    return picked


def _typed(transformer: Any, selected: list[str]) -> dict[str, Column]:
    """The selected columns typed by the first step of ``transformer`` that has seen them."""
    steps = [transformer]
    inner = getattr(transformer, "steps", None)
    if isinstance(inner, list) and inner:
        steps = [s[1] for s in inner[:MAX_DEPTH] if isinstance(s, tuple) and len(s) == 2]
    categories = None
    draw = None
    missing = None
    for step in steps:
        if getattr(step, "n_features_in_", None) != len(selected):
            break  # a step that changed the columns: what follows sees other features
        if string_missing.imputes_strings(step):
            missing = (step.missing_values,)
        found = getattr(step, "categories_", None)
        if isinstance(found, list) and len(found) == len(selected):
            categories = [np.asarray(c) for c in found]
            break
        draw = parity_inputs.draw_for(step)
        if draw is not None:
            break
    out = {}
    for j, name in enumerate(selected):
        if categories is not None:
            out[name] = _categorical(name, categories[j])
            if missing is not None and out[name].dtype == STRING:
                out[name] = replace(out[name], missing=missing)
        else:
            out[name] = Column(name, "float32", draw=draw, index=j)
    return out


def _categorical(name: str, values: np.ndarray) -> Column:
    seen = values[:parity_inputs.MAX_VALUES] if values.ndim == 1 else values.reshape(-1)[:0]
    if seen.dtype.kind in "OUS":
        kept = np.array([v for v in seen.tolist() if isinstance(v, str)], dtype=object)
        return Column(name, STRING, kept if kept.size else None)
    if seen.dtype.kind in "iu":
        return Column(name, "int64", seen.astype(np.int64) if seen.size else None)
    if seen.dtype.kind in "bf":  # only categories the float32 input can carry exactly
        kept = seen.astype(np.float64)
        kept = kept[~np.isnan(kept) & (kept.astype(np.float32).astype(np.float64) == kept)]
        return Column(name, "float32", kept if kept.size else None)
    return Column(name, "float32")

"""An MLflow model's ``input_example``, read as data for the parity check: the rows its author
chose are the most realistic inputs there are. Bounded JSON of numbers, and strings in a
DataFrame's columns (one array per column, all numbers or all strings, cells missing among
them); anything else is skipped with a warning and parity runs on generated inputs alone.

MLflow writes the member ``saved_input_example_info.artifact_path`` names (``input_example.json``)
as: a nested list (``type: ndarray``, MLflow 3), ``{"inputs": ...}`` (MLflow 2's tf-serving
form), a mapping of input names to nested lists, or a DataFrame in pandas' ``split`` orient
(``{"columns": [...], "data": [[...]]}``, ``type: dataframe``).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from airlock_sandbox.bundle import BundleError, contained

#: An example is a few rows; a larger file is not worth reading for parity.
MAX_EXAMPLE_BYTES = 1024 * 1024
MAX_EXAMPLE_ROWS = 256
MAX_EXAMPLE_INPUTS = 64

#: Input name (``None``: the model's single input) -> rows.
Example = dict[str | None, np.ndarray]


def read(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], mlmodel: dict[str, Any],
         warn: Callable[[str], None]) -> Example | None:
    info = mlmodel.get("saved_input_example_info")
    if not isinstance(info, dict) or not isinstance(info.get("artifact_path"), str):
        return None
    try:
        name = contained(info["artifact_path"])
    except BundleError:
        name = ""
    member = members.get(name)
    if member is None:
        warn("the MLflow input example is not in the bundle; parity uses generated inputs")
        return None
    if member.file_size > MAX_EXAMPLE_BYTES:
        warn(f"the MLflow input example is {member.file_size} bytes (more than "
             f"{MAX_EXAMPLE_BYTES}); parity uses generated inputs")
        return None
    try:
        with zf.open(member) as fh:
            doc = json.loads(fh.read(MAX_EXAMPLE_BYTES + 1))
        return parse(doc, str(info.get("type", "")))
    except (ValueError, TypeError, OSError, zipfile.BadZipFile) as exc:
        warn(f"the MLflow input example was not used for parity: {str(exc)[:200]}")
        return None


def parse(doc: Any, kind: str) -> Example:
    """The example's arrays, or ValueError saying why it cannot serve."""
    if kind == "dataframe" or (isinstance(doc, dict) and "columns" in doc and "data" in doc):
        if not isinstance(doc, dict) or not isinstance(doc.get("columns"), list):
            raise ValueError("a DataFrame example without columns")
        try:
            rows = _numbers(doc.get("data"))
        except ValueError:  # strings in it: one array per named column
            return _columns(doc["columns"], doc.get("data"))
        if rows.ndim != 2 or rows.shape[1] != len(doc["columns"]):
            raise ValueError("the DataFrame example's data do not match its columns")
        return {None: rows}
    if isinstance(doc, dict) and set(doc) == {"inputs"}:
        doc = doc["inputs"]
    if isinstance(doc, dict):
        if not doc or len(doc) > MAX_EXAMPLE_INPUTS:
            raise ValueError(f"expected 1..{MAX_EXAMPLE_INPUTS} named inputs")
        return {str(k)[:128]: _numbers(v) for k, v in doc.items()}
    return {None: _numbers(doc)}


def _columns(columns: list[Any], data: Any) -> Example:
    """A DataFrame example with strings: each column all numbers or all strings. A missing
    cell (pandas writes NaN and None as ``null``) is the empty string in a column of strings,
    as the graph takes it (string_missing.py), NaN in a column of numbers."""
    if not 1 <= len(columns) <= MAX_EXAMPLE_INPUTS or not all(
            isinstance(c, str) and 0 < len(c) <= 128 for c in columns):
        raise ValueError(f"a DataFrame example with strings needs 1..{MAX_EXAMPLE_INPUTS} "
                         "named columns")
    if not isinstance(data, list) or not data:
        raise ValueError("the example holds no rows")
    rows = data[:MAX_EXAMPLE_ROWS]
    if not all(isinstance(r, list) and len(r) == len(columns) for r in rows):
        raise ValueError("the DataFrame example's data do not match its columns")
    out: Example = {}
    for j, name in enumerate(columns):
        values = [r[j] for r in rows]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, str) for v in present):
            out[name] = np.array(["" if v is None else v for v in values], dtype=object)
        elif present and len(present) < len(values):
            out[name] = _numbers([np.nan if v is None else v for v in values])
        else:
            out[name] = _numbers(values)
    return out


def _numbers(value: Any) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise ValueError("the example holds no rows")
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"the example holds {array.dtype} values, not numbers only")
    return array[:MAX_EXAMPLE_ROWS]

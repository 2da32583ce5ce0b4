"""Parity inputs drawn where a fitted scikit-learn model has seen data, so that parity tests
the conversion rather than the model's refusal of inputs it never saw: random normals are
unknown categories to an encoder or ``CategoricalNB`` and empty neighbourhoods to
``RadiusNeighbors*``.

The step that receives the raw input (a pipeline's first, the model itself otherwise) says
what it has seen, in the first of these that it has:

* ``categories_`` (ordinal / one-hot / target encoders): one of each feature's categories,
  when all are exact in float32;
* ``category_count_`` (``CategoricalNB``): a category index each feature has counted;
* ``_fit_X`` (neighbour models, ``KNNImputer``): a fitted row, moved by a little noise;
* ``data_min_``/``data_max_`` (``MinMaxScaler``), ``bin_edges_`` (``KBinsDiscretizer``),
  tree thresholds (``tree_``, ensembles' ``estimators_``): uniform within the range;
* ``mean_``/``scale_`` (``StandardScaler``), ``mean_``/``var_``: normal around the mean.

Anything else, or inputs that are not one ``[rows, n_features]`` float tensor, gets
:func:`parity.random_feeds`. Seeded, and bounded: at most ``MAX_VALUES`` categories per
feature, ``MAX_FITTED_VALUES`` values of fitted rows, ``MAX_TREES`` trees read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .parity import Sampler, random_feeds
from .spec_types import concrete_shape

#: Categories kept per feature: the draw needs a handful, not a copy.
MAX_VALUES = 4096
#: Values of fitted rows kept (rows x features): a wide model keeps fewer rows.
MAX_FITTED_VALUES = 2**20
#: Trees read for thresholds: a forest's first hundred say enough about its range.
MAX_TREES = 100
#: Noise added to a fitted row, as a share of each feature's spread: far inside any radius a
#: model was fitted with, yet enough to break exact distance ties.
JITTER = 1e-3

#: ``(rng, rows) -> [rows, n_features] float64``
Draw = Callable[[np.random.Generator, int], np.ndarray]


def for_model(model: Any) -> Sampler:
    """A sampler for ``model``'s parity inputs (see the module's docstring)."""
    first = _first_step(model)
    draw = draw_for(first)
    n_features = getattr(first, "n_features_in_", None)
    if draw is None or n_features is None:
        return random_feeds

    def sample(inputs: list[dict[str, Any]], rows: int, seed: int) -> dict[str, np.ndarray]:
        if len(inputs) != 1 or np.dtype(inputs[0]["dtype"]).kind != "f":
            return random_feeds(inputs, rows, seed)
        (spec,) = inputs
        shape = concrete_shape(tuple(spec["shape"]), rows)
        if len(shape) != 2 or shape[1] != n_features:
            return random_feeds(inputs, rows, seed)
        try:
            x = draw(np.random.default_rng(seed), shape[0])
        except Exception:  # the model's attributes are the artifact's: odd ones fall back
            return random_feeds(inputs, rows, seed)
        return {spec["name"]: x.astype(np.dtype(spec["dtype"]))}

    return sample


def _first_step(model: Any) -> Any:
    while hasattr(model, "steps") and model.steps:
        model = model.steps[0][1]
    return model


def draw_for(step: Any) -> Draw | None:
    """Where ``step`` has seen data, as a draw of ``[rows, step.n_features_in_]``; None when
    it does not say (column_inputs.py asks this of each column transformer's steps)."""
    for find in (_categories, _category_counts, _fitted_rows, _ranges, _moments):
        draw = find(step)
        if draw is not None:
            return draw
    return None


def _columns(choices: list[np.ndarray]) -> Draw:
    """Each feature drawn from its own values."""

    def draw(rng: np.random.Generator, rows: int) -> np.ndarray:
        return np.column_stack([rng.choice(c, size=rows) for c in choices])

    return draw


def _categories(step: Any) -> Draw | None:
    """Numeric categories, if every one survives float32 as the graph's input carries it: a
    category the input cannot express is unknown to the model and known to the graph (whose
    categories are float32 too), so drawing it would measure that, not the conversion."""
    categories = getattr(step, "categories_", None)
    if not isinstance(categories, list) or not categories:
        return None
    choices = []
    for values in categories:
        values = np.asarray(values)
        if values.dtype.kind not in "biuf" or values.size == 0:
            return None
        values = values[~np.isnan(values.astype(np.float64))][:MAX_VALUES].astype(np.float64)
        if values.size == 0 or (values.astype(np.float32).astype(np.float64) != values).any():
            return None
        choices.append(values)
    return _columns(choices)


def _category_counts(step: Any) -> Draw | None:
    """``CategoricalNB``: category ``i`` of a feature is the integer ``i``."""
    counts = getattr(step, "category_count_", None)
    if not isinstance(counts, list) or not counts:
        return None
    sizes = [np.asarray(c).shape[-1] for c in counts]
    if min(sizes) < 1:
        return None
    return _columns([np.arange(min(s, MAX_VALUES), dtype=np.float64) for s in sizes])


def _fitted_rows(step: Any) -> Draw | None:
    fit_x = getattr(step, "_fit_X", None)
    if not isinstance(fit_x, np.ndarray) or fit_x.ndim != 2 or fit_x.shape[0] == 0:
        return None
    if fit_x.dtype.kind not in "biuf":
        return None
    seen = fit_x[:max(1, MAX_FITTED_VALUES // max(fit_x.shape[1], 1))].astype(np.float64)
    finite = np.where(np.isfinite(seen), seen, np.nan)
    spread = np.nan_to_num(np.nanstd(finite, axis=0)) if np.isfinite(finite).any() else 0.0
    noise = JITTER * np.where(spread > 0, spread, 1.0)

    def draw(rng: np.random.Generator, rows: int) -> np.ndarray:
        picked = seen[rng.integers(0, seen.shape[0], size=rows)]
        return picked + rng.standard_normal(picked.shape) * noise

    return draw


def _ranges(step: Any) -> Draw | None:
    low_high = _min_max(step) or _bin_edges(step) or _tree_thresholds(step)
    if low_high is None:
        return None
    low, high = low_high

    def draw(rng: np.random.Generator, rows: int) -> np.ndarray:
        return rng.uniform(low, high, size=(rows, low.shape[0]))

    return draw


def _min_max(step: Any) -> tuple[np.ndarray, np.ndarray] | None:
    low, high = getattr(step, "data_min_", None), getattr(step, "data_max_", None)
    if not isinstance(low, np.ndarray) or not isinstance(high, np.ndarray):
        return None
    return _finite_pair(low, high)


def _bin_edges(step: Any) -> tuple[np.ndarray, np.ndarray] | None:
    edges = getattr(step, "bin_edges_", None)
    if edges is None or len(edges) == 0:
        return None
    try:
        low = np.array([np.asarray(e, np.float64)[0] for e in edges])
        high = np.array([np.asarray(e, np.float64)[-1] for e in edges])
    except (IndexError, TypeError, ValueError):
        return None
    return _finite_pair(low, high)


def _tree_thresholds(step: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The span of every split threshold per feature, widened by a tenth on each side so
    both branches of the outer splits are taken; features never split on get [-1, 1]."""
    n_features = getattr(step, "n_features_in_", None)
    if not isinstance(n_features, int) or n_features < 1:
        return None
    low = np.full(n_features, np.inf)
    high = np.full(n_features, -np.inf)
    found = False
    for tree in _trees(step):
        feature = np.asarray(tree.feature)
        threshold = np.asarray(tree.threshold, dtype=np.float64)
        split = (feature >= 0) & (feature < n_features)
        if not split.any():
            continue
        found = True
        np.minimum.at(low, feature[split], threshold[split])
        np.maximum.at(high, feature[split], threshold[split])
    if not found:
        return None
    unseen = ~np.isfinite(low)
    low[unseen], high[unseen] = -1.0, 1.0
    margin = np.maximum((high - low) * 0.1, 1e-3)
    return low - margin, high + margin


def _trees(step: Any) -> Iterator[Any]:
    """The ``tree_`` of a tree, or of the first MAX_TREES trees of an ensemble."""
    own = getattr(step, "tree_", None)
    if own is not None:
        yield own
        return
    estimators = getattr(step, "estimators_", None)
    if estimators is None:
        return
    count = 0
    for member in np.asarray(estimators, dtype=object).ravel():
        tree = getattr(member, "tree_", None)
        if tree is None:
            continue
        yield tree
        count += 1
        if count >= MAX_TREES:
            return


def _moments(step: Any) -> Draw | None:
    mean = getattr(step, "mean_", None)
    scale = getattr(step, "scale_", None)
    if scale is None and isinstance(getattr(step, "var_", None), np.ndarray):
        scale = np.sqrt(np.abs(step.var_))
    if not isinstance(mean, np.ndarray) or not isinstance(scale, np.ndarray):
        return None
    if mean.ndim != 1 or mean.shape != scale.shape:
        return None
    centre = np.nan_to_num(mean.astype(np.float64))
    spread = np.nan_to_num(scale.astype(np.float64), nan=1.0)
    spread = np.where(spread > 0, spread, 1.0)

    def draw(rng: np.random.Generator, rows: int) -> np.ndarray:
        return centre + rng.standard_normal((rows, centre.shape[0])) * spread

    return draw


def _finite_pair(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    if low.ndim != 1 or low.shape != high.shape or low.size == 0:
        return None
    low = low.astype(np.float64)
    high = high.astype(np.float64)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        return None
    return low, np.maximum(high, low)


def example_feeds(example: dict[str | None, np.ndarray],
                  inputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """A model's own example (mlflow_example.Example) as feeds for the graph's ``inputs``:
    unnamed rows for a single input, named arrays by name (a DataFrame's columns may also be
    one ``[-1, 1]`` input each); cast to each input's dtype, reshaped only where the free
    batch dimension allows. ValueError when it does not fit."""
    if None in example:
        rows = example[None]
        if len(inputs) == 1:
            return {inputs[0]["name"]: _fit(rows, inputs[0])}
        names = [spec["name"] for spec in inputs]
        if rows.ndim == 2 and rows.shape[1] == len(inputs):
            return {n: _fit(rows[:, [i]], spec) for i, (n, spec) in enumerate(zip(names, inputs,
                                                                                  strict=True))}
        raise ValueError(f"one unnamed example for {len(inputs)} inputs")
    missing = [spec["name"] for spec in inputs if spec["name"] not in example]
    if missing:
        raise ValueError(f"the example has no input {missing[0]!r}")
    return {spec["name"]: _fit(example[spec["name"]], spec) for spec in inputs}


def _fit(rows: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(spec["dtype"])
    if dtype.kind == "O":  # an ONNX string input: the example's strings only
        if rows.dtype != object:
            raise ValueError(f"input {spec['name']!r} takes strings; the example gives "
                             f"{rows.dtype}")
    elif dtype.kind not in "biuf" or rows.dtype.kind not in "biuf":
        raise ValueError(f"input {spec['name']!r} is {dtype}, which the example's "
                         f"{rows.dtype} values cannot feed")
    shape = [int(d) for d in spec["shape"]]
    fits = None
    if shape and all(d >= 0 for d in shape[1:]):  # only the batch may vary: reshape rows
        per_row = int(np.prod(shape[1:]))
        if rows.size and per_row and rows.size % per_row == 0:
            fits = rows.reshape(-1, *shape[1:])
    elif rows.ndim == len(shape) and all(d < 0 or d == r for d, r in zip(shape, rows.shape,
                                                                         strict=True)):
        fits = rows
    if fits is not None and shape[0] >= 0:
        fits = fits[:shape[0]] if len(fits) >= shape[0] else None
    if fits is None:
        raise ValueError(f"the example's shape {list(rows.shape)} does not fit input "
                         f"{spec['name']!r} of shape {shape}")
    return fits.astype(dtype)

"""Breadth report (issue #14): every estimator ``sklearn.utils.all_estimators()`` can fit with
default parameters on small generated data and skl2onnx converts in-process, pickled and sent
through a running broker with the public client (``allow_code``); one line per estimator,
converted or the reason code and sentence of its failure, then the totals.

Like bench/baseline.py this module unpickles nothing but fits and converts models it made a
moment earlier, in its own process: it is a benchmark, and nothing in the product imports it.

    .venv/bin/python -m bench.corpus                      # a broker of its own (the test image)
    .venv/bin/python -m bench.corpus --server HOST:PORT   # a broker already running
    .venv/bin/python -m bench.corpus --json corpus.json   # the rows as JSON too
    .venv/bin/python -m bench.corpus --parity-tolerance 1e-4 --input-dtype float64
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE = os.environ.get("AIRLOCK_TEST_IMAGE", "airlock-sandbox:latest")
#: Rows and features of the generated data: small, as a user's quick try would be.
ROWS, FEATURES = 60, 4
KINDS = ("classifier", "regressor", "transformer", "cluster")
#: skl2onnx's opsets as the worker pins them (sklearn_convert.SKLEARN_OPSET).
OPSET = {"": 18, "ai.onnx.ml": 3}


@dataclass
class Row:
    estimator: str
    kind: str
    converted: bool
    reason: str = ""
    message: str = ""
    seconds: float = 0.0


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-negative features in steps of a quarter (count- and category-based models accept
    them, and a float32 input carries them exactly), two classes the features predict (so
    univariate selectors keep some), a continuous target."""
    rng = np.random.default_rng(14)
    x = np.round(np.abs(rng.standard_normal((ROWS, FEATURES))) * 12) / 4
    y_class = (x[:, 0] - x[:, 1] + rng.standard_normal(ROWS) * 0.5 > 0).astype(np.int64)
    y_reg = x @ np.array([1.0, -2.0, 0.5, 3.0]) + rng.standard_normal(ROWS) * 0.1
    return x, y_class, y_reg


def fitted() -> Iterator[tuple[str, str, Any]]:
    """(name, kind, fitted estimator) for each class that fits with default parameters."""
    from sklearn.utils import all_estimators

    x, y_class, y_reg = data()
    seen: set[str] = set()
    for kind in KINDS:
        for name, cls in all_estimators(type_filter=kind):
            if name in seen:
                continue
            seen.add(name)
            try:
                model = cls()
                if kind == "classifier":
                    model.fit(x, y_class)
                elif kind == "regressor":
                    model.fit(x, y_reg)
                else:
                    model.fit(x, y_class)
            except Exception:
                continue
            yield name, kind, model


def converts_in_process(model: Any) -> bool:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    types = [("X", FloatTensorType([None, FEATURES]))]
    options = {id(model): {"zipmap": False}} if is_classifier(model) else None
    for opts in (options, None):
        try:
            convert_sklearn(model, initial_types=types, options=opts, target_opset=OPSET)
            return True
        except Exception:
            continue
    return False


def corpus(workdir: Path) -> list[tuple[str, str, Path]]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kind, model in fitted():
            if not converts_in_process(model):
                continue
            path = workdir / f"{name}.pkl"
            path.write_bytes(pickle.dumps(model))
            out.append((name, kind, path))
    return out


def convert_all(server: str, models: list[tuple[str, str, Path]], workdir: Path,
                tolerance: float | None, dtype: str | None = None) -> list[Row]:
    from airlock_client import Client, ConversionError, TensorSpec

    rows = []
    extra: dict[str, Any] = {} if tolerance is None else {"parity_tolerance": tolerance}
    if dtype is not None:  # as `airlock convert --input-dtype` sends it: the model's width
        extra["inputs"] = (TensorSpec("X", dtype, (-1, -1)),)
    with Client(server, timeout=300) as client:
        for name, kind, path in models:
            began = time.monotonic()
            try:
                client.convert(path, workdir / f"{name}.onnx", target="onnx", **extra)
                row = Row(name, kind, True)
            except ConversionError as exc:
                row = Row(name, kind, False, exc.reason, exc.message)
            row.seconds = round(time.monotonic() - began, 2)
            print(f"  {name:34} {'ok' if row.converted else row.reason}", file=sys.stderr,
                  flush=True)
            rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    lines = [f"{'estimator':34} {'kind':11} result"]
    for r in sorted(rows, key=lambda r: (r.converted, r.reason, r.estimator)):
        result = "converted" if r.converted else f"{r.reason}: {r.message}"
        lines.append(f"{r.estimator:34} {r.kind:11} {result[:400]}")
    done = sum(r.converted for r in rows)
    lines.append("")
    lines.append(f"converted {done} of {len(rows)} ({100 * done / max(len(rows), 1):.0f}%)")
    for reason, count in Counter(r.reason for r in rows if not r.converted).most_common():
        lines.append(f"  failed {reason}: {count}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--server", help="a running broker (default: start one on "
                                         "AIRLOCK_TEST_IMAGE or airlock-sandbox:latest)")
    parser.add_argument("--image", default=IMAGE, help="sandbox image of the broker started")
    parser.add_argument("--parity-tolerance", type=float, default=None,
                        help="sent with every request (default: the broker's)")
    parser.add_argument("--input-dtype", default=None,
                        help="e.g. float64: a graph of that input type (default float32)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="airlock-corpus-") as tmp:
        workdir = Path(tmp)
        models = corpus(workdir)
        print(f"{len(models)} estimators fit and convert in-process", file=sys.stderr)
        if args.server:
            rows = convert_all(args.server, models, workdir, args.parity_tolerance,
                               args.input_dtype)
        else:
            from bench.broker import Broker

            broker = Broker(workdir, "broker", {
                "sandbox": {"image": args.image},
                "pools": {"min_warm": 1, "profiles": ["sklearn"]}})
            try:
                broker.start()
                rows = convert_all(broker.address, models, workdir, args.parity_tolerance,
                                   args.input_dtype)
            finally:
                code = broker.stop()
            if code != 0:
                print(f"the broker exited {code}", file=sys.stderr)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Breadth report (issue #14): every estimator ``sklearn.utils.all_estimators()`` can fit with
default parameters on small generated data and skl2onnx converts in-process, plus XGBoost's and
LightGBM's scikit-learn wrappers and pipelines mixing them, each saved as a pickle and as a
joblib file and sent through a running broker with the public client, under ``allow_code`` and
under ``safe_only``. For every estimator and file: converted under ``allow_code``, whether that
result is ``integrity_verified`` (the policy loader's second reading agreed), converted under
``safe_only`` (the policy loader alone, no artifact code run), each miss with its reason code and
sentence; then totals and percentages per group and file kind.

Like bench/baseline.py this module unpickles nothing but fits and converts models it made a
moment earlier, in its own process: it is a benchmark, and nothing in the product imports it.

    .venv/bin/python -m bench.corpus                      # a broker of its own (the test image)
    .venv/bin/python -m bench.corpus --server HOST:PORT   # a broker already running
    .venv/bin/python -m bench.corpus --json corpus.json   # the rows as JSON too
    .venv/bin/python -m bench.corpus --files pickle --policies allow_code   # the old report
    .venv/bin/python -m bench.corpus --parity-tolerance 1e-4 --input-dtype float64
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE = os.environ.get("AIRLOCK_TEST_IMAGE", "airlock-sandbox:latest")
#: Rows and features of the generated data: small, as a user's quick try would be.
ROWS, FEATURES = 60, 4
KINDS = ("classifier", "regressor", "transformer", "cluster")
#: skl2onnx's opsets as the worker pins them (sklearn_convert.SKLEARN_OPSET, BOOSTER_OPSET).
OPSET = {"": 18, "ai.onnx.ml": 3}
BOOSTER_OPSET = {"": 15, "ai.onnx.ml": 3}
FILES = ("pickle", "joblib")
POLICIES = ("allow_code", "safe_only")
#: The two sets the issue reports on.
GROUPS = ("sklearn", "boosters")


@dataclass
class Row:
    """One conversion: an estimator saved as ``file``, sent under ``policy``."""

    estimator: str
    kind: str
    converted: bool
    reason: str = ""
    message: str = ""
    seconds: float = 0.0
    group: str = "sklearn"
    file: str = "pickle"
    policy: str = "allow_code"
    #: The result's assurance ("" when not converted).
    assurance: str = ""
    integrity_note: str = ""
    executed_artifact_code: bool = False

    @property
    def verified(self) -> bool:
        return self.converted and self.assurance == "integrity_verified"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    group: str
    paths: dict[str, Path]


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-negative features in steps of a quarter (count- and category-based models accept
    them, and a float32 input carries them exactly), two classes the features predict (so
    univariate selectors keep some), a continuous target."""
    rng = np.random.default_rng(14)
    x = np.round(np.abs(rng.standard_normal((ROWS, FEATURES))) * 12) / 4
    y_class = (x[:, 0] - x[:, 1] + rng.standard_normal(ROWS) * 0.5 > 0).astype(np.int64)
    y_reg = x @ np.array([1.0, -2.0, 0.5, 3.0]) + rng.standard_normal(ROWS) * 0.1
    return x, y_class, y_reg


def _fit(model: Any, kind: str) -> Any:
    x, y_class, y_reg = data()
    model.fit(x, y_reg if kind == "regressor" else y_class)
    return model


def fitted() -> Iterator[tuple[str, str, Any]]:
    """(name, kind, fitted estimator) for each class that fits with default parameters."""
    from sklearn.utils import all_estimators

    seen: set[str] = set()
    for kind in KINDS:
        for name, cls in all_estimators(type_filter=kind):
            if name in seen:
                continue
            seen.add(name)
            try:
                model = _fit(cls(), kind)
            except Exception:
                continue
            yield name, kind, model


def booster_models() -> Iterator[tuple[str, str, Any]]:
    """XGBoost's and LightGBM's scikit-learn wrappers alone, and pipelines that mix them with
    scikit-learn steps (a scaler, a projection, a forest beside a booster)."""
    from lightgbm import LGBMClassifier, LGBMRegressor
    from sklearn.decomposition import PCA
    from sklearn.ensemble import (
        RandomForestClassifier,
        RandomForestRegressor,
        VotingClassifier,
        VotingRegressor,
    )
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler, StandardScaler
    from xgboost import XGBClassifier, XGBRegressor

    def xgbc() -> Any:
        return XGBClassifier(n_estimators=20, max_depth=3)

    def xgbr() -> Any:
        return XGBRegressor(n_estimators=20, max_depth=3)

    def lgbc() -> Any:
        return LGBMClassifier(n_estimators=20, min_child_samples=5, verbose=-1)

    def lgbr() -> Any:
        return LGBMRegressor(n_estimators=20, min_child_samples=5, verbose=-1)

    made: list[tuple[str, str, Any]] = [
        ("XGBClassifier", "classifier", xgbc()),
        ("XGBRegressor", "regressor", xgbr()),
        ("LGBMClassifier", "classifier", lgbc()),
        ("LGBMRegressor", "regressor", lgbr()),
        ("Pipeline[StandardScaler,XGBClassifier]", "classifier",
         make_pipeline(StandardScaler(), xgbc())),
        ("Pipeline[MinMaxScaler,XGBRegressor]", "regressor",
         make_pipeline(MinMaxScaler(), xgbr())),
        ("Pipeline[StandardScaler,LGBMClassifier]", "classifier",
         make_pipeline(StandardScaler(), lgbc())),
        ("Pipeline[StandardScaler,PCA,LGBMRegressor]", "regressor",
         make_pipeline(StandardScaler(), PCA(n_components=3), lgbr())),
        ("Pipeline[StandardScaler,Voting[RandomForest,XGB]]", "classifier",
         make_pipeline(StandardScaler(), VotingClassifier(
             [("forest", RandomForestClassifier(n_estimators=10, random_state=0)),
              ("xgb", xgbc())], voting="soft", flatten_transform=False))),
        ("Pipeline[MinMaxScaler,Voting[RandomForest,LGBM]]", "regressor",
         make_pipeline(MinMaxScaler(), VotingRegressor(
             [("forest", RandomForestRegressor(n_estimators=10, random_state=0)),
              ("lgbm", lgbr())]))),
    ]
    for name, kind, model in made:
        try:
            yield name, kind, _fit(model, kind)
        except Exception as exc:
            print(f"  {name}: does not fit ({type(exc).__name__}: {exc})", file=sys.stderr)


def register_boosters() -> None:
    """What the worker does for the boosters it finds (sklearn_convert._register_boosters),
    for the in-process check: skl2onnx learns onnxmltools' converters for the four wrappers."""
    from lightgbm import LGBMClassifier, LGBMRegressor
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
    from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )
    from xgboost import XGBClassifier, XGBRegressor

    options = {"nocl": [True, False], "zipmap": [True, False, "columns"]}
    update_registered_converter(XGBClassifier, "XGBoostXGBClassifier",
                                calculate_linear_classifier_output_shapes, convert_xgboost,
                                options=options)
    update_registered_converter(LGBMClassifier, "LightGbmLGBMClassifier",
                                calculate_linear_classifier_output_shapes, convert_lightgbm,
                                options=options)
    update_registered_converter(XGBRegressor, "XGBoostXGBRegressor",
                                calculate_linear_regressor_output_shapes, convert_xgboost)
    update_registered_converter(LGBMRegressor, "LightGbmLGBMRegressor",
                                calculate_linear_regressor_output_shapes, convert_lightgbm)


def converts_in_process(model: Any, opset: dict[str, int] = OPSET) -> bool:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    final = model.steps[-1][1] if hasattr(model, "steps") else model
    types = [("X", FloatTensorType([None, FEATURES]))]
    options = {id(final): {"zipmap": False}} if is_classifier(final) else None
    for opts in (options, None):
        try:
            convert_sklearn(model, initial_types=types, options=opts, target_opset=opset)
            return True
        except Exception:
            continue
    return False


def save(model: Any, stem: Path, files: tuple[str, ...]) -> dict[str, Path]:
    """The model as each file kind asked for: a plain pickle, a joblib file (numpy arrays as
    joblib's own records after the pickle stream)."""
    import joblib

    paths = {}
    if "pickle" in files:
        paths["pickle"] = stem.with_suffix(".pkl")
        paths["pickle"].write_bytes(pickle.dumps(model))
    if "joblib" in files:
        paths["joblib"] = stem.with_suffix(".joblib")
        joblib.dump(model, paths["joblib"])
    return paths


def corpus(workdir: Path, files: tuple[str, ...] = FILES,
           groups: tuple[str, ...] = GROUPS) -> list[Entry]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "sklearn" in groups:
            for name, kind, model in fitted():
                if converts_in_process(model):
                    out.append(Entry(name, kind, "sklearn", save(model, workdir / name, files)))
        if "boosters" in groups:
            register_boosters()
            for name, kind, model in booster_models():
                if converts_in_process(model, BOOSTER_OPSET):
                    stem = workdir / name.replace("[", "_").replace("]", "").replace(",", "_")
                    out.append(Entry(name, kind, "boosters", save(model, stem, files)))
                else:
                    print(f"  {name}: skl2onnx does not convert it in-process; left out",
                          file=sys.stderr)
    return out


def convert_all(server: str, models: list[Entry], workdir: Path, tolerance: float | None,
                dtype: str | None = None, policies: tuple[str, ...] = POLICIES,
                jobs: int = 1, progress: Path | None = None) -> list[Row]:
    from airlock_client import AirlockError, Client, ConversionError, TensorSpec

    extra: dict[str, Any] = {} if tolerance is None else {"parity_tolerance": tolerance}
    if dtype is not None:  # as `airlock convert --input-dtype` sends it: the model's width
        extra["inputs"] = (TensorSpec("X", dtype, (-1, -1)),)
    cases = [(entry, file, policy) for entry in models for file in entry.paths
             for policy in policies]
    local = threading.local()
    clients: list[Any] = []
    done: list[Row] = []
    lock = threading.Lock()

    def one(case: tuple[Entry, str, str]) -> Row:
        entry, file, policy = case
        if not hasattr(local, "client"):
            local.client = Client(server, timeout=300)
            with lock:
                clients.append(local.client)
        out = workdir / f"{entry.paths[file].name}.{policy}.onnx"
        began = time.monotonic()
        row = Row(entry.name, entry.kind, False, group=entry.group, file=file, policy=policy)
        try:
            result = local.client.convert(entry.paths[file], out, target="onnx",
                                          loading_policy=policy, **extra)
            row.converted = True
            row.assurance = str(result.assurance)
            row.integrity_note = result.integrity_note
            row.executed_artifact_code = result.report.executed_artifact_code
        except ConversionError as exc:
            row.reason, row.message = exc.reason, exc.message
        except AirlockError as exc:  # the broker or its engine went away: not the model's
            row.reason, row.message = exc.reason or "UNAVAILABLE", exc.message
        row.seconds = round(time.monotonic() - began, 2)
        with lock:
            done.append(row)
            if progress is not None:  # rows so far, for a run cut short
                progress.write_text(json.dumps([asdict(r) for r in done], indent=1))
            print(f"  {entry.name:40} {file:6} {policy:10} "
                  f"{row.assurance if row.converted else row.reason}", file=sys.stderr,
                  flush=True)
        return row

    try:
        with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
            return list(pool.map(one, cases))
    finally:
        for client in clients:
            client.close()


@dataclass
class Verdict:
    """One estimator saved as one file kind: the three questions the issue asks."""

    estimator: str
    kind: str
    group: str
    file: str
    allow_code: Row | None
    safe_only: Row | None

    @property
    def converted(self) -> bool:
        return self.allow_code is not None and self.allow_code.converted

    @property
    def verified(self) -> bool:
        return self.allow_code is not None and self.allow_code.verified

    @property
    def safe(self) -> bool:
        return self.safe_only is not None and self.safe_only.converted

    def misses(self) -> list[str]:
        """Each miss as ``question: REASON: sentence``."""
        out = []
        if self.allow_code is not None:
            if not self.allow_code.converted:
                out.append(f"allow_code: {self.allow_code.reason}: {self.allow_code.message}")
            elif not self.allow_code.verified:
                out.append(f"integrity: {self.allow_code.assurance}: "
                           f"{self.allow_code.integrity_note or 'no note'}")
        if self.safe_only is not None and not self.safe_only.converted:
            out.append(f"safe_only: {self.safe_only.reason}: {self.safe_only.message}")
        return out


def verdicts(rows: list[Row]) -> list[Verdict]:
    by_key: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        by_key.setdefault((r.estimator, r.file), {})[r.policy] = r
    out = []
    for (name, file), found in by_key.items():
        first = next(iter(found.values()))
        out.append(Verdict(name, first.kind, first.group, file, found.get("allow_code"),
                           found.get("safe_only")))
    return out


def _share(count: int, total: int) -> str:
    return f"{count} of {total} ({100 * count / max(total, 1):.0f}%)"


def table(rows: list[Row]) -> str:
    found = verdicts(rows)
    lines = [f"{'estimator':44} {'kind':11} {'file':6} {'allow_code':10} {'verified':8} "
             f"{'safe_only':9}"]

    def mark(flag: bool, present: bool) -> str:
        return ("yes" if flag else "NO") if present else "-"

    for v in sorted(found, key=lambda v: (v.group, v.estimator, v.file)):
        lines.append(f"{v.estimator[:44]:44} {v.kind:11} {v.file:6} "
                     f"{mark(v.converted, v.allow_code is not None):10} "
                     f"{mark(v.verified, v.allow_code is not None):8} "
                     f"{mark(v.safe, v.safe_only is not None):9}")
    lines.append("")
    lines.append("misses:")
    for v in sorted(found, key=lambda v: (v.group, v.estimator, v.file)):
        for miss in v.misses():
            lines.append(f"  {v.estimator} ({v.file}) {miss[:400]}")
    lines.append("")
    lines.append("totals (each estimator saved as each file kind):")
    for group in GROUPS:
        for file in (*FILES, "all"):
            chosen = [v for v in found if v.group == group and file in ("all", v.file)]
            if not chosen:
                continue
            with_allow = [v for v in chosen if v.allow_code is not None]
            with_safe = [v for v in chosen if v.safe_only is not None]
            parts = []
            if with_allow:
                parts.append(f"converted (allow_code) "
                             f"{_share(sum(v.converted for v in with_allow), len(with_allow))}")
                parts.append(f"integrity_verified "
                             f"{_share(sum(v.verified for v in with_allow), len(with_allow))}")
            if with_safe:
                parts.append(f"converted (safe_only) "
                             f"{_share(sum(v.safe for v in with_safe), len(with_safe))}")
            lines.append(f"  {group:8} {file:6} " + "; ".join(parts))
    converted = [v for v in found if v.converted]
    if converted:
        lines.append(f"  of those converted under allow_code: integrity_verified "
                     f"{_share(sum(v.verified for v in converted), len(converted))}; "
                     f"safe_only {_share(sum(v.safe for v in converted), len(converted))}")
    lines.append("")
    for policy in POLICIES:
        failed = Counter(r.reason for r in rows if r.policy == policy and not r.converted)
        for reason, count in failed.most_common():
            lines.append(f"  {policy} failed {reason}: {count}")
    notes = Counter(r.integrity_note.split(":")[0][:80] for r in rows
                    if r.converted and r.policy == "allow_code" and not r.verified)
    for note, count in notes.most_common():
        lines.append(f"  not verified ({note}): {count}")
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
    parser.add_argument("--files", default=",".join(FILES),
                        help="file kinds to save each estimator as (default pickle,joblib)")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="loading policies to send each file under "
                             "(default allow_code,safe_only)")
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help="sklearn (all_estimators), boosters (XGBoost/LightGBM wrappers "
                             "and pipelines); default both")
    parser.add_argument("--jobs", type=int, default=2,
                        help="conversions at once (default 2, what a default broker runs)")
    parser.add_argument("--json", type=Path, help="also write the rows here (rewritten after "
                                                  "each conversion)")
    parser.add_argument("--table", type=Path, metavar="JSON",
                        help="print the report of rows written earlier with --json (one file "
                             "or several, comma-separated) and exit")
    args = parser.parse_args(argv)
    if args.table:
        rows = [Row(**r) for name in str(args.table).split(",")
                for r in json.loads(Path(name).read_text())]
        print(table(rows))
        return 0
    files = _choice(args.files, FILES, "--files")
    policies = _choice(args.policies, POLICIES, "--policies")
    groups = _choice(args.groups, GROUPS, "--groups")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="airlock-corpus-") as tmp:
        workdir = Path(tmp)
        models = corpus(workdir, files, groups)
        print(f"{len(models)} estimators fit and convert in-process", file=sys.stderr)
        if args.server:
            rows = convert_all(args.server, models, workdir, args.parity_tolerance,
                               args.input_dtype, policies, args.jobs, args.json)
        else:
            from bench.broker import Broker

            broker = Broker(workdir, "broker", {
                "sandbox": {"image": args.image},
                "pools": {"min_warm": max(args.jobs, 1), "profiles": ["sklearn"]}})
            try:
                broker.start()
                rows = convert_all(broker.address, models, workdir, args.parity_tolerance,
                                   args.input_dtype, policies, args.jobs, args.json)
            finally:
                code = broker.stop()
            if code != 0:
                print(f"the broker exited {code}", file=sys.stderr)
    print(table(rows))
    print(f"\n{len(rows)} conversions in {time.monotonic() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def _choice(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    chosen = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in chosen if t not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"bench.corpus: {flag} takes some of {', '.join(allowed)}")
    return chosen


if __name__ == "__main__":
    raise SystemExit(main())

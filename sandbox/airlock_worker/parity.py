"""Parity inside the sandbox: the ONNX output run by ONNX Runtime against the original model
on seeded inputs. It catches honest conversion bugs; it proves nothing against a hostile
artifact, which controls this process (research/conversion.md §0.1).

Tolerance for floats is ``|onnx - ref| <= atol + rtol * |ref|``, by default atol=1e-5,
rtol=1e-4 (the float32 policy of research/conversion.md §7); a caller's tolerance ``t``
(``JobSpec.parity_tolerance``) makes both ``t``. Labels must match exactly. Every output
compared is reported with its largest absolute and relative difference and the tolerance,
whether it passed or not."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from airlock_sandbox.contract import WorkerExit

from .errors import WorkerError, one_line
from .report import ParityEntry, Report
from .spec_types import PARITY_ROWS, concrete_shape

ATOL = 1e-5
RTOL = 1e-4
SEED = 20240607
EXACT = "exact"


@dataclass(frozen=True)
class Tolerance:
    """Allowed float difference: ``|onnx - ref| <= atol + rtol * |ref|``."""

    atol: float = ATOL
    rtol: float = RTOL

    @classmethod
    def of(cls, caller: float) -> Tolerance:
        """The caller's single number for both; 0 (not given) keeps the default. The broker
        has already bounded it (contract.check_parity_tolerance)."""
        return cls(caller, caller) if caller > 0 else cls()

    def __str__(self) -> str:
        return f"atol={self.atol:g} rtol={self.rtol:g}"


DEFAULT_TOLERANCE = Tolerance()
FLOAT_TOLERANCE = str(DEFAULT_TOLERANCE)


class Expected:
    """One reference output; ``exact`` for labels, which must match bit for bit."""

    def __init__(self, value: Any, exact: bool = False) -> None:
        if hasattr(value, "toarray"):  # a scipy sparse result: ONNX outputs are dense
            value = value.toarray()
        self.value = None if value is None else np.asarray(value)
        self.exact = exact


#: Given the feeds (name -> array), the original model's outputs, aligned with the ONNX
#: outputs; ``None`` marks an ONNX output with no counterpart.
Reference = Callable[[dict[str, np.ndarray]], Sequence[Expected | None]]
#: ``(inputs, rows, seed) -> feeds``: the inputs parity runs on (parity_inputs.py draws them
#: where a fitted model has seen data); raises :class:`Unsupported` for an input it cannot make.
Sampler = Callable[[list[dict[str, Any]], int, int], dict[str, np.ndarray]]


def random_feeds(inputs: list[dict[str, Any]], rows: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs matching ``[{name, dtype, shape}]``: standard normal for floats, small
    non-negative integers (valid indices for embeddings), fair coin flips for booleans."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        dtype = np.dtype(spec["dtype"])
        shape = concrete_shape(tuple(spec["shape"]), rows)
        if dtype.kind == "f":
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec["name"]] = rng.integers(0, 10, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec["name"]] = rng.random(shape) < 0.5
        else:
            raise Unsupported(f"cannot generate {dtype} input {spec['name']!r}")
    return feeds


class Unsupported(Exception):
    """No inputs can be made for this graph: parity is skipped with a warning."""


def session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


#: ``Report.parity_inputs`` words for the rows parity ran on.
GENERATED = "generated"
INPUT_EXAMPLE = "input_example"
SAMPLE = "sample"


def check(onnx_bytes: bytes, inputs: list[dict[str, Any]], reference: Reference,
          report: Report, *, tolerance: Tolerance = DEFAULT_TOLERANCE,
          sampler: Sampler = random_feeds,
          examples: Sequence[dict[str, np.ndarray]] = (),
          source: str = INPUT_EXAMPLE, generate: bool = True) -> None:
    """Run both on ``examples`` (the model's own, e.g. an MLflow input example, or the
    caller's sample: ``source`` names them), then, if ``generate``, a batch of PARITY_ROWS and
    a batch of one from ``sampler`` (and the first with missing values, ``drawing_missing``);
    record one entry per output and which rows were used
    (``report.parity_inputs``); raise PARITY_FAILED if any output differs beyond
    ``tolerance``."""
    sess = session(onnx_bytes)
    names = [o.name for o in sess.get_outputs()]
    merged: dict[str, ParityEntry] = {}
    batches: list[dict[str, np.ndarray]] = list(examples)
    used = [source] if examples else []
    for rows, seed in ((PARITY_ROWS, SEED), (1, SEED + 1)) if generate else ():
        try:
            batches.append(sampler(inputs, rows, seed))
        except Unsupported as exc:
            if not examples:
                report.warn(f"parity not checked: {exc}")
                return
            report.warn(f"parity checked on the model's example only: {exc}")
            break
        if GENERATED not in used:
            used.append(GENERATED)
    report.parity_inputs = "+".join(used)
    for feeds in batches:
        _compare_batch(sess, names, feeds, reference, tolerance, merged)
    if generate and len(batches) > len(examples) and getattr(sampler, "draws_missing", False):
        _compare_if_taken(sess, names, _with_missing(batches[len(examples)], SEED + 2),
                          reference, tolerance, merged)
    report.parity = list(merged.values())
    if not report.parity:
        report.warn("parity not checked: no comparable outputs")
    failed = [e for e in report.parity if not e.passed]
    if failed:
        raise WorkerError(WorkerExit.PARITY_FAILED, failure_message(failed))


def _compare_batch(sess: Any, names: list[str], feeds: dict[str, np.ndarray],
                   reference: Reference, tolerance: Tolerance,
                   merged: dict[str, ParityEntry]) -> None:
    """Run the graph on ``feeds`` (first: a graph that cannot run is a failed conversion),
    then the original, and fold each output's comparison into ``merged``."""
    rows = len(next(iter(feeds.values()))) if feeds else 0
    got = _run(sess, feeds, rows)
    want = reference(feeds)
    for name, g, w in zip(names, got, want, strict=False):
        if w is None or w.value is None:
            continue
        entry = compare(name, g, w, rows, tolerance)
        seen = merged.get(name)
        if seen is not None:
            entry.samples += seen.samples
            entry.max_abs_diff = max(entry.max_abs_diff, seen.max_abs_diff)
            entry.max_rel_diff = max(entry.max_rel_diff, seen.max_rel_diff)
            entry.passed = entry.passed and seen.passed
        merged[name] = entry


def _compare_if_taken(sess: Any, names: list[str], feeds: dict[str, np.ndarray] | None,
                      reference: Reference, tolerance: Tolerance,
                      merged: dict[str, ParityEntry]) -> None:
    """``_compare_batch`` for a batch the original may refuse (missing values where a step
    takes none): the original first, and nothing compared when it raises."""
    if feeds is None:
        return
    try:
        want = reference(feeds)
    except MemoryError:
        raise
    except Exception:
        return
    _compare_batch(sess, names, feeds, lambda _: want, tolerance, merged)


def drawing_missing(sampler: Sampler) -> Sampler:
    """``sampler``, marked for one more batch: its first batch with an eighth of the float
    cells missing (NaN), for a model that routes missing values itself (a tree learns where
    NaN goes at each split; a converter that drops it sends them elsewhere, which no drawn
    row without NaN shows). Kept when the original takes the batch, skipped when it refuses
    missing values (a step before the trees that does not take them)."""

    def sample(inputs: list[dict[str, Any]], rows: int, seed: int) -> dict[str, np.ndarray]:
        return sampler(inputs, rows, seed)

    sample.draws_missing = True  # type: ignore[attr-defined]
    return sample


#: The share of float cells ``drawing_missing``'s batch leaves missing.
MISSING_SHARE = 0.125


def _with_missing(feeds: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray] | None:
    rng = np.random.default_rng(seed)
    out, changed = {}, False
    for name, values in feeds.items():
        if values.dtype.kind == "f":
            values = values.copy()
            values[rng.random(values.shape) < MISSING_SHARE] = np.nan
            changed = True
        out[name] = values
    return out if changed else None


def _run(sess: Any, feeds: dict[str, np.ndarray], rows: int) -> list[Any]:
    """A graph ONNX Runtime refuses to run is a failed conversion, said in one sentence."""
    try:
        return list(sess.run(None, feeds))
    except MemoryError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorkerError(WorkerExit.CONVERSION_FAILED,
                          f"ONNX Runtime cannot run the converted model on {rows} parity "
                          f"row(s): {one_line(text, 240)}") from None


def failure_message(failed: Sequence[ParityEntry]) -> str:
    """A sentence with what was measured and what was allowed, per failing output."""
    parts = []
    for e in failed:
        if e.max_abs_diff == float("inf"):
            parts.append(f"{e.output_name!r} does not match in shape or kind")
        elif e.tolerance == EXACT:
            parts.append(f"{e.output_name!r} differs by up to {e.max_abs_diff:.3g} "
                         "(allowed: exact)")
        else:
            parts.append(f"{e.output_name!r} differs by up to {e.max_abs_diff:.3g}, relative "
                         f"{e.max_rel_diff:.3g} (allowed: {e.tolerance})")
    samples = max(e.samples for e in failed)
    return (f"{'; '.join(parts)}, on {samples} samples: the converter does not "
            "reproduce this model, and nothing was written")


def compare(name: str, got: Any, want: Expected, rows: int,
            tolerance: Tolerance = DEFAULT_TOLERANCE) -> ParityEntry:
    assert want.value is not None
    ref = want.value
    out = _align(np.asarray(got), ref)
    allowed = EXACT if want.exact else str(tolerance)
    if out is None:
        return ParityEntry(name, rows, float("inf"), allowed, False, float("inf"))
    numeric = ref.dtype.kind in "biuf" and out.dtype.kind in "biuf"
    if want.exact or ref.dtype.kind not in "fc" or out.dtype.kind not in "fc":
        same = bool(np.array_equal(out, ref))
        diff = _max_abs(out, ref) if numeric else (0.0 if same else float("inf"))
        rel = _max_rel(out, ref) if numeric else diff
        return ParityEntry(name, rows, diff, EXACT, same, rel)
    ok = bool(np.allclose(out, ref, rtol=tolerance.rtol, atol=tolerance.atol, equal_nan=True))
    return ParityEntry(name, rows, _max_abs(out, ref), allowed, ok, _max_rel(out, ref))


def _align(out: np.ndarray, ref: np.ndarray) -> np.ndarray | None:
    """Shapes that differ only cosmetically: ``(n, 1)`` vs ``(n,)``, and binary classifiers
    whose ONNX scores are ``(n, 2)`` while ``decision_function`` is ``(n,)``."""
    if out.shape == ref.shape:
        return out
    if out.size == ref.size:
        return out.reshape(ref.shape)
    if ref.ndim == 1 and out.ndim == 2 and out.shape == (ref.shape[0], 2):
        return out[:, 1]
    return None


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    both_nan = np.isnan(a64) & np.isnan(b64)
    diff = np.where(both_nan, 0.0, np.abs(a64 - b64))
    return float(np.nan_to_num(diff, nan=np.inf).max())


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b| / |b|`` over the elements where ``b`` is not zero (0 if there are none)."""
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    nonzero = (b64 != 0) & ~(np.isnan(a64) & np.isnan(b64))
    if not nonzero.any():
        return 0.0
    rel = np.abs(a64[nonzero] - b64[nonzero]) / np.abs(b64[nonzero])
    return float(np.nan_to_num(rel, nan=np.inf).max())

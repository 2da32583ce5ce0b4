"""Parity inside the sandbox: the ONNX output run by ONNX Runtime against the original model
on seeded inputs. It catches honest conversion bugs; it proves nothing against a hostile
artifact, which controls this process (research/conversion.md §0.1).

Tolerance for floats is ``|onnx - ref| <= ATOL + RTOL * |ref|`` with ATOL=1e-5, RTOL=1e-4
(the float32 policy of research/conversion.md §7); labels must match exactly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from airlock_sandbox.contract import WorkerExit

from .errors import WorkerError
from .report import ParityEntry, Report
from .spec_types import PARITY_ROWS, concrete_shape

ATOL = 1e-5
RTOL = 1e-4
SEED = 20240607
FLOAT_TOLERANCE = f"atol={ATOL:g} rtol={RTOL:g}"
EXACT = "exact"


class Expected:
    """One reference output; ``exact`` for labels, which must match bit for bit."""

    def __init__(self, value: Any, exact: bool = False) -> None:
        self.value = None if value is None else np.asarray(value)
        self.exact = exact


#: Given the feeds (name -> array), the original model's outputs, aligned with the ONNX
#: outputs; ``None`` marks an ONNX output with no counterpart.
Reference = Callable[[dict[str, np.ndarray]], Sequence[Expected | None]]


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
            raise _Unsupported(f"cannot generate {dtype} input {spec['name']!r}")
    return feeds


class _Unsupported(Exception):
    pass


def session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def check(onnx_bytes: bytes, inputs: list[dict[str, Any]], reference: Reference,
          report: Report) -> None:
    """Run both on a batch of PARITY_ROWS and a batch of one; record one entry per output;
    raise PARITY_FAILED if any output differs beyond tolerance."""
    sess = session(onnx_bytes)
    names = [o.name for o in sess.get_outputs()]
    merged: dict[str, ParityEntry] = {}
    for rows, seed in ((PARITY_ROWS, SEED), (1, SEED + 1)):
        try:
            feeds = random_feeds(inputs, rows, seed)
        except _Unsupported as exc:
            report.warn(f"parity not checked: {exc}")
            return
        got = sess.run(None, feeds)
        want = reference(feeds)
        for name, g, w in zip(names, got, want, strict=False):
            if w is None or w.value is None:
                continue
            entry = compare(name, g, w, rows)
            seen = merged.get(name)
            if seen is not None:
                entry.samples += seen.samples
                entry.max_abs_diff = max(entry.max_abs_diff, seen.max_abs_diff)
                entry.passed = entry.passed and seen.passed
            merged[name] = entry
    report.parity = list(merged.values())
    if not report.parity:
        report.warn("parity not checked: no comparable outputs")
    failed = [e for e in report.parity if not e.passed]
    if failed:
        raise WorkerError(WorkerExit.PARITY_FAILED, failure_message(failed))


def failure_message(failed: Sequence[ParityEntry]) -> str:
    """A sentence with what was measured and what was allowed, per failing output."""
    parts = []
    for e in failed:
        if e.max_abs_diff == float("inf"):
            parts.append(f"{e.output_name!r} does not match in shape or kind")
        else:
            parts.append(f"{e.output_name!r} differs by up to {e.max_abs_diff:.3g} "
                         f"(allowed: {e.tolerance})")
    samples = max(e.samples for e in failed)
    return (f"{'; '.join(parts)}, on {samples} seeded samples: the converter does not "
            "reproduce this model, and nothing was written")


def compare(name: str, got: Any, want: Expected, rows: int) -> ParityEntry:
    assert want.value is not None
    ref = want.value
    out = _align(np.asarray(got), ref)
    tolerance = EXACT if want.exact else FLOAT_TOLERANCE
    if out is None:
        return ParityEntry(name, rows, float("inf"), tolerance, False)
    if want.exact or ref.dtype.kind not in "fc" or out.dtype.kind not in "fc":
        same = bool(np.array_equal(out, ref))
        diff = _max_abs(out, ref) if ref.dtype.kind in "biuf" and out.dtype.kind in "biuf" else (
            0.0 if same else float("inf"))
        return ParityEntry(name, rows, diff, EXACT, same)
    ok = bool(np.allclose(out, ref, rtol=RTOL, atol=ATOL, equal_nan=True))
    return ParityEntry(name, rows, _max_abs(out, ref), tolerance, ok)


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

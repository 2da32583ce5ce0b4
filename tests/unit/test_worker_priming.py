"""The warm-up's priming conversion (airlock_worker.priming) must not be observable by the job
that follows: the same ONNX bytes and parity entries as in a fresh process, no change to
skl2onnx's converter registry or numpy's global random state, nothing written anywhere.

No artifact is loaded: the models are built (fitted) in the test's own processes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from airlock_sandbox.formats import PROFILE_LIGHT, PROFILE_SKLEARN, PROFILE_TORCH
from airlock_worker import priming
from tests.unit.fresh_interpreters import printed_results

ROOT = Path(__file__).resolve().parents[2]

#: Run in a fresh interpreter: optionally prime, then convert two models fitted from code
#: through the worker's path and print the outputs (tests/unit/worker_outputs.py).
_CONVERT = r'''
import json, sys
sys.path[:0] = [sys.argv[1] + "/sandbox", sys.argv[1]]
if sys.argv[3] == "primed":
    from airlock_worker.priming import prime
    prime("sklearn")
from tests.unit.worker_outputs import two_conversions
print("RESULT " + json.dumps(two_conversions(sys.argv[2], sys.argv[3]), sort_keys=True))
'''


def _convert(tmp_path: Path, *variants: str) -> list[dict[str, object]]:
    """One fresh interpreter per variant, all at once (each spends seconds importing)."""
    return printed_results(*(["-c", _CONVERT, str(ROOT), str(tmp_path), variant]
                             for variant in variants))


def test_a_primed_process_converts_exactly_like_a_fresh_one(tmp_path: Path) -> None:
    """Byte for byte, but for the graph's name: skl2onnx draws a uuid4 for it on every
    conversion, primed or not."""
    fresh, primed = _convert(tmp_path, "fresh", "primed")
    assert set(fresh) == {"pipeline", "forest"}
    assert fresh == primed


def test_priming_leaves_the_converter_registry_and_global_rng_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import skl2onnx  # noqa: F401  (registers its converters at import, as in the warm-up)
    from skl2onnx.common import _registration

    monkeypatch.chdir(tmp_path)
    pools = (_registration._converter_pool, _registration._shape_calculator_pool)
    before = [dict(pool) for pool in pools]
    rng_before = np.random.get_state()
    priming.prime(PROFILE_SKLEARN)
    assert [dict(pool) for pool in pools] == before
    rng_after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(rng_before, rng_after, strict=True))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("profile", [PROFILE_LIGHT, PROFILE_TORCH])
def test_other_profiles_are_not_primed_with_sklearn(
        profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Priming is per profile: a torch or light container never converts a sklearn model."""
    calls: list[str] = []
    monkeypatch.setattr(priming, "_prime_sklearn", lambda: calls.append("sklearn"))
    priming.prime(profile)
    assert calls == []
    priming.prime(PROFILE_SKLEARN)
    assert calls == ["sklearn"]

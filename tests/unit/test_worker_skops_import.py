"""``import skops.io`` in the worker (airlock_worker.skops_import) must not import torch, and
must leave skops exactly as a plain import does: the same default trusted types (what decides
whether a skops file loads without allow_code), and the hidden sklearn package importable
again afterwards. Each side runs in a fresh interpreter (imports are once per process)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.fresh_interpreters import run_at_once

ROOT = Path(__file__).resolve().parents[2]

_PROBE = r'''
import json, sys
sys.path[:0] = [sys.argv[1] + "/sandbox"]
if sys.argv[2] == "worker":
    from airlock_worker.skops_import import TORCH_SHIM, import_skops_io
    skops_io = import_skops_io()
    torch_after_import = "torch" in sys.modules
    shim_left_hidden = TORCH_SHIM in sys.modules
else:
    import skops.io as skops_io
    torch_after_import = shim_left_hidden = None
from skops.io import _trusted_types as t
trusted = {name: sorted(map(str, value)) for name, value in vars(t).items()
           if name.endswith("_TYPE_NAMES")}
import importlib
shim_importable = importlib.import_module("sklearn.externals.array_api_compat.torch") is not None
print(json.dumps({"torch": torch_after_import, "hidden": shim_left_hidden,
                  "trusted": trusted, "shim_importable": shim_importable}))
'''


def _probes(*modes: str) -> list[dict[str, object]]:
    """One fresh interpreter per mode, all at once (each spends seconds importing)."""
    results = []
    for returncode, out, err in run_at_once(*(["-c", _PROBE, str(ROOT), mode] for mode in modes)):
        assert returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_skops_io_imports_without_torch_and_trusts_the_same_types() -> None:
    worker, plain = _probes("worker", "plain")
    assert worker["torch"] is False, "import_skops_io imported torch"
    assert worker["hidden"] is False, "the torch shim was left marked unimportable"
    assert worker["trusted"] == plain["trusted"]
    assert len(worker["trusted"]["SKLEARN_ESTIMATOR_TYPE_NAMES"]) > 100  # type: ignore[index]
    assert worker["shim_importable"] is True


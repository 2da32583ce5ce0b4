"""A sklearn container skips SciPy's docstring parsing while it imports (airlock_worker.
doc_parsing): the skip must take effect with the pinned SciPy, and must change nothing but
docstrings: the same ONNX bytes, the same report, the same statistics.

No artifact is loaded: the models are built (fitted) in the test's own processes."""

from __future__ import annotations

from pathlib import Path

from tests.unit.fresh_interpreters import printed_results

ROOT = Path(__file__).resolve().parents[2]

#: In a fresh interpreter, with the skip or without it (argv[3]) before anything imports
#: scipy.stats: convert two fitted models through the worker's path, call the SciPy functions
#: whose docstrings the skip leaves unparsed, and print all of it.
_RUN = r'''
import json, sys
sys.path[:0] = [sys.argv[1] + "/sandbox", sys.argv[1]]
if sys.argv[3] == "skipped":
    from airlock_worker.doc_parsing import skip_scipy_docstring_parsing
    assert skip_scipy_docstring_parsing()
import scipy.stats
out = {"docs_parsed": "Parameters\n----------" in (scipy.stats.rankdata.__doc__ or ""),
       "stats": [scipy.stats.rankdata([3.0, 1.0, 2.0, 2.0]).tolist(),
                 float(scipy.stats.gmean([1.0, 2.0, 4.0])),
                 float(scipy.stats.mode([1, 2, 2, 3], keepdims=False).mode),
                 float(scipy.stats.norm.cdf(0.5))]}
from tests.unit.worker_outputs import two_conversions
out.update(two_conversions(sys.argv[2], sys.argv[3]))
print("RESULT " + json.dumps(out, sort_keys=True))
'''


def test_skipping_scipy_docstring_parsing_changes_nothing_but_docstrings(tmp_path: Path) -> None:
    results = printed_results(*(["-c", _RUN, str(ROOT), str(tmp_path), variant]
                                for variant in ("parsed", "skipped")))
    parsed, skipped = results
    # The skip took effect (a SciPy that renamed its parser would leave it a no-op)...
    assert parsed.pop("docs_parsed") is True
    assert skipped.pop("docs_parsed") is False
    # ...and nothing else differs.
    assert set(parsed) == {"stats", "pipeline", "forest"}
    assert parsed == skipped

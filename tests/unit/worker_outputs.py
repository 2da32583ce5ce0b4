"""What the worker writes for two models, for tests that compare fresh interpreters (imported
in the interpreter under test, after whatever it set up): the fixtures' pipeline and a 5-tree
forest, fitted from code and converted through the worker's path (``convert_object`` ->
``write_onnx``). No artifact is loaded."""

from __future__ import annotations

import json
import os
from typing import Any


def two_conversions(out_dir: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Per model: the ONNX bytes (hex, the graph's name blanked: skl2onnx draws a uuid4 for
    it on every conversion), that name's length, and the report without its timings."""
    import onnx
    from sklearn.ensemble import RandomForestClassifier

    from airlock_sandbox.contract import JobSpec
    from airlock_sandbox.formats import ArtifactFormat
    from airlock_worker import sklearn_convert
    from airlock_worker.job import Job
    from tests.fixtures.models import classification_data, sklearn_pipeline

    x, y = classification_data()
    models = {"pipeline": sklearn_pipeline(),
              "forest": RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)}
    out = {}
    for name, model in models.items():
        directory = os.path.join(out_dir, f"{prefix}-{name}")
        os.mkdir(directory)
        job = Job(spec=JobSpec(job_id="t"), artifact="", out_dir=directory,
                  fmt=ArtifactFormat.PICKLE)
        sklearn_convert.convert_object(job, model)
        report = json.loads(job.report.to_json())
        report.pop("timings", None)
        converted = onnx.load(os.path.join(directory, "model.onnx"))
        graph_name = converted.graph.name
        converted.graph.name = ""
        out[name] = {"onnx": converted.SerializeToString().hex(), "report": report,
                     "graph_name_length": len(graph_name)}
    return out

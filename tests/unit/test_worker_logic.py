"""Pure logic of the in-container worker, tested on the host without any artifact.

Nothing here loads a model: the worker's flattening, dedupe, parity comparison, safetensors
header checks and output staging run on values built in the test. The worker package is not
installed on the host (it is never imported by host code), so it is put on the path here."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from airlock_sandbox.contract import (
    ARTIFACT_NAME,
    OUTPUT_NAMES,
    REPORT_WARNING_CHARS,
    REPORT_WARNINGS,
    JobSpec,
    OutputFormat,
    WorkerExit,
)
from airlock_sandbox.formats import ArtifactFormat
from airlock_worker import detect, output, parity, passthrough, tensor_tree
from airlock_worker import job as worker_job
from airlock_worker.errors import WorkerError
from airlock_worker.report import Report


def _is_array(v: object) -> bool:
    return isinstance(v, np.ndarray)


# -- tensor_tree ---------------------------------------------------------------------------


def test_flatten_unwraps_state_dict_and_skips_training_state() -> None:
    w = np.ones(2)
    flat = tensor_tree.flatten({"state_dict": {"a.w": w}, "epoch": 3}, _is_array)
    assert flat.tensors == {"a.w": w}
    assert flat.skipped == []  # "epoch" lives beside state_dict, which alone is the weights
    assert flat.selected == "state_dict"
    assert flat.left_out == [tensor_tree.LeftOut("epoch", 0, 0)]


def test_flatten_nested_dicts_get_dotted_names_and_non_tensors_are_listed() -> None:
    flat = tensor_tree.flatten({"model": {"enc": {"w": np.ones(1)}}, "ema": {"w": np.zeros(1)},
                                "args": object(), "step": 7}, _is_array)
    assert sorted(flat.tensors) == ["ema.w", "model.enc.w"]
    assert [s.split(" ")[0] for s in flat.skipped] == ["args", "step"]


def test_flatten_reports_collisions_and_keeps_the_first() -> None:
    first = np.ones(1)
    flat = tensor_tree.flatten({"a.b": first, "a": {"b": np.zeros(1)}}, _is_array)
    assert flat.tensors["a.b"] is first
    assert flat.collisions == ["a.b"]


def test_flatten_depth_is_capped() -> None:
    deep: dict[str, object] = {"w": np.ones(1)}
    for _ in range(tensor_tree.MAX_DEPTH + 5):
        deep = {"x": deep}
    flat = tensor_tree.flatten(deep, _is_array)
    assert flat.tensors == {} and len(flat.skipped) == 1


# -- parity --------------------------------------------------------------------------------


def test_parity_float_tolerance_is_atol_plus_rtol() -> None:
    ref = np.array([1000.0, 0.0], dtype=np.float32)
    ok = parity.compare("y", ref + np.array([0.09, 9e-6], np.float32), parity.Expected(ref), 64)
    bad = parity.compare("y", ref + np.array([0.2, 0.0], np.float32), parity.Expected(ref), 64)
    assert ok.passed and ok.tolerance == parity.FLOAT_TOLERANCE
    assert not bad.passed


def test_parity_labels_must_match_exactly() -> None:
    entry = parity.compare("label", np.array([0, 1, 2]), parity.Expected(np.array([0, 1, 1])), 3)
    assert not entry.passed and entry.tolerance == parity.EXACT
    strings = parity.compare("label", np.array(["a", "b"], dtype=object),
                             parity.Expected(np.array(["a", "b"])), 2)
    assert strings.passed


def test_parity_nan_in_both_is_equal_nan_in_one_is_not() -> None:
    ref = np.array([np.nan, 1.0])
    assert parity.compare("y", ref.copy(), parity.Expected(ref), 2).passed
    assert not parity.compare("y", np.array([0.0, 1.0]), parity.Expected(ref), 2).passed


def test_parity_aligns_column_vectors_and_binary_scores() -> None:
    ref = np.array([0.5, -0.5])
    assert parity.compare("v", ref.reshape(2, 1), parity.Expected(ref), 2).passed
    scores = np.stack([-ref, ref], axis=1)
    assert parity.compare("s", scores, parity.Expected(ref), 2).passed
    assert not parity.compare("s", np.zeros((2, 3)), parity.Expected(ref), 2).passed


def test_random_feeds_are_seeded_and_follow_the_spec() -> None:
    spec = [{"name": "x", "dtype": "float32", "shape": [-1, 4]},
            {"name": "ids", "dtype": "int64", "shape": [-1, 3]}]
    a, b = parity.random_feeds(spec, 5, 1), parity.random_feeds(spec, 5, 1)
    assert a["x"].shape == (5, 4) and a["x"].dtype == np.float32
    assert a["ids"].dtype == np.int64 and a["ids"].min() >= 0
    assert all(np.array_equal(a[k], b[k]) for k in a)


# -- safetensors header checks of the canonical rewrite ------------------------------------


def _entries(header: dict[str, object], data_len: int) -> object:
    return passthrough._entries(header, data_len)


def _t(begin: int, end: int, dtype: str = "F32", shape: list[int] | None = None) -> dict:
    return {"dtype": dtype, "shape": shape if shape is not None else [(end - begin) // 4],
            "data_offsets": [begin, end]}


def test_safetensors_offsets_must_tile_the_data_section() -> None:
    assert _entries({"a": _t(0, 8), "b": _t(8, 16)}, 16)
    for header, data_len in (({"a": _t(0, 8), "b": _t(12, 20)}, 20),  # gap
                             ({"a": _t(0, 8), "b": _t(4, 12)}, 12),  # overlap
                             ({"a": _t(0, 8)}, 16)):  # trailing bytes
        with pytest.raises(WorkerError) as err:
            _entries(header, data_len)
        assert err.value.exit is WorkerExit.CONVERSION_FAILED


def test_safetensors_shape_times_dtype_must_equal_the_byte_length() -> None:
    with pytest.raises(WorkerError):
        _entries({"a": _t(0, 8, shape=[3])}, 8)
    with pytest.raises(WorkerError) as err:
        _entries({"a": _t(0, 8, dtype="F128")}, 8)
    assert err.value.exit is WorkerExit.UNSUPPORTED_MODEL


def test_safetensors_duplicate_keys_are_refused(tmp_path: Path) -> None:
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' \
          b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with open(path, "rb") as f, pytest.raises(WorkerError):
        passthrough._read_header(f, path.stat().st_size)


# -- detection -----------------------------------------------------------------------------


def test_zip_refinement_and_entry_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npz = tmp_path / "a.npz"
    with zipfile.ZipFile(npz, "w") as zf:
        zf.writestr("x.npy", b"")
        zf.writestr("y.npy", b"")
    assert detect.detect(str(npz)) is ArtifactFormat.NUMPY_NPZ
    monkeypatch.setattr(detect, "MAX_ZIP_ENTRIES", 1)
    with pytest.raises(WorkerError) as err:
        detect.detect(str(npz))
    assert err.value.exit is WorkerExit.UNSUPPORTED_FORMAT


def test_the_bytes_must_agree_with_the_brokers_decision(tmp_path: Path) -> None:
    path = tmp_path / "artifact"
    path.write_bytes(b"\x93NUMPY" + b"\0" * 64)
    assert detect.confirm(str(path), ArtifactFormat.NUMPY, "numpy") is ArtifactFormat.NUMPY
    assert detect.confirm(str(path), ArtifactFormat.NUMPY, None) is ArtifactFormat.NUMPY
    with pytest.raises(WorkerError) as err:
        detect.confirm(str(path), ArtifactFormat.PICKLE, None)  # the broker said otherwise
    assert err.value.exit is WorkerExit.FORMAT_MISMATCH
    assert "the broker read pickle" in err.value.message and "are numpy" in err.value.message
    with pytest.raises(WorkerError) as err:
        detect.confirm(str(path), None, None)  # the worker does not decide for the broker
    assert err.value.exit is WorkerExit.BAD_JOB_SPEC


def _zip(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(name, b"")
    return path


def test_a_zip_must_be_one_the_decision_admits(tmp_path: Path) -> None:
    """Inside a zip the sandbox tells which zip it is; it must be one the broker's decision
    (and the declaration) leave open, else FORMAT_MISMATCH."""
    npz = _zip(tmp_path / "a.npz", ["x.npy", "y.npy"])
    torch_zip = _zip(tmp_path / "t.pt", ["archive/data.pkl", "archive/data/0"])
    F = ArtifactFormat
    assert detect.confirm(str(npz), F.ZIP, None) is F.NUMPY_NPZ
    assert detect.confirm(str(npz), F.NUMPY_NPZ, "numpy") is F.NUMPY_NPZ
    assert detect.confirm(str(torch_zip), F.ZIP, "pytorch") is F.PYTORCH_ZIP
    for path, decided, declared in [(npz, F.ZIP, "pytorch"), (torch_zip, F.NUMPY_NPZ, None),
                                    (torch_zip, F.TORCHSCRIPT, "torchscript"),
                                    (npz, F.PICKLE, None)]:
        with pytest.raises(WorkerError) as err:
            detect.confirm(str(path), decided, declared)
        assert err.value.exit is WorkerExit.FORMAT_MISMATCH, (path, decided, declared)


def test_a_skops_file_is_told_from_an_npz_by_its_schema(tmp_path: Path) -> None:
    """skops.io.dump writes arrays named by object id and ``schema.json`` at the root; an
    MLflow bundle holding one is still a bundle (its MLmodel decides)."""
    F = ArtifactFormat
    skops = _zip(tmp_path / "m.skops", ["140568400880208.npy", "schema.json"])
    bundle = _zip(tmp_path / "b.zip", ["MLmodel", "model.skops"])
    assert detect.confirm(str(skops), F.SKOPS, "skops") is F.SKOPS
    assert detect.confirm(str(skops), F.ZIP, None) is F.SKOPS
    assert detect.detect(str(bundle)) is F.MLFLOW
    # Undeclared, its first member made the broker take it for an .npz: refused, not read.
    with pytest.raises(WorkerError) as err:
        detect.confirm(str(skops), F.NUMPY_NPZ, None)
    assert err.value.exit is WorkerExit.FORMAT_MISMATCH
    assert "are skops" in err.value.message


def test_the_worker_refuses_a_job_whose_bytes_contradict_the_spec(tmp_path: Path) -> None:
    """Through the worker's own entry: a torch zip sent as the .npz the broker took it for
    (its first member named .npy would do that) is refused before any loader runs."""
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    _zip(in_dir / ARTIFACT_NAME, ["archive/data.pkl", "archive/data/0"])
    report = Report()
    spec = JobSpec(job_id="t", artifact_format=ArtifactFormat.NUMPY_NPZ)
    with pytest.raises(WorkerError) as err:
        worker_job.run(spec, str(in_dir), str(out_dir), report)
    assert err.value.exit is WorkerExit.FORMAT_MISMATCH
    assert "the broker read numpy_npz" in err.value.message
    assert report.loader == "" and not list(out_dir.iterdir())


# -- output staging and the report ----------------------------------------------------------


def test_staged_output_is_renamed_on_success_and_removed_on_failure(tmp_path: Path) -> None:
    with output.staged(str(tmp_path), OutputFormat.ONNX, 100) as tmp, open(tmp, "wb") as f:
        f.write(b"x" * 10)
    assert os.listdir(tmp_path) == [OUTPUT_NAMES[OutputFormat.ONNX]]
    (tmp_path / OUTPUT_NAMES[OutputFormat.ONNX]).unlink()
    # Over the cap: nothing may be left behind.
    with pytest.raises(WorkerError) as err, \
            output.staged(str(tmp_path), OutputFormat.SAFETENSORS, 5) as tmp, open(tmp, "wb") as f:
        f.write(b"x" * 10)
    assert err.value.exit is WorkerExit.OUTPUT_TOO_LARGE
    assert os.listdir(tmp_path) == []


def test_report_is_capped_and_json_safe() -> None:
    report = Report()
    for i in range(REPORT_WARNINGS + 10):
        report.warn("w" * 1000 + str(i))
    report.parity.append(parity.ParityEntry("y", 1, float("inf"), "exact", False))
    doc = json.loads(report.to_json())
    # As many as a caller is shown (api/claims.py), the last saying that more were left out.
    assert len(doc["warnings"]) == REPORT_WARNINGS
    assert doc["warnings"][-1] == "further warnings omitted"
    assert all(len(w) <= REPORT_WARNING_CHARS for w in doc["warnings"])
    assert doc["parity"][0]["max_abs_diff"] == "inf"


# -- parity failure leaves no output --------------------------------------------------------


def _affine_model() -> object:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        initializer=[numpy_helper.from_array(np.ones(2, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _job(tmp_path: Path) -> object:
    from airlock_sandbox.contract import JobSpec
    from airlock_worker.job import Job

    return Job(spec=JobSpec(job_id="t"), artifact="", out_dir=str(tmp_path),
               fmt=ArtifactFormat.ONNX)


def test_parity_failure_writes_nothing(tmp_path: Path) -> None:
    job = _job(tmp_path)

    def off_by_one(feeds: dict[str, np.ndarray]) -> list[parity.Expected]:
        return [parity.Expected(feeds["x"] + 2.0)]

    with pytest.raises(WorkerError) as err:
        job.write_onnx(_affine_model(), "test", off_by_one)  # type: ignore[attr-defined]
    assert err.value.exit is WorkerExit.PARITY_FAILED
    assert os.listdir(tmp_path) == []
    assert job.report.parity and not job.report.parity[0].passed  # type: ignore[attr-defined]
    # A sentence with the output's name, the measured difference and the tolerance: no repr.
    message = err.value.message
    assert "'y' differs by up to 1, relative " in message, message
    assert "(allowed: atol=1e-05 rtol=0.0001)" in message, message
    assert "[" not in message and "{" not in message, message


def test_parity_success_writes_the_model_and_records_both_batches(tmp_path: Path) -> None:
    job = _job(tmp_path)

    def exact(feeds: dict[str, np.ndarray]) -> list[parity.Expected]:
        return [parity.Expected(feeds["x"] + 1.0)]

    job.write_onnx(_affine_model(), "test", exact)  # type: ignore[attr-defined]
    assert os.listdir(tmp_path) == [OUTPUT_NAMES[OutputFormat.ONNX]]
    (entry,) = job.report.parity  # type: ignore[attr-defined]
    assert entry.passed and entry.samples == parity.PARITY_ROWS + 1


def test_a_warm_worker_looks_for_its_job_fast_at_first_then_at_the_idle_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst's job is picked up within 5 ms; an idle container looks every ``idle_poll``."""
    from airlock_sandbox.contract import JOB_SPEC_NAME, SPEC_POLL_FAST_SECONDS, SPEC_POLL_SECONDS
    from airlock_worker import __main__ as worker_main

    clock = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds
        if clock[0] >= 100.0 + SPEC_POLL_FAST_SECONDS + 0.5:  # the job comes while idle
            (tmp_path / JOB_SPEC_NAME).write_bytes(JobSpec(job_id="j").to_json())

    monkeypatch.setattr(worker_main.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(worker_main.time, "sleep", sleep)
    spec = worker_main.wait_for_spec(str(tmp_path), 60.0, idle_poll=0.05)
    assert spec.job_id == "j"
    fast = [s for s in sleeps if s == SPEC_POLL_SECONDS]
    assert len(fast) == pytest.approx(SPEC_POLL_FAST_SECONDS / SPEC_POLL_SECONDS, abs=2)
    assert sleeps[:len(fast)] == fast  # fast first ...
    assert set(sleeps[len(fast):]) == {0.05} and len(sleeps) > len(fast)  # ... then idle

"""The bounded view an MLflow bundle's model member is read through (no tmpfs copy), and the
``onnx`` flavor: external tensors inlined from bundle members, every range checked."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from airlock_client._bundle import inspect, pack
from airlock_sandbox.contract import JobSpec, WorkerExit
from airlock_sandbox.formats import ArtifactFormat
from airlock_worker import mlflow_convert, mlflow_model
from airlock_worker.errors import WorkerError
from airlock_worker.job import Job
from airlock_worker.member_view import MemberView, open_member

FIRST = bytes(range(256)) * 40  # 10240 bytes
SECOND = b"S" * 4096  # the next member: the view must never hand these out


def _bundle(path: Path, members: dict[str, bytes]) -> dict[str, zipfile.ZipInfo]:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("MLmodel", "flavors: {}")
        for name, data in members.items():
            zf.writestr(name, data)
    with zipfile.ZipFile(path) as zf:
        return {i.filename: i for i in zf.infolist()}


def test_view_reads_exactly_the_member_and_nothing_past_it(tmp_path: Path) -> None:
    infos = _bundle(tmp_path / "b.zip", {"first": FIRST, "second": SECOND})
    with open_member(str(tmp_path / "b.zip"), infos["first"]) as view:
        assert view.read() == FIRST
        assert view.read(1) == b"" and view.read() == b""  # at the end: nothing more
        view.seek(len(FIRST) - 3)
        assert view.read(100) == FIRST[-3:]  # a read across the end stops at the end
        view.seek(10 * len(FIRST))  # seeking past the end is allowed, reading there is not
        assert view.read(4096) == b""
        view.seek(-5, io.SEEK_END)
        assert view.read() == FIRST[-5:]
        with pytest.raises(ValueError):
            view.seek(-1)
        with pytest.raises(io.UnsupportedOperation):  # no raw descriptor to read around it
            view.fileno()
        assert view.seek(0, io.SEEK_END) == len(FIRST)


def test_raw_view_refuses_bounds_outside_the_file_and_short_reads(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(WorkerError) as caught:
        MemberView(fd, 90, 11, "m")
    assert caught.value.exit is WorkerExit.UNSAFE_MODEL_DIR
    fd = os.open(path, os.O_RDONLY)
    with MemberView(fd, 10, 20, "m") as view:
        buf = bytearray(1000)
        assert view.readinto(buf) == 20 and view.readinto(buf) == 0
    with pytest.raises(ValueError):
        view.readinto(bytearray(1))


def test_corrupted_member_fails_its_crc_before_any_loader(tmp_path: Path) -> None:
    path = tmp_path / "b.zip"
    infos = _bundle(path, {"first": FIRST})
    data = bytearray(path.read_bytes())
    at = data.find(FIRST)
    data[at + 5000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WorkerError) as caught:
        open_member(str(path), infos["first"])
    assert caught.value.exit is WorkerExit.UNSAFE_MODEL_DIR and "CRC" in caught.value.message


def test_local_header_must_agree_with_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "b.zip"
    infos = _bundle(path, {"first": FIRST})
    data = path.read_bytes()
    at = infos["first"].header_offset
    path.write_bytes(data[:at + 30] + b"F" + data[at + 31:])  # the local name: "First"
    with pytest.raises(WorkerError) as caught:
        open_member(str(path), infos["first"])
    assert "names differ" in caught.value.message
    info = zipfile.ZipInfo("first")
    info.header_offset, info.file_size, info.compress_size = len(data) - 10, 100, 100
    with pytest.raises(WorkerError):
        open_member(str(path), info)


def test_loaders_read_the_view_in_place(tmp_path: Path) -> None:
    import torch  # a dev dependency: missing, this test fails rather than skips
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0)}, buf)
    infos = _bundle(tmp_path / "b.zip", {"data/model.pth": buf.getvalue(), "after": SECOND})
    with open_member(str(tmp_path / "b.zip"), infos["data/model.pth"]) as view:
        loaded = torch.load(view, weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(6.0))


# -- the onnx flavor -------------------------------------------------------------------------


def test_onnx_flavor_and_pyfunc_loader_choose_the_model_member() -> None:
    members = {n: zipfile.ZipInfo(n) for n in ("MLmodel", "model.onnx")}
    native = mlflow_model.plan({"flavors": {
        "onnx": {"data": "model.onnx"},
        "python_function": {"loader_module": "mlflow.onnx", "data": "model.onnx"}}}, members)
    wrapped = mlflow_model.plan({"flavors": {
        "python_function": {"loader_module": "mlflow.onnx", "data": "model.onnx"}}}, members)
    for chosen in (native, wrapped):
        assert (chosen.flavor, chosen.member, chosen.serialization) == \
            ("onnx", "model.onnx", "onnx")


def _onnx_model_dir(root: Path, weights: np.ndarray, *, location: str | None = None,
                    offset: int | None = None) -> Path:
    """What mlflow.onnx.save_model writes by default: the graph plus an external data file."""
    root.mkdir()
    init = numpy_helper.from_array(weights, "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [None, weights.shape[0]])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [None, weights.shape[1]])],
        [init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, str(root / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    if location is not None or offset is not None:
        model = onnx.load_model(str(root / "model.onnx"), load_external_data=False)
        entries = {e.key: e for e in model.graph.initializer[0].external_data}
        if location is not None:
            entries["location"].value = location
        if offset is not None:
            entries["offset"].value = str(offset) if "offset" in entries else ""
            if "offset" not in entries:
                model.graph.initializer[0].external_data.add(key="offset", value=str(offset))
        onnx.save_model(model, str(root / "model.onnx"))
    (root / "MLmodel").write_text(
        "flavors:\n  onnx: {data: model.onnx, onnx_version: 1.17.0}\n"
        "  python_function: {loader_module: mlflow.onnx, data: model.onnx}\n")
    return root


def _convert(tmp_path: Path, model_dir: Path) -> Job:
    bundle = tmp_path / "bundle.zip"
    pack(inspect(model_dir), bundle)
    out = tmp_path / "out"
    out.mkdir()
    job = Job(spec=JobSpec(job_id="t"), artifact=str(bundle), out_dir=str(out),
              fmt=ArtifactFormat.MLFLOW)
    mlflow_convert.convert(job)
    return job


def test_onnx_flavor_inlines_external_data_and_passes_through(tmp_path: Path) -> None:
    weights = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    job = _convert(tmp_path, _onnx_model_dir(tmp_path / "m", weights))
    assert job.report.detected_format == "mlflow:onnx/onnx"
    assert job.report.converter == "passthrough"
    assert job.report.executed_artifact_code is False
    out = onnx.load_model(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    (init,) = out.graph.initializer
    assert not init.external_data and init.data_location == onnx.TensorProto.DEFAULT
    np.testing.assert_array_equal(numpy_helper.to_array(init), weights)


@pytest.mark.parametrize("location,offset", [
    ("../outside.data", None), ("/etc/passwd", None), ("MLmodel2", None),
    (None, 10**9),
])
def test_onnx_external_data_outside_the_bundle_is_refused(
        tmp_path: Path, location: str | None, offset: int | None) -> None:
    weights = np.ones((16, 4), dtype=np.float32)
    with pytest.raises(WorkerError) as caught:
        _convert(tmp_path, _onnx_model_dir(tmp_path / "m", weights, location=location,
                                           offset=offset))
    assert caught.value.exit is WorkerExit.UNSAFE_MODEL_DIR


def test_a_refused_view_never_closes_a_descriptor_it_no_longer_owns(tmp_path: Path) -> None:
    """A view refused in its constructor is still finalised later (IOBase.__del__); by then
    its old descriptor number may belong to someone else, which must stay open."""
    import gc

    path = tmp_path / "b.zip"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(WorkerError, match="outside the bundle") as caught:
        MemberView(fd, 90, 50, "m")  # its traceback keeps the refused view alive
    other = os.open(path, os.O_RDONLY)  # most likely the number just freed
    assert other == fd
    try:
        del caught
        gc.collect()  # the refused view is finalised now
        os.fstat(other)  # still ours
    finally:
        os.close(other)

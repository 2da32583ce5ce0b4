"""MLflow model directories and bundles: the client's checks, packer and flavor hint, the
broker's decision from the declaration alone (it opens no archive), and the worker's
re-check of every member (hostile zips)."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.conversion.format_decision import (
    check_flavor_hint,
    check_serialization_hint,
    decide,
)
from airlock_broker.errors import AirlockError
from airlock_client import ModelSourceError, mlflow_source
from airlock_client._bundle import inspect, pack
from airlock_sandbox.bundle import MAX_MEMBERS, BundleError, serialization_hint
from airlock_sandbox.formats import ArtifactFormat, detect_prefix
from airlock_worker import mlflow_model
from airlock_worker.mlflow_model import check_members

MLMODEL = """\
flavors:
  python_function: {loader_module: mlflow.sklearn, model_path: model.pkl}
  sklearn: {pickled_model: model.pkl, serialization_format: pickle}
signature:
  inputs: '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 4]}}]'
"""


def model_dir(root: Path, mlmodel: str = MLMODEL) -> Path:
    root.mkdir()
    (root / "MLmodel").write_text(mlmodel)
    (root / "model.pkl").write_bytes(b"\x80\x04not really a pickle.")
    (root / "data").mkdir()
    (root / "data" / "notes.txt").write_text("x")
    return root


# -- the client: what a directory may hold ---------------------------------------------------


def test_a_plain_model_directory_is_accepted(tmp_path: Path) -> None:
    checked = inspect(model_dir(tmp_path / "m"))
    assert [f.name for f in checked.files] == ["MLmodel", "data/notes.txt", "model.pkl"]
    assert checked.flavors == ("python_function", "sklearn")


def _refused(path: Path, needle: str, **kwargs: int) -> None:
    with pytest.raises(ModelSourceError) as caught:
        inspect(path, **kwargs)
    assert caught.value.reason in {"UNSAFE_MODEL_DIR", "NOT_A_MODEL_DIR"}
    assert needle in caught.value.message


def test_symlink_inside_is_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m")
    (root / "data" / "passwd").symlink_to("/etc/passwd")
    _refused(root, "symbolic link")


def test_symlinked_directory_is_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m")
    (root / "etc").symlink_to("/etc", target_is_directory=True)
    _refused(root, "symbolic link")


def test_hard_link_is_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m")
    outside = tmp_path / "secret"
    outside.write_text("host secret")
    os.link(outside, root / "data" / "copy")
    _refused(root, "hard link")


def test_fifo_is_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m")
    os.mkfifo(root / "data" / "pipe")
    _refused(root, "not a regular file")


def test_missing_mlmodel_is_not_a_model(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m")
    (root / "MLmodel").unlink()
    _refused(root, "no MLmodel")


def test_mlmodel_over_the_cap_is_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m", MLMODEL + "#" * (1024 * 1024))
    _refused(root, "limit")


def test_mlmodel_is_read_with_safe_load(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m", "flavors: !!python/object/apply:os.system ['touch x']\n")
    _refused(root, "not valid YAML")
    assert not Path("x").exists()


@pytest.mark.parametrize("reference", ["../../etc/passwd", "/etc/passwd", "data/../../x",
                                       "..\\\\evil"])
def test_mlmodel_paths_outside_the_root_are_refused(tmp_path: Path, reference: str) -> None:
    root = model_dir(tmp_path / "m", MLMODEL.replace("pickled_model: model.pkl",
                                                     f"pickled_model: '{reference}'"))
    _refused(root, "outside the model directory")


def test_file_count_and_size_caps(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m")
    _refused(root, "more than 2 files", max_files=2)
    _refused(root, "bytes in total", max_total_bytes=100)


def test_names_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m")
    (root / "Model.pkl").write_bytes(b"x")
    _refused(root, "case")


def test_pack_is_deterministic_stored_and_mlmodel_first(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m")
    pack(inspect(root), tmp_path / "a.zip")
    os.utime(root / "model.pkl", (1, 1))  # timestamps and order of creation do not matter
    pack(inspect(root), tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        infos = zf.infolist()
    assert infos[0].filename == "MLmodel"
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    assert all(stat.S_ISREG(i.external_attr >> 16) for i in infos)
    check_members(infos, (tmp_path / "a.zip").stat().st_size, 10**9)  # the worker agrees


def test_resolve_of_a_local_directory_checks_it_in_place(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m")
    assert mlflow_source.resolve(root, tmp_path / "unused") == root.resolve()
    assert not (tmp_path / "unused").exists()
    assert mlflow_source.suggested_name("models:/fraud@champion") == "fraud-champion"
    assert mlflow_source.suggested_name("runs:/abc/model/../x") == "abc-model-..-x"


# -- hostile bundles: the broker's names-only look, and the worker's re-check -------------------


def _zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]],
         compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _symlink_member(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


HOSTILE: dict[str, list[tuple[str | zipfile.ZipInfo, bytes]]] = {
    "traversal": [("MLmodel", b"flavors: {}"), ("../../etc/cron.d/x", b"x")],
    "absolute": [("MLmodel", b"flavors: {}"), ("/etc/passwd", b"x")],
    "backslash": [("MLmodel", b"flavors: {}"), ("..\\evil", b"x")],
    "symlink": [("MLmodel", b"flavors: {}"), (_symlink_member("model.pkl", "/etc"), b"/etc")],
    "directory-entry": [("MLmodel", b"flavors: {}"), ("data/", b"")],
    "duplicate": [("MLmodel", b"flavors: {}"), ("model.pkl", b"a"), ("model.pkl", b"b")],
    "case-duplicate": [("MLmodel", b"flavors: {}"), ("a.pkl", b"a"), ("A.pkl", b"b")],
    "control-char": [("MLmodel", b"flavors: {}"), ("model\x1b[2J.pkl", b"x")],
    "no-mlmodel": [("model.pkl", b"x")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_worker_recheck_refuses_hostile_bundles(case: str, tmp_path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        path = _zip(tmp_path / "b.zip", HOSTILE[case])
    with zipfile.ZipFile(path) as zf, pytest.raises(BundleError):
        check_members(zf.infolist(), path.stat().st_size, 10**9)


def test_worker_refuses_compressed_members_and_overlaps(tmp_path: Path) -> None:
    deflated = _zip(tmp_path / "d.zip", [("MLmodel", b"flavors: {}" * 100)], zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(deflated) as zf, pytest.raises(BundleError, match="compressed"):
        check_members(zf.infolist(), deflated.stat().st_size, 10**9)
    stored = _zip(tmp_path / "s.zip", [("MLmodel", b"x" * 1000)])
    with zipfile.ZipFile(stored) as zf, pytest.raises(BundleError, match="more bytes"):
        check_members(zf.infolist(), 500, 10**9)  # members claim more than the archive holds


def test_worker_refuses_too_many_members(tmp_path: Path) -> None:
    path = _zip(tmp_path / "many.zip",
                [("MLmodel", b"")] + [(f"f{i}", b"") for i in range(MAX_MEMBERS)])
    with zipfile.ZipFile(path) as zf, pytest.raises(BundleError, match="more than"):
        check_members(zf.infolist(), path.stat().st_size, 10**9)


def _decided(path: Path, declared: str | None, flavor: str | None = None) -> tuple[str, str]:
    raw = path.read_bytes()
    decision = decide(raw[:64], len(raw), declared, flavor)
    return decision.format.value, decision.profile


def test_broker_takes_a_zip_for_a_bundle_only_when_declared(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m")
    bundle = tmp_path / "bundle.zip"
    pack(inspect(root), bundle)
    raw = bundle.read_bytes()
    assert detect_prefix(raw[:64], len(raw)) is ArtifactFormat.ZIP
    assert _decided(bundle, "mlflow") == ("mlflow", "sklearn")
    assert _decided(bundle, "mlflow", "pytorch") == ("mlflow", "torch")
    assert _decided(bundle, None) == ("zip", "torch")  # the sandbox refuses it undeclared
    torch_zip = _zip(tmp_path / "t.zip", [("archive/data.pkl", b"x")])
    # Names are the sandbox's business: a declared "bundle" that is not one is refused there.
    assert _decided(torch_zip, "mlflow") == ("mlflow", "sklearn")
    pickle_file = tmp_path / "p.pkl"
    pickle_file.write_bytes(b"\x80\x04N.")
    with pytest.raises(AirlockError) as caught:
        _decided(pickle_file, "mlflow")
    assert caught.value.reason == "FORMAT_MISMATCH"
    assert "an MLflow bundle is a zip" in caught.value.message


@pytest.mark.parametrize(("declared", "flavor", "needle"), [
    (None, "sklearn", "only meaningful"), ("pickle", "pytorch", "only meaningful"),
    ("mlflow", "pyfunc", "not one of"), ("mlflow", "x" * 100, "not one of"),
])
def test_a_flavor_hint_must_be_a_known_flavor_of_a_declared_bundle(
        declared: str | None, flavor: str, needle: str) -> None:
    with pytest.raises(AirlockError) as caught:
        check_flavor_hint(declared, flavor)
    assert caught.value.reason == "BAD_REQUEST" and needle in caught.value.message
    assert check_flavor_hint("mlflow", "") is None
    assert check_flavor_hint("mlflow", "onnx") == "onnx"


@pytest.mark.parametrize(("mlmodel", "hint"), [
    (MLMODEL, "sklearn"),
    ("flavors: {pytorch: {model_data: data}, python_function: {loader_module: mlflow.pytorch}}",
     "pytorch"),
    ("flavors: {python_function: {loader_module: mlflow.onnx, data: model.onnx}}", "onnx"),
    ("flavors: {python_function: {loader_module: mlflow.pyfunc.model}}", ""),
])
def test_the_client_hints_the_flavor_the_worker_will_plan(tmp_path: Path, mlmodel: str,
                                                         hint: str) -> None:
    assert inspect(model_dir(tmp_path / "m", mlmodel)).flavor_hint == hint


@pytest.mark.parametrize(("flavors", "hint"), [
    ({"sklearn": {"pickled_model": "model.pkl"}}, "pickle"),  # MLflow's default when unsaid
    ({"sklearn": {"pickled_model": "model.pkl", "serialization_format": "cloudpickle"}},
     "cloudpickle"),
    ({"sklearn": {"pickled_model": "model.pkl", "serialization_format": "skops"}}, "skops"),
    ({"lightgbm": {"data": "model.pkl"}}, "text"),  # a Booster, MLflow's default class
    ({"lightgbm": {"data": "model.pkl", "model_class": "lightgbm.sklearn.LGBMClassifier",
                   "serialization_format": "cloudpickle"}}, "cloudpickle"),
])
def test_the_client_hints_the_serialization_the_worker_will_plan(flavors: dict[str, Any],
                                                                hint: str) -> None:
    """The client's hint and the worker's plan read the same keys of the same MLmodel."""
    members = {"MLmodel": zipfile.ZipInfo("MLmodel"), "model.pkl": zipfile.ZipInfo("model.pkl")}
    planned = mlflow_model.plan({"flavors": flavors}, members)
    assert serialization_hint(flavors, planned.flavor) == planned.serialization == hint


def test_other_flavors_and_unknown_formats_hint_nothing() -> None:
    assert serialization_hint({"pytorch": {"model_data": "data"}}, "pytorch") == ""
    assert serialization_hint({"sklearn": {"serialization_format": "joblib"}}, "sklearn") == ""
    assert serialization_hint({"python_function": {}}, "sklearn") == ""


@pytest.mark.parametrize(("flavor", "serialization", "problem"), [
    ("sklearn", "", None), ("lightgbm", "text", None), ("sklearn", "skops", None),
    ("pytorch", "pickle", "only meaningful with mlflow_flavor sklearn or lightgbm"),
    (None, "pickle", "only meaningful with mlflow_flavor sklearn or lightgbm"),
    ("sklearn", "joblib", "is not one of cloudpickle, pickle, skops, text"),
])
def test_the_serialization_hint_is_checked_for_form(flavor: str | None, serialization: str,
                                                    problem: str | None) -> None:
    if problem is None:
        assert check_serialization_hint(flavor, serialization) == (serialization or None)
        return
    with pytest.raises(AirlockError, match=problem) as caught:
        check_serialization_hint(flavor, serialization)
    assert caught.value.reason.value == "BAD_REQUEST"


def test_an_mlmodel_nested_too_deeply_is_refused_with_a_reason(tmp_path: Path) -> None:
    """A few KB of brackets would blow the YAML parser's recursion: refused, not a crash."""
    from airlock_client import _hf_dir

    model = tmp_path / "m"
    model.mkdir()
    (model / "MLmodel").write_text("flavors: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ModelSourceError, match="nests too deeply") as caught:
        _hf_dir.kind(model)
    assert caught.value.reason == "UNSAFE_MODEL_DIR"

"""MLflow model directories and bundles: the client's checks and packer, the broker's
names-only recognition, and the worker's re-check of every member (hostile zips)."""

from __future__ import annotations

import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from airlock_broker.errors import AirlockError
from airlock_broker.jobs import detect_on_host, profile_of
from airlock_client import ModelSourceError, mlflow_source
from airlock_client._bundle import inspect, pack
from airlock_sandbox.bundle import (
    MAX_MEMBERS,
    BundleError,
    check_members,
    member_names,
    profile_for_bundle,
)
from airlock_sandbox.formats import ArtifactFormat, detect_prefix

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
    # The broker does not even parse a central directory this large: it stays a plain zip.
    assert member_names(path) is None


def test_broker_never_parses_a_forged_huge_central_directory(tmp_path: Path) -> None:
    path = _zip(tmp_path / "forged.zip", [("MLmodel", b"flavors: {}")])
    raw = bytearray(path.read_bytes())
    eocd = raw.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", raw, eocd + 8, 0xFFFE, 0xFFFE)  # claims 65534 entries
    path.write_bytes(bytes(raw))
    assert member_names(path) is None
    detected = detect_on_host(raw[:64], len(raw), None, path)
    assert detected is ArtifactFormat.ZIP  # not recognised as a bundle; the sandbox decides


def test_broker_recognises_a_bundle_by_names_and_picks_the_profile(tmp_path: Path) -> None:
    root = model_dir(tmp_path / "m")
    bundle = tmp_path / "bundle.zip"
    pack(inspect(root), bundle)
    raw = bundle.read_bytes()
    assert detect_prefix(raw[:64], len(raw)) is ArtifactFormat.ZIP
    assert detect_on_host(raw[:64], len(raw), "mlflow", bundle) is ArtifactFormat.MLFLOW
    assert profile_of(ArtifactFormat.MLFLOW, bundle) == "sklearn"
    assert profile_for_bundle(["MLmodel", "data/model.pth"]) == "torch"
    torch_zip = _zip(tmp_path / "t.zip", [("archive/data.pkl", b"x")])
    with pytest.raises(AirlockError) as caught:
        detect_on_host(torch_zip.read_bytes()[:64], torch_zip.stat().st_size, "mlflow",
                       torch_zip)
    assert caught.value.reason == "FORMAT_MISMATCH"

"""``load_verified`` refuses anything it cannot verify, and loads only ONNX / safetensors bytes.

The registry and its artifact store are the fake at the ``Registry`` seam; signatures are
real (the broker's signer), and so are onnxruntime and safetensors' loader.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from airlock_broker.api.provenance import RECORD_FIELD
from airlock_broker.security.keys import SigningKey, create_key
from airlock_client import (
    ProvenanceError,
    SafeLoadError,
    VerifiedArtifact,
    fetch_verified,
)
from airlock_client import _lineage as tags
from airlock_client.migrate import Migration
from airlock_client.safe_load import open_artifact
from tests.unit.fake_registry import FakeRegistry
from tests.unit.migrate_helpers import (
    FakeSandbox,
    envelope,
    plant_twin,
    source_dir,
    tiny_onnx,
)


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return create_key(tmp_path / "state" / "key.pem")


@pytest.fixture
def registry(key: SigningKey) -> FakeRegistry:
    """Source models migrated by the real Migration: m-airlock/1 (ONNX), w-airlock/1 (tensors)."""
    fake = FakeRegistry()
    fake.add_model("m", versions=1)
    fake.add_model("w", versions=1)
    sandbox = FakeSandbox(key, plan={("w", "1"): "safetensors"})
    Migration(fake, fetch=sandbox.fetch, convert=sandbox.convert, download=fake.download,
              public_key=key.public_pem.encode()).run(None)
    fake.models["m-airlock"].aliases["champion"] = "1"
    return fake


def fetch_source(uri: str, dest: Path) -> Path:
    """The source versions' files, as FakeSandbox.fetch gave them to the migration."""
    return source_dir(dest / "model", uri)


def _fetch(registry: FakeRegistry, uri: str, key: SigningKey | bytes, **kw: Any
           ) -> VerifiedArtifact:
    """fetch_verified(uri) of NAME-airlock, expecting NAME as its source (unless ``kw`` says),
    with the fake registry, artifact store and source download in MLflow's place."""
    if "source" not in kw and "source_sha256" not in kw:
        kw["source"] = "models:/" + uri.removeprefix("models:/").split("-airlock")[0]
    pem = key.public_pem.encode() if isinstance(key, SigningKey) else key
    kw.setdefault("download", registry.download)
    return fetch_verified(uri, public_key=pem, registry=registry, fetch=fetch_source, **kw)


def _load(registry: FakeRegistry, uri: str, key: SigningKey, **kw: Any) -> Any:
    """load_verified(uri), with the fake registry and artifact store in MLflow's place."""
    return open_artifact(_fetch(registry, uri, key), **kw)


def _artifacts(registry: FakeRegistry, name: str) -> dict[str, bytes]:
    run_id = registry.version(name, 1).run_id
    return registry.runs[str(run_id)]["artifacts"]  # type: ignore[no-any-return]


def test_onnx_version_loads_as_an_inference_session(registry: FakeRegistry,
                                                    key: SigningKey) -> None:
    session = _load(registry, "models:/m-airlock/1", key)
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x + 1.0)  # tiny_onnx(bias = source version 1)
    by_alias = _load(registry, "models:/m-airlock@champion", key)
    assert by_alias.get_inputs()[0].name == "x"


def test_safetensors_version_loads_as_arrays(registry: FakeRegistry, key: SigningKey) -> None:
    tensors = _load(registry, "models:/w-airlock/1", key)
    assert set(tensors) == {"w", "b"}
    np.testing.assert_array_equal(tensors["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert tensors["b"].dtype == np.float64


def test_safetensors_version_loads_as_torch_tensors(registry: FakeRegistry,
                                                    key: SigningKey) -> None:
    import torch

    tensors = _load(registry, "models:/w-airlock/1", key, tensors="pt")
    assert isinstance(tensors["w"], torch.Tensor) and tensors["b"].dtype == torch.float64
    assert torch.equal(tensors["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_the_record_comes_with_the_bytes(registry: FakeRegistry, key: SigningKey) -> None:
    artifact = _fetch(registry, "models:/m-airlock/1", key)
    assert artifact.format == "onnx" and artifact.record.output_format == "onnx"
    assert artifact.record.output_sha256 == \
        registry.version("m-airlock", 1).tags[tags.OUTPUT_SHA256]


def test_a_version_airlock_did_not_register_is_refused(registry: FakeRegistry,
                                                       key: SigningKey) -> None:
    with pytest.raises(SafeLoadError) as info:
        _load(registry, "models:/m/1", key)  # the pickled original
    assert info.value.reason == "NOT_AIRLOCK_OUTPUT"


def test_a_registry_that_fails_the_lookup_is_a_reason_not_a_traceback(
        registry: FakeRegistry, key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own exceptions escaped ``load_verified``: no reason code, and nothing to say
    whether to try again."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    def missing(*_args: object) -> None:
        raise MlflowException("Model Version (name=m-airlock, version=7) not found",
                              error_code=RESOURCE_DOES_NOT_EXIST)

    def down(*_args: object) -> None:
        raise MlflowException("API request to /api/2.0/mlflow/model-versions/get failed "
                              "with exception HTTPConnectionPool: Max retries exceeded")

    outcomes = []
    for failure in (missing, down):
        monkeypatch.setattr(registry, "get_model_version", failure)
        with pytest.raises(SafeLoadError) as info:
            _load(registry, "models:/m-airlock/7", key)
        outcomes.append((info.value.reason, "try again" in info.value.message))
    assert outcomes == [("VERSION_MISSING", False), ("REGISTRY_UNAVAILABLE", True)]


def test_a_version_whose_files_cannot_be_located_is_a_reason_not_a_traceback(
        registry: FakeRegistry, key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second registry call, where the version's files are, let MLflow's exception
    through (a version's source names a run that is gone: MLflow raises)."""
    from mlflow.exceptions import MlflowException

    def gone(*_args: object) -> None:
        raise MlflowException("Run 'nowhere' not found")

    monkeypatch.setattr(registry, "get_model_version_download_uri", gone)
    for call in (_load, _fetch):
        with pytest.raises(SafeLoadError) as info:
            call(registry, "models:/m-airlock/1", key)
        assert info.value.reason == "ARTIFACT_UNAVAILABLE"
        assert "m-airlock version 1" in info.value.message and "not found" in info.value.message


def test_a_swapped_model_file_is_refused(registry: FakeRegistry, key: SigningKey) -> None:
    _artifacts(registry, "m-airlock")["model/model.onnx"] = tiny_onnx(bias=666.0)
    with pytest.raises(ProvenanceError) as info:
        _load(registry, "models:/m-airlock/1", key)
    assert info.value.reason == "OUTPUT_MISMATCH"


def test_a_record_signed_by_another_key_is_refused(registry: FakeRegistry, key: SigningKey,
                                                   tmp_path: Path) -> None:
    other = create_key(tmp_path / "other" / "key.pem")
    files = _artifacts(registry, "m-airlock")
    files["model/model.onnx.provenance.json"] = envelope(other, files["model/model.onnx"], "onnx")
    with pytest.raises(ProvenanceError) as info:
        _load(registry, "models:/m-airlock/1", key)
    assert info.value.reason == "SIGNATURE_INVALID"
    # ... and the attacker's key is not the one we pinned, so it is no help either way
    with pytest.raises(ProvenanceError):
        _load(registry, "models:/w-airlock/1", other)


def test_an_edited_record_is_refused(registry: FakeRegistry, key: SigningKey) -> None:
    files = _artifacts(registry, "m-airlock")
    bundle = json.loads(files["model/model.onnx.provenance.json"])
    env = bundle["dsseEnvelope"]
    statement = json.loads(base64.b64decode(env["payload"]))
    statement["predicate"][RECORD_FIELD]["verdicts"]["assurance"] = "integrity_verified"
    env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    files["model/model.onnx.provenance.json"] = json.dumps(bundle).encode()
    with pytest.raises(ProvenanceError) as info:
        _load(registry, "models:/m-airlock/1", key)
    assert info.value.reason == "SIGNATURE_INVALID"


def test_missing_provenance_is_refused(registry: FakeRegistry, key: SigningKey) -> None:
    del _artifacts(registry, "m-airlock")["model/model.onnx.provenance.json"]
    with pytest.raises(SafeLoadError) as info:  # what the store cannot hand over
        _load(registry, "models:/m-airlock/1", key)
    assert info.value.reason == "ARTIFACT_UNAVAILABLE"
    with pytest.raises(SafeLoadError) as info:  # what its listing shows missing
        _fetch(registry, "models:/m-airlock/1", key, listing=registry.listing)
    assert info.value.reason == "ARTIFACT_MISSING"


def test_a_file_beside_the_twins_own_is_refused_unread(registry: FakeRegistry,
                                                       key: SigningKey) -> None:
    _artifacts(registry, "m-airlock")["model/MLmodel"] = b"flavors: {python_function: {}}"
    assert _fetch(registry, "models:/m-airlock/1", key).format == "onnx"  # unlisted: read
    asked: list[str] = []

    def download(uri: str, dest: Path, limit: int) -> Path:
        asked.append(uri)
        return registry.download(uri, dest, limit)

    with pytest.raises(SafeLoadError) as info:
        _fetch(registry, "models:/m-airlock/1", key, listing=registry.listing,
               download=download)
    assert info.value.reason == "UNEXPECTED_FILE" and asked == []


def test_tags_that_disagree_with_the_signed_record_are_refused(registry: FakeRegistry,
                                                               key: SigningKey) -> None:
    registry.version("m-airlock", 1).tags[tags.OUTPUT_SHA256] = "0" * 64
    with pytest.raises(SafeLoadError) as info:
        _load(registry, "models:/m-airlock/1", key)
    assert info.value.reason == "TAG_MISMATCH"
    registry.version("w-airlock", 1).tags[tags.OUTPUT_FORMAT] = "onnx"
    with pytest.raises(SafeLoadError):  # no model.onnx there, or FORMAT_MISMATCH if planted
        _load(registry, "models:/w-airlock/1", key)


def test_a_symlinked_download_is_refused(registry: FakeRegistry, key: SigningKey,
                                         tmp_path: Path) -> None:
    real = registry.download
    outside = tmp_path / "outside.onnx"

    def hostile(uri: str, dest: Path, limit: int) -> Path:
        path = real(uri, dest, limit)
        if path.suffix == ".onnx":
            outside.write_bytes(path.read_bytes())
            path.unlink()
            path.symlink_to(outside)
        return path

    with pytest.raises(SafeLoadError) as info:
        open_artifact(_fetch(registry, "models:/m-airlock/1", key, download=hostile))
    assert info.value.reason == "ARTIFACT_UNSAFE"


def test_size_cap(registry: FakeRegistry, key: SigningKey) -> None:
    with pytest.raises(SafeLoadError) as info:
        _fetch(registry, "models:/m-airlock/1", key, max_bytes=10)
    assert info.value.reason == "TOO_LARGE"


def test_a_key_is_required_and_uris_are_checked(registry: FakeRegistry,
                                                monkeypatch: pytest.MonkeyPatch,
                                                key: SigningKey) -> None:
    monkeypatch.delenv("AIRLOCK_PUBLIC_KEY", raising=False)
    with pytest.raises(ProvenanceError) as info:
        fetch_verified("models:/m-airlock/1", source="models:/m", registry=registry,
                       download=registry.download, fetch=fetch_source)
    assert info.value.reason == "BAD_PUBLIC_KEY"
    for bad in ("runs:/abc/model", "models:/m-airlock/latest", "models:/m-airlock"):
        with pytest.raises(ValueError):
            _fetch(registry, bad, key, source="models:/m")


def test_external_data_is_refused_even_when_signed(registry: FakeRegistry,
                                                   key: SigningKey) -> None:
    from onnx import ModelProto, TensorProto

    model = ModelProto()
    model.ParseFromString(tiny_onnx())
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.data_location = TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    data = model.SerializeToString()
    files = _artifacts(registry, "m-airlock")
    files["model/model.onnx"] = data
    twin = registry.version("m-airlock", 1)
    files["model/model.onnx.provenance.json"] = envelope(
        key, data, "onnx", subject="models:/m/1", source_sha256=twin.tags[tags.SOURCE_SHA256])
    twin.tags[tags.OUTPUT_SHA256] = hashlib.sha256(data).hexdigest()
    with pytest.raises(SafeLoadError) as info:
        _load(registry, "models:/m-airlock/1", key)
    assert info.value.reason == "EXTERNAL_DATA"


# -- which model it is: a valid signature is not enough ---------------------------------------

BACKDOOR = tiny_onnx(bias=666.0)


def test_a_backdoor_signed_by_airlock_and_tagged_as_the_twin_is_refused(
        registry: FakeRegistry, key: SigningKey) -> None:
    """The attack of issue #11: anyone may send a backdoored ONNX through Airlock and get a
    valid signature, even claiming the subject models:/m/1; registered as m-airlock/2 with
    every tag right and the alias moved to it, it must still not load as m."""
    signed = envelope(key, BACKDOOR, "onnx", source=BACKDOOR, subject="models:/m/1")
    plant_twin(registry, key, "m", "1", BACKDOOR, signed)
    registry.models["m-airlock"].aliases["champion"] = "2"
    for uri in ("models:/m-airlock@champion", "models:/m-airlock/2"):
        with pytest.raises(ProvenanceError) as info:
            _load(registry, uri, key)
        assert info.value.reason == "SOURCE_MISMATCH", uri
        assert "not from the expected source" in info.value.message
    _load(registry, "models:/m-airlock/1", key)  # the real twin still loads


def test_a_genuine_conversion_of_another_model_is_refused(registry: FakeRegistry,
                                                          key: SigningKey) -> None:
    """A real twin of w (a different model), registered as a twin of m."""
    files = _artifacts(registry, "w-airlock")
    data = files["model/model.safetensors"]
    plant_twin(registry, key, "m", "1", data, files["model/model.safetensors.provenance.json"])
    with pytest.raises(ProvenanceError) as info:
        _load(registry, "models:/m-airlock/2", key)
    assert info.value.reason == "SOURCE_MISMATCH" and "'models:/w/1'" in info.value.message
    with pytest.raises(ProvenanceError):  # it is w's; pinning m's bytes does not help it
        _load_sha(registry, "models:/m-airlock/2", key, _source_sha(registry, "m-airlock", 1))


def _source_sha(registry: FakeRegistry, name: str, version: int) -> str:
    return registry.version(name, version).tags[tags.SOURCE_SHA256]


def _load_sha(registry: FakeRegistry, uri: str, key: SigningKey, sha: str) -> VerifiedArtifact:
    def never(uri: str, dest: Path) -> Path:
        raise AssertionError("a pinned source sha256 needs no download of the source")

    return fetch_verified(uri, public_key=key.public_pem.encode(), source_sha256=sha,
                          registry=registry, download=registry.download, fetch=never)


def test_a_pinned_source_sha256_needs_no_source_download(registry: FakeRegistry,
                                                         key: SigningKey) -> None:
    sha = _source_sha(registry, "m-airlock", 1)
    assert _load_sha(registry, "models:/m-airlock/1", key, sha).record.input_sha256 == sha
    with pytest.raises(ProvenanceError) as info:
        _load_sha(registry, "models:/m-airlock/1", key, "ab" * 32)
    assert info.value.reason == "SOURCE_MISMATCH"


def test_expected_source_version_and_principals(registry: FakeRegistry,
                                                key: SigningKey) -> None:
    artifact = _fetch(registry, "models:/m-airlock/1", key, source="models:/m/1",
                      principals={"migrator"})
    assert artifact.source_version == "1"
    for expected, reason in (({"source": "models:/m/2"}, "SOURCE_MISMATCH"),
                             ({"source": "models:/w"}, "SOURCE_MISMATCH"),
                             ({"source": "models:/m", "principals": {"intern"}},
                              "PRINCIPAL_NOT_ALLOWED")):
        with pytest.raises(ProvenanceError) as info:
            _fetch(registry, "models:/m-airlock/1", key, **expected)
        assert info.value.reason == reason, expected


def test_the_expected_source_is_required(registry: FakeRegistry, key: SigningKey) -> None:
    for bad in ({"source": None}, {"source": "fraud"}, {"source_sha256": "xyz"}):
        with pytest.raises(ValueError, match="source"):
            _fetch(registry, "models:/m-airlock/1", key, **bad)


def test_twin_tags_that_disagree_with_the_signed_source_are_refused(
        registry: FakeRegistry, key: SigningKey) -> None:
    twin = registry.version("m-airlock", 1)
    for tag, value in ((tags.SOURCE_VERSION, "7"), (tags.SOURCE_SHA256, "0" * 64)):
        saved = twin.tags[tag]
        twin.tags[tag] = value
        with pytest.raises(SafeLoadError) as info:
            _load(registry, "models:/m-airlock/1", key)
        assert info.value.reason == "TAG_MISMATCH", tag
        twin.tags[tag] = saved


def test_a_changed_source_no_longer_vouches_for_its_old_twin(registry: FakeRegistry,
                                                             key: SigningKey) -> None:
    def other_bytes(uri: str, dest: Path) -> Path:
        path = fetch_source(uri, dest)
        (path / "model.pkl").write_text("replaced since")
        return path

    with pytest.raises(ProvenanceError) as info:
        fetch_verified("models:/m-airlock/1", source="models:/m",
                       public_key=key.public_pem.encode(), registry=registry,
                       download=registry.download, fetch=other_bytes)
    assert info.value.reason == "SOURCE_MISMATCH"


def test_a_twin_signed_before_subjects_loads_on_its_source_sha256(registry: FakeRegistry,
                                                                  key: SigningKey) -> None:
    """Records of version 1 name no subject and no principal: the source's bytes decide."""
    files = _artifacts(registry, "m-airlock")
    data = files["model/model.onnx"]
    files["model/model.onnx.provenance.json"] = envelope(
        key, data, "onnx", source_sha256=_source_sha(registry, "m-airlock", 1),
        record_version=1)
    assert _fetch(registry, "models:/m-airlock/1", key).record.record_version == 1
    with pytest.raises(ProvenanceError) as info:
        _fetch(registry, "models:/m-airlock/1", key, principals={"migrator"})
    assert info.value.reason == "PRINCIPAL_NOT_ALLOWED"
    files["model/model.onnx.provenance.json"] = envelope(key, data, "onnx", record_version=1)
    with pytest.raises(ProvenanceError) as info:  # the same, for other source bytes
        _fetch(registry, "models:/m-airlock/1", key)
    assert info.value.reason == "SOURCE_MISMATCH"


def test_a_twins_file_is_downloaded_to_its_signed_size_at_most(registry: FakeRegistry,
                                                                key: SigningKey) -> None:
    """Its size is known, signed, before the larger download; the limit was 2 GiB, so a store
    could send up to that for a file of a few bytes (seen: 300 MB for 12)."""
    limits: dict[str, int] = {}

    def download(uri: str, dest: Path, limit: int) -> Path:
        limits[uri.rsplit("/", 1)[-1]] = limit
        return registry.download(uri, dest, limit)

    artifact = _fetch(registry, "models:/m-airlock/1", key, download=download)
    assert limits["model.onnx"] == artifact.record.output_size == len(artifact.data)

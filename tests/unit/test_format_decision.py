"""The one decision of an artifact's format, profile and integrity check (issue 12 §3): made on
the host from the leading bytes and the declaration, carried in the job spec, re-checked (not
re-made) by the worker (tests/unit/test_worker_logic.py)."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.format_decision import decide
from airlock_broker.errors import AirlockError
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.sandboxes.sandbox import Slot
from airlock_client import Client
from airlock_sandbox.contract import (
    OUTPUT_NAMES,
    JobMode,
    JobSpec,
    OutputFormat,
    Target,
    WorkerExit,
)
from airlock_sandbox.formats import PREFIX_BYTES, ArtifactFormat, leads_with_npy
from tests.unit.fakes import FakeSandbox, running_broker

F = ArtifactFormat


def _zip(*names: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in names:
            zf.writestr(name, b"\0" * 16)
    return buf.getvalue()


_TORCH_LEGACY = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_HEADER = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
SAMPLES: dict[str, bytes] = {
    "pickle": b"\x80\x04\x95" + b"\0" * 100,
    "compressed": b"\x1f\x8b\x08" + b"\0" * 100,
    "torch_legacy": _TORCH_LEGACY + b"\0" * 100,
    "torch_zip": _zip("archive/data.pkl", "archive/data/0"),
    "npz": _zip("arr_0.npy", "arr_1.npy"),
    "npz_long_name": _zip("a_name_longer_than_the_first_64_bytes_hold.npy"),
    # skops.io.dump's layout: arrays named by object id, then its schema.
    "skops": _zip("140568400880208.npy", "schema.json"),
    "npy": b"\x93NUMPY\x01\x00" + b"\0" * 100,
    "onnx": b"\x08\x07\x12\x07pytorch" + b"\0" * 100,
    "safetensors": struct.pack("<Q", len(_HEADER)) + _HEADER + b"\0" * 4,
}

#: (leading bytes, declared) -> (format, profile, integrity sandbox)
TABLE: list[tuple[str, str | None, tuple[ArtifactFormat, str, bool]]] = [
    ("pickle", None, (F.PICKLE, "sklearn", True)),  # read by the policy loader
    ("pickle", "pickle", (F.PICKLE, "sklearn", True)),
    ("pickle", "cloudpickle", (F.PICKLE, "sklearn", False)),  # functions by value
    ("pickle", "joblib", (F.PICKLE, "sklearn", True)),
    ("compressed", None, (F.JOBLIB, "sklearn", True)),
    ("compressed", "joblib", (F.JOBLIB, "sklearn", True)),
    ("torch_legacy", None, (F.PYTORCH_LEGACY, "torch", True)),
    ("torch_legacy", "pytorch", (F.PYTORCH_LEGACY, "torch", True)),
    ("torch_zip", None, (F.ZIP, "torch", True)),
    ("torch_zip", "pytorch", (F.ZIP, "torch", True)),
    ("torch_zip", "torchscript", (F.TORCHSCRIPT, "torch", False)),
    ("torch_zip", "torch_export", (F.TORCH_EXPORT, "torch", False)),
    ("torch_zip", "numpy", (F.NUMPY_NPZ, "light", False)),  # the sandbox refuses it there
    ("torch_zip", "mlflow", (F.MLFLOW, "sklearn", False)),
    ("npz", None, (F.NUMPY_NPZ, "light", False)),
    ("npz", "numpy", (F.NUMPY_NPZ, "light", False)),
    ("npz", "pytorch", (F.ZIP, "torch", True)),  # the declaration rules; the sandbox refuses
    ("npz_long_name", None, (F.ZIP, "torch", True)),  # no evidence in the first 64 bytes
    ("npz_long_name", "numpy", (F.NUMPY_NPZ, "light", False)),
    # An array first, as an .npz's: only the declaration (the client's, for a .skops name)
    # makes it skops; without one the sandbox lists it and refuses it as no .npz.
    ("skops", "skops", (F.SKOPS, "sklearn", False)),
    ("skops", None, (F.NUMPY_NPZ, "light", False)),
    ("npy", None, (F.NUMPY, "light", False)),
    ("npy", "numpy", (F.NUMPY, "light", False)),
    ("onnx", None, (F.ONNX, "light", False)),
    ("onnx", "onnx", (F.ONNX, "light", False)),
    ("safetensors", None, (F.SAFETENSORS, "light", False)),
    ("safetensors", "safetensors", (F.SAFETENSORS, "light", False)),
]


def _decide(sample: str, declared: str | None, flavor: str | None = None
            ) -> tuple[ArtifactFormat, str, bool]:
    raw = SAMPLES[sample]
    decision = decide(raw[:PREFIX_BYTES], len(raw), declared, flavor)
    return decision.format, decision.profile, decision.integrity


@pytest.mark.parametrize(("sample", "declared", "expected"), TABLE,
                         ids=[f"{s}-{d}" for s, d, _ in TABLE])
def test_the_decision_table(sample: str, declared: str | None,
                            expected: tuple[ArtifactFormat, str, bool]) -> None:
    assert _decide(sample, declared) == expected


def test_an_npz_gets_the_light_profile_and_no_integrity_sandbox() -> None:
    """numpy.savez names every member <key>.npy; the first one's local header is within the
    first 64 bytes the broker reads, and that is all it reads."""
    assert _decide("npz", None) == (F.NUMPY_NPZ, "light", False)


@pytest.mark.parametrize(("flavor", "profile", "integrity"), [
    ("sklearn", "sklearn", True), ("lightgbm", "sklearn", True),  # a pickled estimator
    ("pytorch", "torch", False), ("onnx", "sklearn", False), ("xgboost", "sklearn", False),
    (None, "sklearn", False)])
def test_a_declared_bundle_takes_its_profile_from_the_flavor_hint(
        flavor: str | None, profile: str, integrity: bool) -> None:
    assert _decide("torch_zip", "mlflow", flavor) == (F.MLFLOW, profile, integrity)


@pytest.mark.parametrize(("sample", "declared"), [
    ("pickle", "safetensors"), ("pickle", "mlflow"), ("npy", "pickle"), ("onnx", "numpy"),
    ("compressed", "pickle"), ("torch_legacy", "torchscript"), ("torch_zip", "joblib"),
    ("npz", "onnx"), ("safetensors", "onnx"), ("pickle", "no-such-format"),
])
def test_a_declaration_the_bytes_contradict_is_refused_on_the_host(sample: str,
                                                                   declared: str) -> None:
    with pytest.raises(AirlockError) as caught:
        _decide(sample, declared)
    assert caught.value.reason == "FORMAT_MISMATCH"


@pytest.mark.parametrize("raw", [b"", b"hello, not a model", b"PK\x07\x08" + b"\0" * 60])
def test_bytes_of_no_known_format_are_refused_on_the_host(raw: bytes) -> None:
    with pytest.raises(AirlockError) as caught:
        decide(raw[:PREFIX_BYTES], len(raw), None)
    assert caught.value.reason == "UNSUPPORTED_FORMAT"


def test_the_first_member_is_read_from_the_prefix_only() -> None:
    npz = SAMPLES["npz"]
    assert leads_with_npy(npz[:PREFIX_BYTES])
    assert not leads_with_npy(npz[:30 + 4])  # the name is cut: no evidence
    assert not leads_with_npy(SAMPLES["torch_zip"][:PREFIX_BYTES])
    assert not leads_with_npy(SAMPLES["npz_long_name"][:PREFIX_BYTES])
    assert not leads_with_npy(b"PK\x03\x04" + b"\0" * 22 + struct.pack("<HH", 4, 0) + b".npy")
    assert not leads_with_npy(b"PK\x05\x06" + npz[4:PREFIX_BYTES])  # an empty zip's end record


# -- the decision travels: the job spec carries it, the integrity sandbox follows it -----------

_TENSORS = {"w": np.arange(4, dtype=np.float32)}


def _write_safetensors(spec: JobSpec, data: bytes, out: Path) -> int:
    (out / OUTPUT_NAMES[OutputFormat.SAFETENSORS]).write_bytes(save(_TENSORS))
    (out / "report.json").write_text(json.dumps({"loader": "fake"}))
    return 0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[str, FakeSandbox, list[str]]]:
    config = BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "spool",
                          pools=PoolSettings(min_warm=0), selftest_on_start=False,
                          provenance_key=tmp_path / "provenance-key.pem")
    backend = FakeSandbox(config.spool_root, _write_safetensors)
    profiles: list[str] = []
    prepare = backend.prepare

    async def recording(profile: str, **options: Any) -> Slot:
        profiles.append(profile)
        return await prepare(profile, **options)

    backend.prepare = recording  # type: ignore[method-assign]
    with running_broker(config, backend) as running:
        yield f"127.0.0.1:{running.port}", backend, profiles


@pytest.mark.parametrize(("sample", "fmt", "profiles", "assurance"), [
    ("npz", "numpy_npz", ["light"], "format_safe_only"),
    # the reading goes first and, refusing nothing, is the answer: the checkpoint reader's,
    # the policy loader's
    ("torch_zip", "zip", ["light"], "integrity_verified"),
    ("pickle", "pickle", ["sklearn"], "integrity_verified"),
])
def test_the_job_spec_carries_the_decision_and_integrity_follows_it(
        broker: tuple[str, FakeSandbox, list[str]], tmp_path: Path, sample: str, fmt: str,
        profiles: list[str], assurance: str) -> None:
    address, backend, prepared = broker
    src = tmp_path / "artifact"
    src.write_bytes(SAMPLES[sample])
    with Client(address) as client:
        result = client.convert(src, tmp_path / "out.safetensors")
    assert result.assurance == assurance
    assert sorted(prepared) == sorted(profiles)
    assert {spec.artifact_format for spec in backend.specs} == {F(fmt)}
    modes = sorted(spec.mode.value for spec in backend.specs)
    if sample in ("pickle", "torch_zip"):
        assert modes == [JobMode.EXTRACT_WEIGHTS.value]
    else:
        assert modes == sorted([JobMode.CONVERT.value]
                               + [JobMode.EXTRACT_WEIGHTS.value] * (len(profiles) - 1))
        # the worker reads its output back only when no reading is compared with it
        [convert] = [spec for spec in backend.specs if spec.mode is JobMode.CONVERT]
        assert convert.read_back is (len(profiles) == 1)


@pytest.mark.parametrize(("name", "fmt", "profiles"), [
    ("model.skops", "skops", ["sklearn"]), ("model.SKOPS", "skops", ["sklearn"]),
    ("model.npz", "numpy_npz", ["light"])])
def test_a_skops_files_name_declares_it(broker: tuple[str, FakeSandbox, list[str]],
                                        tmp_path: Path, name: str, fmt: str,
                                        profiles: list[str]) -> None:
    """The client declares a .skops file (Client.declared_by_name): by its bytes alone the
    broker would take it for an .npz (an array first) and the sandbox would refuse it."""
    address, backend, prepared = broker
    src = tmp_path / name
    src.write_bytes(SAMPLES["skops"])
    with Client(address) as client:
        client.convert(src, tmp_path / "out.safetensors")
    assert prepared == profiles
    assert {spec.artifact_format for spec in backend.specs} == {F(fmt)}


@pytest.mark.parametrize(("sample", "target", "verifies", "profile"), [
    ("torch_zip", Target.AUTO, True, "light"),
    ("torch_zip", Target.SAFETENSORS, True, "light"),
    ("torch_zip", Target.ONNX, False, "light"),  # the checkpoint reader writes tensors only
    ("pickle", Target.AUTO, True, "sklearn"),
    ("pickle", Target.ONNX, True, "sklearn"),  # the policy loader converts as the job does
    ("compressed", Target.SAFETENSORS, True, "sklearn"),
    ("npy", Target.AUTO, False, "light"),
])
def test_the_second_sandbox_profile_and_which_outputs_it_checks(
        sample: str, target: Target, verifies: bool, profile: str) -> None:
    raw = SAMPLES[sample]
    decision = decide(raw[:PREFIX_BYTES], len(raw), None)
    assert decision.verifies(target) is verifies
    assert decision.integrity_profile == profile


@contextlib.contextmanager
def _converting(tmp_path: Path, behaviour: Callable[[JobSpec, bytes, Path], int | None],
                artifact: bytes | None = None) -> Iterator[tuple[Client, FakeSandbox, Path]]:
    """A client of a broker whose sandboxes act out ``behaviour``, and the artifact file
    (``artifact``'s bytes) to convert."""
    config = BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "spool",
                          pools=PoolSettings(min_warm=0), selftest_on_start=False)
    backend = FakeSandbox(config.spool_root, behaviour)
    src = tmp_path / "artifact"
    if artifact is not None:
        src.write_bytes(artifact)
    with running_broker(config, backend) as running, \
            Client(f"127.0.0.1:{running.port}") as client:
        yield client, backend, src


def _refusing_reader(spec: JobSpec, artifact: bytes, out: Path) -> int:
    """The reading refuses a global (its report says so) but converts; the job's own
    conversion writes the same output."""
    if spec.mode is JobMode.EXTRACT_WEIGHTS:
        (out / "report.json").write_text(json.dumps({"refused_globals": ["builtins.exec"]}))
    arrays = {"w": np.arange(4, dtype=np.float32)}
    (out / OUTPUT_NAMES[OutputFormat.SAFETENSORS]).write_bytes(save(arrays))
    return 0


@pytest.mark.parametrize(("sample", "policy", "outcome"), [
    ("pickle", "allow_code", "integrity_verified"),
    ("pickle", "safe_only", "POLICY_VIOLATION"),
    # a checkpoint's conversion decides under either policy (torch's weights_only loader
    # allows more than the reader); the two outputs are compared
    ("torch_zip", "allow_code", "integrity_verified"),
    ("torch_zip", "safe_only", "integrity_verified"),
    ("torch_legacy", "safe_only", "integrity_verified"),
])
def test_a_reading_that_refused_a_global_needs_the_conversion_beside_it(
        tmp_path: Path, sample: str, policy: str, outcome: str) -> None:
    from airlock_client import ConversionError

    with _converting(tmp_path, _refusing_reader, SAMPLES[sample]) as (client, backend, src):
        if outcome == "POLICY_VIOLATION":
            with pytest.raises(ConversionError) as caught:
                client.convert(src, tmp_path / "out.safetensors", loading_policy="safe_only")
            assert caught.value.reason == outcome
            assert "builtins.exec" in caught.value.message
            modes = [JobMode.EXTRACT_WEIGHTS]
        else:
            result = client.convert(src, tmp_path / "out.safetensors", loading_policy=policy)
            assert result.assurance == outcome
            # the conversion's "no code ran" is not believed: builtins.exec may have run
            assert result.report.executed_artifact_code is (policy == "allow_code")
            named = [w for w in result.report.warnings if "names builtins.exec" in w]
            assert len(named) == (policy == "allow_code")
            modes = [JobMode.EXTRACT_WEIGHTS, JobMode.CONVERT]
    assert [spec.mode for spec in backend.specs] == modes
    assert all(not spec.read_back for spec in backend.specs if spec.mode is JobMode.CONVERT)


def _slow_failing_reading(spec: JobSpec, artifact: bytes, out: Path) -> int:
    """The reading takes a while and fails (a layout it does not know); the conversion
    writes an output."""
    if spec.mode is JobMode.EXTRACT_WEIGHTS:
        time.sleep(0.3)
        return WorkerExit.CONVERSION_FAILED
    (out / OUTPUT_NAMES[OutputFormat.SAFETENSORS]).write_bytes(
        save({"w": np.arange(4, dtype=np.float32)}))
    return 0


def test_a_conversion_after_a_failed_reading_checks_itself_within_the_jobs_deadline(
        tmp_path: Path) -> None:
    """Nothing is compared with it, so the worker reads its output back (JobSpec.read_back);
    and it has what the reading left of the caller's deadline, not a deadline of its own."""
    with _converting(tmp_path, _slow_failing_reading,
                     SAMPLES["torch_zip"]) as (client, backend, src):
        result = client.convert(src, tmp_path / "out.safetensors", job_timeout=60)
    assert result.assurance == "format_safe_only"
    [reading, convert] = backend.specs
    assert (reading.mode, convert.mode) == (JobMode.EXTRACT_WEIGHTS, JobMode.CONVERT)
    assert convert.read_back is True
    assert backend.deadlines[0] == 60
    assert backend.deadlines[1] <= 60 - 0.3


def _payload_reading(spec: JobSpec, artifact: bytes, out: Path) -> int:
    """The reading refuses posix.system and converts nothing; the full load ran it and
    found no model (what a bare ``__reduce__`` payload leaves)."""
    if spec.mode is JobMode.EXTRACT_WEIGHTS:
        (out / "report.json").write_text(json.dumps({"refused_globals": ["posix.system"]}))
        return WorkerExit.UNSUPPORTED_MODEL
    return WorkerExit.UNSUPPORTED_MODEL


@pytest.mark.parametrize("sample", ["pickle", "torch_zip"])
def test_a_failed_load_that_may_have_run_a_payload_names_what_the_reading_refused(
        tmp_path: Path, sample: str) -> None:
    from airlock_client import ConversionError

    with _converting(tmp_path, _payload_reading, SAMPLES[sample]) as (client, _, src), \
            pytest.raises(ConversionError) as caught:
        client.convert(src, tmp_path / "out.onnx", loading_policy="allow_code")
    assert caught.value.reason == "UNSUPPORTED_MODEL"
    assert "the artifact names posix.system" in caught.value.message


@pytest.mark.parametrize(("sample", "declared", "flavor", "serialization", "integrity",
                          "first"), [
    ("pickle", None, None, None, True, True), ("compressed", "joblib", None, None, True, True),
    # a bundle said to hold a pickled estimator is read first, as a pickle is
    ("torch_zip", "mlflow", "sklearn", "pickle", True, True),
    ("torch_zip", "mlflow", "sklearn", "cloudpickle", True, True),
    ("torch_zip", "mlflow", "lightgbm", "pickle", True, True),
    # skops or a booster's text file: the reading would refuse it, so there is none
    ("torch_zip", "mlflow", "sklearn", "skops", False, False),
    ("torch_zip", "mlflow", "lightgbm", "text", False, False),
    # not said (an older client): the reading stays beside the conversion
    ("torch_zip", "mlflow", "sklearn", None, True, False),
    ("torch_zip", None, None, None, True, True),  # a zip: the checkpoint reader goes first
    ("torch_legacy", None, None, None, True, True),
    ("pickle", "cloudpickle", None, None, False, False),  # no reading at all
])
def test_which_readings_go_first(sample: str, declared: str | None, flavor: str | None,
                                 serialization: str | None, integrity: bool,
                                 first: bool) -> None:
    raw = SAMPLES[sample]
    decision = decide(raw[:PREFIX_BYTES], len(raw), declared, flavor, serialization)
    assert (decision.integrity, decision.reading_first) == (integrity, first)


@pytest.mark.parametrize(("serialization", "modes", "assurance"), [
    ("cloudpickle", ["extract_weights"], "integrity_verified"),  # the reading is the answer
    ("skops", ["convert"], "format_safe_only"),  # no reading that would refuse it
])
def test_a_bundles_hint_decides_its_sandboxes(tmp_path: Path, serialization: str,
                                              modes: list[str], assurance: str) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text("flavors:\n  sklearn:\n    pickled_model: model.pkl\n"
                                   f"    serialization_format: {serialization}\n")
    (model / "model.pkl").write_bytes(SAMPLES["pickle"])
    with _converting(tmp_path, _write_safetensors) as (client, backend, _):
        result = client.convert(model, tmp_path / "out.safetensors")
    assert [spec.mode.value for spec in backend.specs] == modes
    assert result.assurance == assurance
    if modes == ["extract_weights"]:  # the reading's answer: nothing the artifact names ran
        assert result.report.executed_artifact_code is False


def _failing_reader(exit_code: int, message: str) -> Callable[[JobSpec, bytes, Path], int]:
    """A reading that refuses no global but fails with ``exit_code``; the job's own
    conversion (if it ever ran) would write tensors."""
    def run(spec: JobSpec, artifact: bytes, out: Path) -> int:
        if spec.mode is JobMode.EXTRACT_WEIGHTS:
            (out / "report.json").write_text(json.dumps(
                {"error": {"exit": "X", "message": message}}))
            return exit_code
        return _write_safetensors(spec, artifact, out)
    return run


@pytest.mark.parametrize(("policy", "exit_code", "reason", "modes"), [
    # everything it names is allowed: a full load would fail the same way, so it never runs
    ("allow_code", WorkerExit.UNSUPPORTED_MODEL, "UNSUPPORTED_MODEL", ["extract_weights"]),
    ("allow_code", WorkerExit.PARITY_FAILED, "PARITY_FAILED", ["extract_weights"]),
    ("safe_only", WorkerExit.CONVERSION_FAILED, "CONVERSION_FAILED", ["extract_weights"]),
    # the policy refused something the report does not name (BUILD on a class it handed out)
    ("safe_only", WorkerExit.POLICY_VIOLATION, "POLICY_VIOLATION", ["extract_weights"]),
    ("allow_code", WorkerExit.POLICY_VIOLATION, "", ["extract_weights", "convert"]),
])
def test_a_reading_that_failed_without_refusing_a_global_is_the_jobs_answer(
        tmp_path: Path, policy: str, exit_code: int, reason: str, modes: list[str]) -> None:
    from airlock_client import ConversionError

    with _converting(tmp_path, _failing_reader(exit_code, "the reader says why"),
                     SAMPLES["pickle"]) as (client, backend, src):
        if reason:
            with pytest.raises(ConversionError) as caught:
                client.convert(src, tmp_path / "out.safetensors", loading_policy=policy)
            assert caught.value.reason == reason
            assert "the reader says why" in caught.value.message
        else:
            result = client.convert(src, tmp_path / "out.safetensors", loading_policy=policy)
            assert result.assurance == "format_safe_only"
            assert result.report.executed_artifact_code is True
    assert [spec.mode.value for spec in backend.specs] == modes


@pytest.mark.parametrize(("sample", "policy", "exit_code"), [
    # a pickled module, a zip that is no checkpoint: torch may load what the reader cannot
    ("torch_zip", "allow_code", WorkerExit.UNSUPPORTED_MODEL),
    ("torch_zip", "safe_only", WorkerExit.CONVERSION_FAILED),
    ("torch_legacy", "allow_code", WorkerExit.UNSUPPORTED_MODEL),
])
def test_a_checkpoint_reading_that_fails_leaves_the_answer_to_the_conversion(
        tmp_path: Path, sample: str, policy: str, exit_code: int) -> None:
    with _converting(tmp_path, _failing_reader(exit_code, "the reader says why"),
                     SAMPLES[sample]) as (client, backend, src):
        result = client.convert(src, tmp_path / "out.safetensors", loading_policy=policy)
    assert result.assurance == "format_safe_only"
    assert "the reader says why" in result.integrity_note
    assert [spec.mode.value for spec in backend.specs] == ["extract_weights", "convert"]


@pytest.mark.parametrize(("sample", "on_disk", "first"), [
    ("torch_zip", False, True), ("torch_legacy", False, True),
    # on disk a checkpoint's reading reports a digest of its data, which cannot be an answer
    ("torch_zip", True, False), ("torch_legacy", True, False),
    ("pickle", True, True),  # an estimator's reading writes its ONNX either way
])
def test_a_checkpoints_reading_goes_first_only_when_its_output_is_in_ram(
        sample: str, on_disk: bool, first: bool) -> None:
    raw = SAMPLES[sample]
    assert decide(raw[:PREFIX_BYTES], len(raw), None).reads_first(on_disk) is first

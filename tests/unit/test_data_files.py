"""A model directory's data files (config.json, tokenizer files, a README) go through the
broker like any artifact, so that each gets a signed record: declared as json, text or
sentencepiece (no magic bytes name them), checked in a sandbox, and accepted only when the
output is the input byte for byte. Here: the checks, the host's decision, the worker, and the
broker's pipeline with a fake sandbox that misbehaves (tests/integration/
test_model_directories.py converts and verifies real directories)."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.format_decision import decide
from airlock_broker.errors import AirlockError
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_client import Client, ConversionError
from airlock_client.provenance import (
    ProvenanceError,
    file_subject,
    verify,
    verify_envelope,
    write_provenance,
)
from airlock_client.verify_dir import verify_directory
from airlock_sandbox import data_files
from airlock_sandbox.contract import OUTPUT_NAMES, JobSpec, OutputFormat, Target, WorkerExit
from airlock_sandbox.formats import PREFIX_BYTES, ArtifactFormat
from airlock_worker import job as worker_job
from airlock_worker.errors import WorkerError
from airlock_worker.report import Report
from tests.unit.fakes import FakeSandbox, running_broker

F = ArtifactFormat
CONFIG = json.dumps({"architectures": ["TinyLM"], "hidden_size": 8}, indent=2).encode()
README = "# TinyLM\n\nÜnïcode is fine.\n".encode()
#: A SentencePiece ModelProto of one piece: field 1 (pieces) holding piece "a" and a score.
SPIECE = b"\x0a\x08\x0a\x01a\x15\x00\x00\x80\xbf"
_HEADER = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
PICKLE = pickle.dumps({"a": 1}, protocol=4)
SAFETENSORS = struct.pack("<Q", len(_HEADER)) + _HEADER + b"\0" * 4


@pytest.mark.parametrize(("kind", "raw", "why"), [
    (F.DATA_JSON, CONFIG, None),
    (F.DATA_JSON, b'{"a": 1, "a": 2}', "not strict JSON"),  # one meaning or none
    (F.DATA_JSON, b'{"a": NaN}', "not strict JSON"),
    (F.DATA_JSON, b"\xff{}", "not UTF-8"),
    (F.DATA_TEXT, README, None),
    (F.DATA_TEXT, b"a\0b", "NUL"),
    (F.DATA_SENTENCEPIECE, SPIECE, None),
    (F.DATA_SENTENCEPIECE, CONFIG, "not a SentencePiece model"),
    (F.PICKLE, PICKLE, "not a data file's kind"),
    # what the broker refuses from its leading bytes, the client skips rather than sends
    (F.DATA_TEXT, b"x^2 is a square\n", "leading bytes are those of joblib"),
    (F.DATA_TEXT, PICKLE, "leading bytes are those of pickle"),
])
def test_each_kind_is_checked_as_what_it_claims(kind: ArtifactFormat, raw: bytes,
                                                why: str | None) -> None:
    problem = data_files.problem(kind, raw)
    assert (problem is None) if why is None else (why in (problem or "")), problem


def encoding_problem(kind: ArtifactFormat, raw: bytes, step: int = 1024 * 1024) -> str | None:
    """The broker's check of ``raw``, fed ``step`` bytes at a time as outputs.py feeds it."""
    check = data_files.EncodingCheck(kind)
    for start in range(0, len(raw), step):
        check.feed(raw[start:start + step])
    return check.problem()


def test_the_brokers_check_of_the_output_builds_nothing_and_finds_bad_encodings() -> None:
    assert encoding_problem(F.DATA_JSON, CONFIG) is None
    assert encoding_problem(F.DATA_TEXT, README * 300_000) is None  # > 1 MiB steps
    # a character split across the 1 MiB step is decoded whole
    split = b"a" * (1024 * 1024 - 1) + "Ü".encode()
    assert encoding_problem(F.DATA_TEXT, split) is None
    assert encoding_problem(F.DATA_TEXT, split[:-1]) == "not UTF-8"
    assert encoding_problem(F.DATA_JSON, b'{"a": "\0"}') == "holds a NUL byte"
    assert encoding_problem(F.DATA_SENTENCEPIECE, SPIECE + b"\0\xff") is None


# -- the host's decision: a declaration names a data file; a format's bytes contradict it ---


@pytest.mark.parametrize(("raw", "declared", "fmt"), [
    (CONFIG, "json", F.DATA_JSON), (README, "text", F.DATA_TEXT),
    (SPIECE, "sentencepiece", F.DATA_SENTENCEPIECE),
    (b"not json at all", "json", F.DATA_JSON),  # the sandbox's to refuse, not the host's
])
def test_a_declared_data_file_is_light_with_no_second_sandbox_and_targets_itself(
        raw: bytes, declared: str, fmt: ArtifactFormat) -> None:
    decision = decide(raw[:PREFIX_BYTES], len(raw), declared)
    assert (decision.format, decision.profile, decision.integrity) == (fmt, "light", False)
    assert decision.target_for(Target.AUTO) is Target.DATA
    assert decision.target_for(Target.DATA) is Target.DATA
    for other in (Target.ONNX, Target.SAFETENSORS):
        with pytest.raises(AirlockError) as caught:
            decision.target_for(other)
        assert caught.value.reason == "BAD_REQUEST"


@pytest.mark.parametrize(("raw", "declared"), [
    (PICKLE, "json"), (SAFETENSORS, "text"), (b"PK\x03\x04" + b"\0" * 60, "json"),
    (b'{"learner":{"attributes":{}}}', "json"),  # an XGBoost model is not a config
])
def test_a_pickle_or_model_declared_as_a_data_file_is_refused_on_the_host(
        raw: bytes, declared: str) -> None:
    with pytest.raises(AirlockError) as caught:
        decide(raw[:PREFIX_BYTES], len(raw), declared)
    assert caught.value.reason == "FORMAT_MISMATCH"


def test_a_data_file_over_its_cap_is_refused_on_the_host() -> None:
    with pytest.raises(AirlockError) as caught:
        decide(CONFIG, data_files.MAX_DATA_BYTES + 1, "json")
    assert caught.value.reason == "TOO_LARGE" and str(data_files.MAX_DATA_BYTES) in str(
        caught.value)


def test_nothing_but_a_data_file_has_target_data() -> None:
    decision = decide(PICKLE[:PREFIX_BYTES], len(PICKLE), None)
    with pytest.raises(AirlockError) as caught:
        decision.target_for(Target.DATA)
    assert caught.value.reason == "BAD_REQUEST"
    assert decision.target_for(Target.AUTO) is Target.AUTO


# -- the worker ------------------------------------------------------------------------------


def _run_worker(tmp_path: Path, raw: bytes, kind: ArtifactFormat) -> Path:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    (in_dir / "artifact").write_bytes(raw)
    spec = JobSpec(job_id="t", artifact_format=kind, declared_format=kind.value,
                   target=Target.DATA)
    worker_job.run(spec, str(in_dir), str(out_dir), Report())
    return out_dir


def test_the_worker_writes_a_good_data_file_unchanged(tmp_path: Path) -> None:
    out = _run_worker(tmp_path, CONFIG, F.DATA_JSON)
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_NAMES[OutputFormat.DATA]]
    assert (out / OUTPUT_NAMES[OutputFormat.DATA]).read_bytes() == CONFIG


@pytest.mark.parametrize(("raw", "kind", "said"), [
    (b'{"a": 1,}', F.DATA_JSON, "declared json, but not strict JSON"),
    (b"a\0b", F.DATA_TEXT, "declared text, but not text"),
    (PICKLE, F.DATA_JSON, "declared json, but the bytes are pickle"),
    (SAFETENSORS, F.DATA_SENTENCEPIECE, "the bytes are safetensors"),
])
def test_the_worker_refuses_a_file_that_is_not_its_declared_kind(
        tmp_path: Path, raw: bytes, kind: ArtifactFormat, said: str) -> None:
    with pytest.raises(WorkerError) as caught:
        _run_worker(tmp_path, raw, kind)
    assert caught.value.exit is WorkerExit.FORMAT_MISMATCH and said in caught.value.message
    assert not any((tmp_path / "out").iterdir())


# -- the broker's pipeline, with a fake sandbox ----------------------------------------------


def _copy(spec: JobSpec, data: bytes, out: Path) -> int:
    (out / OUTPUT_NAMES[OutputFormat.DATA]).write_bytes(data)
    return 0


def _altered(spec: JobSpec, data: bytes, out: Path) -> int:
    (out / OUTPUT_NAMES[OutputFormat.DATA]).write_bytes(data.replace(b"TinyLM", b"EvilLM"))
    return 0


def _model_instead(spec: JobSpec, data: bytes, out: Path) -> int:
    (out / OUTPUT_NAMES[OutputFormat.SAFETENSORS]).write_bytes(SAFETENSORS)
    return 0


def _data_instead(spec: JobSpec, data: bytes, out: Path) -> int:
    (out / OUTPUT_NAMES[OutputFormat.DATA]).write_bytes(CONFIG)
    return 0


@pytest.fixture
def config(tmp_path: Path) -> BrokerConfig:
    return BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "spool",
                        pools=PoolSettings(min_warm=0), selftest_on_start=False,
                        provenance_key=tmp_path / "provenance-key.pem")


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "config.json"
    path.write_bytes(CONFIG)
    yield path


def test_a_data_file_comes_back_unchanged_with_its_own_record(
        config: BrokerConfig, source: Path, tmp_path: Path) -> None:
    backend = FakeSandbox(config.spool_root, _copy)
    with running_broker(config, backend) as running, \
            Client(f"127.0.0.1:{running.port}") as client:
        result = client.convert(source, tmp_path / "out.json", declared_format="json")
        key = client.provenance_key().public_key_pem.encode()
    assert (tmp_path / "out.json").read_bytes() == CONFIG
    assert result.format == "data" and result.assurance == "integrity_verified"
    assert result.sha256 == result.input_sha256
    [spec] = backend.specs
    assert (spec.artifact_format, spec.target) == (F.DATA_JSON, Target.DATA)
    record = verify_envelope(result.provenance, key)
    assert (record.output_format, record.declared_format) == ("data", "json")
    assert record.output_sha256 == result.sha256


@pytest.mark.parametrize(("behaviour", "declared", "said"), [
    # a sandbox that changed the file: not the input, whatever it holds
    (_altered, "json", "not the input byte for byte"),
    # a data job may leave only a data file...
    (_model_instead, "json", "unexpected entry 'model.safetensors'"),
    # ...and a model job never one (here: safetensors, whose job is a plain conversion)
    (_data_instead, None, "left no single model file"),
    # the input itself, unchanged, but not UTF-8: the broker's own check of the output
    (_copy, "text", "not UTF-8"),
])
def test_a_sandbox_that_leaves_anything_else_is_refused(
        config: BrokerConfig, tmp_path: Path, behaviour: object, declared: str | None,
        said: str) -> None:
    source = tmp_path / "artifact"
    source.write_bytes({"json": CONFIG, "text": b"caf\xe9 au lait\n"}.get(declared or "",
                                                                         SAFETENSORS))
    backend = FakeSandbox(config.spool_root, behaviour)  # type: ignore[arg-type]
    with running_broker(config, backend) as running, \
            Client(f"127.0.0.1:{running.port}") as client, \
            pytest.raises(ConversionError) as caught:
        client.convert(source, tmp_path / "out", declared_format=declared)  # type: ignore[arg-type]
    assert caught.value.reason == "OUTPUT_INVALID" and said in caught.value.message, caught.value
    assert not (tmp_path / "out").exists()


def test_a_data_file_asked_for_as_a_model_is_a_bad_request(
        config: BrokerConfig, source: Path, tmp_path: Path) -> None:
    backend = FakeSandbox(config.spool_root, _copy)
    with running_broker(config, backend) as running, \
            Client(f"127.0.0.1:{running.port}") as client, \
            pytest.raises(ConversionError) as caught:
        client.convert(source, tmp_path / "out", declared_format="json", target="onnx")
    assert caught.value.reason == "BAD_REQUEST" and "target onnx" in caught.value.message
    assert backend.specs == []  # refused before any sandbox


# -- a data file's signature never passes for a model's, nor one directory's for another's --


def _either(spec: JobSpec, data: bytes, out: Path) -> int:
    """A data job copies its input; a safetensors job writes the one safetensors file."""
    if spec.target is Target.DATA:
        return _copy(spec, data, out)
    (out / OUTPUT_NAMES[OutputFormat.SAFETENSORS]).write_bytes(SAFETENSORS)
    return 0


@pytest.fixture
def signing(config: BrokerConfig) -> Iterator[tuple[Client, bytes]]:
    backend = FakeSandbox(config.spool_root, _either)
    with running_broker(config, backend) as running, \
            Client(f"127.0.0.1:{running.port}") as client:
        yield client, client.provenance_key().public_key_pem.encode()


def _signed(client: Client, data: bytes, where: Path, declared: str | None,
            subject: str) -> tuple[bytes, bytes]:
    """``data`` converted as ``declared``: the output's bytes and its record."""
    source = where.with_suffix(".in")
    source.write_bytes(data)
    result = client.convert(source, where, declared_format=declared,  # type: ignore[arg-type]
                            subject=subject)
    return where.read_bytes(), result.provenance


def test_a_protocol_0_pickle_signed_as_text_never_verifies_as_a_model(
        signing: tuple[Client, bytes], tmp_path: Path) -> None:
    """A text file may be anything printable: a protocol-0 pickle has no magic bytes, so the
    broker signs it as the text it was declared to be. That signature must say nothing to
    whoever checks a file they are about to load as a model."""
    client, key = signing
    pickle0 = pickle.dumps({"a": 1}, protocol=0)
    assert pickle0[:1] != b"\x80"  # not what the leading bytes name
    data, record = _signed(client, pickle0, tmp_path / "vocab.txt", "text", "")
    with pytest.raises(ProvenanceError) as caught:
        verify(data, record, key)
    assert caught.value.reason == "OUTPUT_KIND" and "declared text" in caught.value.message
    assert verify(data, record, key, data_file=True).declared_format == "text"
    model, model_record = _signed(client, SAFETENSORS, tmp_path / "m.safetensors", None, "")
    assert verify(model, model_record, key).output_format == "safetensors"
    with pytest.raises(ProvenanceError) as caught:
        verify(model, model_record, key, data_file=True)
    assert caught.value.reason == "OUTPUT_KIND"


def _directory(client: Client, root: Path, subject: str) -> Path:
    """An unsharded converted directory as ``convert DIR`` writes it."""
    root.mkdir()
    for name, data, declared, source in (
            ("model.safetensors", SAFETENSORS, None, "pytorch_model.bin"),
            ("config.json", CONFIG, "json", "config.json")):
        _, record = _signed(client, data, root / name, declared, file_subject(subject, source))
        write_provenance(root / name, record)
        (root / name).with_suffix(".in").unlink()
    return root


def _replace(root: Path, name: str, data: bytes, record: bytes) -> None:
    (root / name).write_bytes(data)
    write_provenance(root / name, record)


@pytest.mark.parametrize("case", ["declared_as_text", "another_directory", "data_as_weights"])
def test_a_directory_holds_each_file_to_its_kind_and_to_the_directory(
        signing: tuple[Client, bytes], tmp_path: Path, case: str) -> None:
    client, key = signing
    root = _directory(client, tmp_path / "llama-safe", "/models/llama")
    checked = verify_directory(root, key)
    assert [n for n, _ in checked.carried] == ["config.json"]
    other = tmp_path / "other"
    other.mkdir()
    if case == "declared_as_text":  # the same bytes, validly signed, as another kind
        data, record = _signed(client, CONFIG, other / "c", "text",
                               file_subject("/models/llama", "config.json"))
        _replace(root, "config.json", data, record)
        said = "not a json data file's"
    elif case == "another_directory":  # another conversion's config.json, validly signed
        data, record = _signed(client, CONFIG.replace(b"8", b"9"), other / "c", "json",
                               file_subject("/models/evil", "config.json"))
        _replace(root, "config.json", data, record)
        said = "signed as part of another directory"
    else:  # a data file's bytes and record where the weights go
        data, record = _signed(client, CONFIG, other / "c", "json",
                               file_subject("/models/llama", "pytorch_model.bin"))
        _replace(root, "model.safetensors", data, record)
        said = "not a safetensors conversion's"
    with pytest.raises(ProvenanceError) as caught:
        verify_directory(root, key)
    assert caught.value.reason == "OUTPUT_MISMATCH" and said in caught.value.message, caught.value


@pytest.mark.parametrize("length", [10, 1000, 1024])
def test_a_long_directory_subject_binds_its_data_files_too(
        signing: tuple[Client, bytes], tmp_path: Path, length: int) -> None:
    """A subject clipped at the front (a long path) still ties the data files to it."""
    client, key = signing
    subject = "/" + "d" * (length - 1)
    root = _directory(client, tmp_path / "m", subject)
    assert verify_directory(root, key).carried

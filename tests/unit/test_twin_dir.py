"""A directory twin counts as the conversion of a source version only when its records name
that version's own files (``_twin_dir.check_directory_source``): every weights file once,
with its bytes, and data files of that version; all asked for by one principal. The records
here are already "verified" (``verify_dir``'s job, tested on its own); these tests are about
binding them to the source."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from airlock_client import ProvenanceError
from airlock_client._twin_dir import SourceFiles, check_directory_source, directory_tags
from airlock_client.provenance import DATA_FORMAT, INDEX_KIND, ProvenanceRecord, file_subject
from airlock_client.verify_dir import VerifiedDirectory

SUBJECT = "models:/tinylm/2"
SHARDS = {"pytorch_model-00001-of-00002.bin": ("a" * 64, 100),
          "pytorch_model-00002-of-00002.bin": ("b" * 64, 200)}
DATA = {"config.json": ("c" * 64, 10), "tokenizer.json": ("d" * 64, 20)}
OUTPUTS = {name: f"model-{i:05d}-of-{len(SHARDS):05d}.safetensors"
           for i, name in enumerate(sorted(SHARDS), 1)}
SOURCE = SourceFiles(weights=SHARDS, data=DATA, outputs=OUTPUTS, sharded=True)


def record(subject: str, sha: str = "", size: int = 0, *, kind: str = "conversion",
           principal: str = "migrator", output: str = "out", executed: bool = False,
           policy: str = "safe_only", data_kind: str = "") -> ProvenanceRecord:
    """A conversion's record (a data file's when ``data_kind``: carried unchanged)."""
    return ProvenanceRecord(
        job_id="job", created="", broker_version="", input_sha256=sha, input_size=size,
        declared_format=data_kind, detected_format="", output_name=output,
        output_sha256=sha if data_kind else "e" * 64, output_size=size if data_kind else 1,
        output_format=DATA_FORMAT if data_kind else "safetensors", target="",
        loading_policy=policy,
        image_id="", runtime="", validation="passed", assurance="integrity_verified",
        integrity_note="", key_fingerprint="f" * 64, record_version=3, subject=subject,
        principal=principal, principal_method="token", kind=kind,
        conversion={"executed_artifact_code": executed})


def directory(shards: dict[str, tuple[str, int]] | None = None,
              data: dict[str, tuple[str, int]] | None = None, *, index: bool = True,
              index_subject: str = SUBJECT, principal: str = "migrator",
              policy: str = "safe_only", path: Path = Path("/nonexistent"),
              ) -> VerifiedDirectory:
    """What ``convert_directory`` signs for ``shards`` and ``data`` (name -> sha, size);
    ``path`` holds the shards' files and index (``written``) when a test reaches the check
    that the index is the one they make."""
    shards = SHARDS if shards is None else shards
    files = tuple((OUTPUTS.get(name, f"model-{i:05d}-of-{len(shards):05d}.safetensors"),
                   record(file_subject(SUBJECT, name), sha, size, principal=principal,
                          policy=policy))
                  for i, (name, (sha, size)) in enumerate(sorted(shards.items()), 1))
    carried = tuple((name, record(file_subject(SUBJECT, name), sha, size, data_kind="json"))
                    for name, (sha, size) in sorted((DATA if data is None else data).items()))
    whole = record(index_subject, kind=INDEX_KIND, output="model.safetensors.index.json")
    return VerifiedDirectory(path, files, whole if index else None, carried)


def written(path: Path, extra: bytes = b"") -> Path:
    """Two small shards and the index they make (with ``extra`` spliced into it)."""
    from safetensors.numpy import save_file

    from airlock_client import _st_header

    for i, name in enumerate(sorted(OUTPUTS.values())):
        save_file({f"layer{i}.weight": np.full((2, 2), i, np.float32)}, str(path / name))
    index = _st_header.index_document([(name, _st_header.read_header(path / name))
                                       for name in sorted(OUTPUTS.values())])
    if extra:
        index = index[:1] + extra + index[1:]
    (path / "model.safetensors.index.json").write_bytes(index)
    return path


def test_the_conversion_of_the_sources_own_files_passes(tmp_path: Path) -> None:
    whole = check_directory_source(directory(path=written(tmp_path)), SOURCE, SUBJECT)
    assert whole.kind == INDEX_KIND


def test_an_index_with_more_than_its_shards_make_is_refused(tmp_path: Path) -> None:
    """The broker checks the weight map and total size; the rest of the index is the
    caller's bytes, and a twin's must be exactly what its shards make."""
    twin = directory(path=written(tmp_path, b'"_name_or_path": "attacker/model", '))
    with pytest.raises(ProvenanceError) as info:
        check_directory_source(twin, SOURCE, SUBJECT)
    assert info.value.reason == "OUTPUT_MISMATCH"


def test_an_unsharded_directory_is_named_by_its_one_weights_file() -> None:
    single = {"pytorch_model.bin": ("a" * 64, 100)}
    whole = check_directory_source(
        directory(single, index=False), SourceFiles(weights=single, data=DATA, outputs={
            "pytorch_model.bin": "model-00001-of-00001.safetensors"}, sharded=False), SUBJECT)
    assert whole.subject == file_subject(SUBJECT, "pytorch_model.bin")


@pytest.mark.parametrize("case", ["other bytes", "other size", "missing shard", "extra shard",
                                  "shard twice", "other version"])
def test_weights_that_are_not_the_sources_are_refused(case: str) -> None:
    first, second = sorted(SHARDS)
    shards = dict(SHARDS)
    source = SOURCE
    if case == "other bytes":
        shards[first] = ("0" * 64, 100)
    elif case == "other size":
        shards[first] = ("a" * 64, 101)
    elif case == "missing shard":
        del shards[second]
    elif case == "extra shard":
        source = SourceFiles(weights={first: SHARDS[first]}, data=DATA, outputs=OUTPUTS,
                             sharded=True)
    elif case == "shard twice":
        twice = directory()
        twin = dataclasses.replace(twice, files=(twice.files[0], twice.files[0]))
        with pytest.raises(ProvenanceError) as info:
            check_directory_source(twin, SOURCE, SUBJECT)
        assert info.value.reason == "SOURCE_MISMATCH"
        return
    elif case == "other version":
        with pytest.raises(ProvenanceError) as info:
            check_directory_source(directory(), SOURCE, "models:/tinylm/3")
        assert info.value.reason == "SOURCE_MISMATCH"
        return
    with pytest.raises(ProvenanceError) as info:
        check_directory_source(directory(shards), source, SUBJECT)
    assert info.value.reason == "SOURCE_MISMATCH"


def test_an_index_signed_for_another_directory_is_refused() -> None:
    with pytest.raises(ProvenanceError) as info:
        check_directory_source(directory(index_subject="models:/tinylm/3"), SOURCE, SUBJECT)
    assert info.value.reason == "SOURCE_MISMATCH"


@pytest.mark.parametrize("data", [{"config.json": ("0" * 64, 10)},
                                  {"vocab.txt": ("c" * 64, 10)}])
def test_a_data_file_that_is_not_the_sources_is_refused(
        data: dict[str, tuple[str, int]]) -> None:
    with pytest.raises(ProvenanceError) as info:
        check_directory_source(directory(data=data), SOURCE, SUBJECT)
    assert info.value.reason == "SOURCE_MISMATCH"


def test_a_data_file_left_out_is_refused() -> None:
    """A conversion without the tokenizer's config (its chat template) is not the model."""
    with pytest.raises(ProvenanceError) as info:
        check_directory_source(directory(data={"config.json": DATA["config.json"]}), SOURCE,
                               SUBJECT)
    assert info.value.reason == "SOURCE_MISMATCH"
    assert "tokenizer.json" in info.value.message


def test_shards_converted_under_another_policy_are_refused() -> None:
    """Under allow_code the source's own code may have made the tensors."""
    with pytest.raises(ProvenanceError) as info:
        check_directory_source(directory(policy="allow_code"), SOURCE, SUBJECT)
    assert info.value.reason == "POLICY_MISMATCH"


def test_a_shard_under_another_name_is_refused() -> None:
    """One weights file's conversion must be named as that file's conversion is (an
    unsharded model's is ``model.safetensors``, never ``adapter_model.safetensors``)."""
    single = {"pytorch_model.bin": ("a" * 64, 100)}
    with pytest.raises(ProvenanceError) as info:
        check_directory_source(directory(single, index=False), SourceFiles(
            weights=single, data=DATA, outputs={"pytorch_model.bin": "model.safetensors"},
            sharded=False), SUBJECT)
    assert info.value.reason == "OUTPUT_MISMATCH"


def test_shards_asked_for_by_another_principal_are_refused() -> None:
    mixed = directory(principal="someone-else")
    with pytest.raises(ProvenanceError) as info:
        check_directory_source(mixed, SOURCE, SUBJECT)
    assert info.value.reason == "PRINCIPAL_NOT_ALLOWED"
    with pytest.raises(ProvenanceError):
        check_directory_source(directory(), SOURCE, SUBJECT, principals=["not-migrator"])


def test_the_tags_say_code_ran_if_it_ran_for_any_file() -> None:
    clean = directory()
    assert directory_tags("tinylm", "2", clean)["airlock.executed_artifact_code"] == "false"
    name, first = clean.files[0]
    ran = dataclasses.replace(clean, files=(
        (name, dataclasses.replace(first, conversion={"executed_artifact_code": True})),
        *clean.files[1:]))
    found = directory_tags("tinylm", "2", ran)
    assert found["airlock.executed_artifact_code"] == "true"
    assert found["airlock.output_layout"] == "directory"
    assert found["airlock.output_file"] == "model.safetensors.index.json"


def test_a_directory_without_the_index_its_source_has_is_refused() -> None:
    with pytest.raises(ProvenanceError) as info:
        check_directory_source(directory(index=False), SOURCE, SUBJECT, index_file=False)
    assert info.value.reason == "SOURCE_MISMATCH"


def test_a_twin_is_read_records_first_and_only_the_files_its_source_names(
        tmp_path: Path) -> None:
    """A claimed twin's records are downloaded and checked before any weights file, and only
    the files the source's conversion would hold are asked for (never a listing): a registry
    entry pointing at gigabytes of something else costs a few records."""
    from airlock_broker.security.keys import create_key
    from airlock_client import _lineage as tags
    from airlock_client._twin_dir import read_directory_twin
    from tests.unit.fake_registry import FakeVersion
    from tests.unit.migrate_helpers import envelope, tiny_safetensors

    key = create_key(tmp_path / "key.pem")
    data = tiny_safetensors()
    # Validly signed, named as the source's files, but converted under allow_code.
    names = [*OUTPUTS.values(), "model.safetensors.index.json", *DATA]
    store = {f"twin/{n}{tags.PROVENANCE_SUFFIX}": envelope(key, data, "safetensors",
                                                          subject=SUBJECT) for n in names}
    store.update({f"twin/{n}": data for n in names})
    store["twin/huge.bin"] = b"\0" * 1024
    asked: list[str] = []

    def download(uri: str, dest: Path, limit: int) -> Path:
        asked.append(uri)
        (dest / "file").write_bytes(store[uri])
        return dest / "file"

    class Registry:
        def get_model_version_download_uri(self, name: str, version: str) -> str:
            return "twin"

    mv = FakeVersion("lm-airlock", "1", {tags.OUTPUT_LAYOUT: tags.LAYOUT_DIRECTORY})
    with pytest.raises(ProvenanceError):
        read_directory_twin(Registry(), download, mv, key.public_pem.encode(),  # type: ignore[arg-type]
                            tmp_path / "twin", SOURCE, SUBJECT)
    assert asked and all(uri.endswith(tags.PROVENANCE_SUFFIX) for uri in asked), asked
    assert sorted(asked) == sorted(f"twin/{n}{tags.PROVENANCE_SUFFIX}" for n in names)


def test_records_the_source_bounds_are_checked_before_any_weights_file(tmp_path: Path) -> None:
    """A data file's record of another size than its source's is refused from the records
    alone."""
    from airlock_client._twin_dir import _check_records

    def records(name: str = "", size: int = 0) -> dict[str, ProvenanceRecord]:
        """The directory's records, with ``name``'s signed at ``size`` bytes."""
        twin = directory()
        found = {n: r for n, r in twin.files} | {n: r for n, r in twin.carried}
        assert twin.index is not None
        listed = tuple({"file_name": n, "sha256": r.output_sha256, "job_id": r.job_id}
                       for n, r in twin.files)
        found["model.safetensors.index.json"] = dataclasses.replace(twin.index, shards=listed)
        if name:
            found[name] = dataclasses.replace(found[name], output_size=size)
        return found

    _check_records(records(), SOURCE)
    # A weights file has no bound from its source (views of one storage become whole
    # tensors); the store's listing holds it to its signed size before it is downloaded.
    _check_records(records("model-00001-of-00002.safetensors", 10**9), SOURCE)
    with pytest.raises(ProvenanceError) as info:
        _check_records(records("config.json", 11), SOURCE)
    assert info.value.reason == "OUTPUT_MISMATCH"


def test_a_version_whose_data_file_its_sandbox_refused_is_not_registered(
        tmp_path: Path) -> None:
    """``convert DIR`` leaves out a data file that is not what its name says; a twin must hold
    every one, so migrate refuses the version (``DATA_FILE_REFUSED``, with the file and why)
    instead of registering a directory no later run would count as its twin."""
    from airlock_broker.security.keys import create_key
    from airlock_client._hf_dir import Skipped
    from airlock_client._migrate_convert import (
        DATA_FILE_REFUSED,
        Failure,
        convert_directory_verified,
    )
    from airlock_client._migrate_report import Status
    from airlock_client.model_dir import DirectoryResult
    from airlock_client.provenance import load_public_key
    from tests.unit.test_hf_model_dir import mlflow_transformers

    source = mlflow_transformers(tmp_path / "bundle")
    seen: list[str] = []

    def convert(model_dir: Path, output: Path, subject: str) -> DirectoryResult:
        seen.append(subject)
        output.mkdir(parents=True)
        return DirectoryResult(
            source=model_dir, output=output, shards=(), index=None, total_size=0,
            assurance="integrity_verified", integrity_note="",  # type: ignore[arg-type]
            carried=("config.json", "vocab.txt"),
            skipped=(Skipped("components/tokenizer/tokenizer.json", "not strict JSON"),),
            deduplicated={}, duration_seconds=0.1)

    key = load_public_key(create_key(tmp_path / "key.pem").public_pem.encode())
    failed = convert_directory_verified(convert, source, tmp_path / "out", SUBJECT, key)
    assert seen == [SUBJECT]
    assert isinstance(failed, Failure)
    assert (failed.status, failed.reason) == (Status.REJECTED, DATA_FILE_REFUSED)
    assert "components/tokenizer/tokenizer.json: not strict JSON" in failed.message

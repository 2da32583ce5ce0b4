"""``airlock migrate`` of MLflow transformers versions with pickled weights, on the session's
tracking server, through the real broker, engine and image: each becomes a safetensors model
directory twin (shards, index, carried data files, a signed record for each), which
``fetch_verified_directory`` gives back only after checking it file by file against the
source's own bytes, and which a re-run recognises as migrated. A directory the attacker sent
through the broker under the source's name is refused.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.security.keys import KEY_FILE_NAME, load_key
from airlock_client import (
    Client,
    ProvenanceError,
    SafeLoadError,
    fetch_verified_directory,
    load_verified,
)
from airlock_client import _lineage as tags
from airlock_client._migrate_key import PREFIX
from airlock_client._twin_dir import directory_tags
from airlock_client.model_dir import convert_directory
from airlock_client.verify_dir import verify_directory
from tests.conftest import BrokerProcess
from tests.fixtures import hf_models
from tests.integration.mlflow_server import MlflowServer
from tests.integration.test_mlflow_migrate import _register_now, log_folder, migrate, snapshot

pytestmark = pytest.mark.integration

MODEL = "tinylm-migrate"
TARGET = f"{MODEL}-airlock"


@dataclass
class Migrated:
    server: MlflowServer
    broker: BrokerProcess
    public_key: Path
    #: source version -> the model it holds
    sources: dict[str, hf_models.HfDir]
    first: subprocess.CompletedProcess[str]
    again: subprocess.CompletedProcess[str]
    after_first: dict[str, Any]
    after_again: dict[str, Any]


@pytest.fixture(scope="module")
def migrated(cold_broker: BrokerProcess, mlflow_registry: MlflowServer,
             tmp_path_factory: pytest.TempPathFactory) -> Migrated:
    """v1: two shards and an index; v2: one ``pytorch_model.bin``. Migrated, then again."""
    tmp = tmp_path_factory.mktemp("migrate-transformers")
    public_key = tmp / "airlock.pub.pem"
    public_key.write_text(load_key(cold_broker.state / KEY_FILE_NAME).public_pem)
    server = mlflow_registry
    sources = {"1": hf_models.make_mlflow_transformers(tmp / "v1", shards=2),
               "2": hf_models.make_mlflow_transformers(tmp / "v2", shards=0)}
    for version, source in sources.items():
        assert _register_now(server.uri, MODEL, source.path) == version
    first = migrate(server.uri, cold_broker.address, public_key, "--model", MODEL, "--json",
                    "--alias", "champion")
    after_first = snapshot(server.uri)
    again = migrate(server.uri, cold_broker.address, public_key, "--model", MODEL, "--json",
                    "--alias", "champion")
    return Migrated(server, cold_broker, public_key, sources, first, again, after_first,
                    snapshot(server.uri))


def _doc(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _tensor_bytes(directory: Path) -> dict[str, tuple[tuple[int, ...], bytes]]:
    """Every tensor of the directory's safetensors files: shape and raw bytes (numpy has no
    bfloat16, so torch reads them)."""
    import torch
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], bytes]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118
                tensor = fh.get_tensor(name)
                found[name] = (tuple(tensor.shape), tensor.contiguous().reshape(-1)
                               .view(torch.uint8).numpy().tobytes())
    return found


def test_each_version_becomes_a_verified_directory_twin(migrated: Migrated,
                                                        tmp_path: Path) -> None:
    assert migrated.first.returncode == 0, migrated.first.stderr[-3000:]
    outcomes = {v["version"]: v for v in _doc(migrated.first)["versions"]}
    assert set(outcomes) == {"1", "2"}
    for version, source in migrated.sources.items():
        outcome = outcomes[version]
        assert outcome["status"] == "converted", outcome
        assert outcome["format"] == "safetensors"
        assert outcome["assurance"] == "integrity_verified", outcome
        assert outcome["executed_artifact_code"] is False
        dest = tmp_path / f"v{version}"
        verified = fetch_verified_directory(f"models:/{outcome['target']}", dest,
                                            source=f"models:/{MODEL}/{version}",
                                            public_key=migrated.public_key,
                                            tracking_uri=migrated.server.uri)
        assert verified.path == dest and verified.source_version == version
        assert (verified.verified.index is not None) == (version == "1")
        assert {name for name, _ in verified.verified.carried} >= {"config.json",
                                                                   "tokenizer.json"}
        got = _tensor_bytes(dest)
        kept = {n: a for n, a in source.expected.items() if n not in source.tied}
        assert set(got) == set(kept)
        for name, array in kept.items():
            assert got[name] == (array.shape, array.tobytes()), name
        # what the registry holds is exactly that directory: nothing MLflow could load
        assert verify_directory(dest, migrated.public_key).path == dest
        assert not (dest / "MLmodel").exists()
    # progress while a version's files convert: a line per weights file (they convert
    # --jobs at a time, so in either order)
    for shard in ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"):
        assert re.search(rf"models:/{MODEL}/1: {re.escape(shard)} converted; shards [12]/2 "
                         "done", migrated.first.stderr), migrated.first.stderr[-3000:]
    assert f"models:/{MODEL}/1: " in migrated.first.stderr and "shards 2/2 done" in \
        migrated.first.stderr, migrated.first.stderr[-3000:]
    # --alias: the newest version's twin
    champion = migrated.after_first["models"][TARGET][1]["champion"]
    assert f"{TARGET}/{champion}" == outcomes["2"]["target"]
    twin_tags = migrated.after_first["versions"][(TARGET, champion)]
    assert twin_tags[tags.OUTPUT_LAYOUT] == tags.LAYOUT_DIRECTORY
    assert migrated.after_first["versions"][(MODEL, "2")][tags.MIGRATED_TO] == \
        outcomes["2"]["target"]


def test_each_file_was_converted_under_a_key_a_resumed_run_sends_again(
        migrated: Migrated) -> None:
    """So a run killed half-way through a large model is answered from the broker's stored
    results when resumed (``_migrate_key``; the keys' derivation: test_migrate_resume)."""
    wanted = {"pytorch_model-00001-of-00002.bin", "pytorch_model.bin", "config.json",
              "tokenizer.json"}
    deadline = time.monotonic() + 60  # records are appended as each job's handler ends

    def keyed() -> set[str]:
        records = [json.loads(line) for line in migrated.broker.audit.read_text().splitlines()]
        return {str(r.get("filename")) for r in records
                if str(r.get("idempotency_key", "")).startswith(PREFIX)}

    while not wanted <= keyed():
        assert time.monotonic() < deadline, f"no keyed conversion of {wanted - keyed()}"
        time.sleep(0.5)


def test_a_rerun_recognises_the_directory_twins(migrated: Migrated) -> None:
    assert migrated.again.returncode == 0, migrated.again.stderr[-3000:]
    doc = _doc(migrated.again)
    assert {v["status"] for v in doc["versions"]} == {"already_migrated"}, doc
    assert doc["counts"]["converted"] == 0
    assert migrated.after_again == migrated.after_first


def test_load_verified_points_at_the_directory_fetch(migrated: Migrated) -> None:
    with pytest.raises(SafeLoadError) as info:
        load_verified(f"models:/{TARGET}@champion", source=f"models:/{MODEL}",
                      public_key=migrated.public_key, tracking_uri=migrated.server.uri)
    assert info.value.reason == "IS_DIRECTORY"


@pytest.fixture(scope="module")
def forged(migrated: Migrated, tmp_path_factory: pytest.TempPathFactory) -> str:
    """What anyone with the convert role and write access to the registry can do: send a
    directory of their own through the broker naming ``models:/MODEL/2`` (so every file is
    validly signed under that name), and register it as a twin of v2 with every tag right."""
    import torch
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("forged-directory")
    # v2's layout and file names, weights of their own
    theirs = hf_models.make_mlflow_transformers(tmp / "theirs", shards=0)
    torch.save({"lm_head.weight": torch.ones(32, 8)},
               theirs.path / "model" / "pytorch_model.bin")
    out = tmp / "signed"
    with Client(migrated.broker.address, public_key=migrated.public_key) as client:
        convert_directory(client, theirs.path, out, jobs=1, subject=f"models:/{MODEL}/2")
    verified = verify_directory(out, migrated.public_key)
    uri = migrated.server.uri
    run = log_folder(uri, out)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.create_model_version(TARGET, f"{run.info.artifact_uri}/model", run.info.run_id,
                                     tags=directory_tags(MODEL, "2", verified))
    return str(mv.version)


def test_a_directory_signed_under_the_sources_name_is_not_its_twin(
        migrated: Migrated, forged: str, tmp_path: Path) -> None:
    dest = tmp_path / "forged"
    with pytest.raises(ProvenanceError) as info:
        fetch_verified_directory(f"models:/{TARGET}/{forged}", dest,
                                 source=f"models:/{MODEL}/2", public_key=migrated.public_key,
                                 tracking_uri=migrated.server.uri)
    assert info.value.reason == "SOURCE_MISMATCH"
    assert not dest.exists() and not list(tmp_path.glob(".forged.*"))
    # migrate still counts the genuine twin, and names the forged one as no twin
    run = migrate(migrated.server.uri, migrated.broker.address, migrated.public_key,
                  "--model", MODEL, "--json", "--alias", "champion")
    assert run.returncode == 0, run.stderr[-3000:]
    outcomes = {v["version"]: v for v in _doc(run)["versions"]}
    assert outcomes["2"]["status"] == "already_migrated", outcomes["2"]
    assert outcomes["2"]["target"] != f"{TARGET}/{forged}"
    champion = snapshot(migrated.server.uri)["models"][TARGET][1]["champion"]
    assert champion != forged

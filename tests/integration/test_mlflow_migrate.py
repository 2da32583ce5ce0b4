"""``airlock migrate`` on a real registry: a loopback MLflow tracking server (sqlite, local
artifact root), the real broker, engine and image.

One registry is built and migrated once per module (each conversion costs seconds on a small
machine); the tests then each check one property of that run: benign versions come back from
the registry through ``load_verified`` and predict like the originals, hostile ones are
refused with reasons and leave no trace on the host, a dry run and a re-run change nothing, and
a registry larger than one search page is walked completely.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from airlock_broker.security.keys import load_key
from airlock_client import (
    Client,
    ConversionResult,
    ProvenanceError,
    SafeLoadError,
    load_verified,
)
from airlock_client import _lineage as tags
from tests.adversarial.payloads import malicious_torch_zip
from tests.conftest import AIRLOCK, IMAGE, BrokerProcess, start_broker
from tests.fixtures import mlflow_models, models
from tests.fixtures.mlflow_models import Saved
from tests.integration import mlflow_server
from tests.integration.mlflow_server import MlflowServer, starting_mlflow_server

pytestmark = pytest.mark.integration

ATOL = 1e-5
#: Small enough that both the model list and one model's versions span several pages.
PAGE_SIZE = 2
#: registered model -> the MLflow flavours/serialisations of its versions, in order.
BENIGN = {
    "fraud": ["sklearn-pickle", "sklearn-cloudpickle", "sklearn-skops"],
    "forecast": ["pytorch-pickle", "pytorch-default-pt2"],
}
HOSTILE = ("evil-sklearn", "evil-torch", "evil-loader")


def _marker_source(marker: Path) -> str:
    return (f"import os\nos.makedirs({str(marker.parent)!r}, exist_ok=True)\n"
            f"open({str(marker)!r}, 'w').write('pwned')\n")


def malicious_torch_dir(path: Path, marker: Path) -> Path:
    """CVE-2024-37059: an MLflow pytorch model whose ``model.pth`` is a reduce payload."""
    mlflow_models.pytorch_dir(path, "pickle")
    (weights,) = path.glob("data/model.pth")
    malicious_torch_zip(weights, _marker_source(marker))
    return path


def loader_module_dir(path: Path, marker: Path) -> Path:
    """No pickle at all: ``MLmodel`` names a ``loader_module`` shipped in ``code/``, which
    ``mlflow.pyfunc.load_model`` would import (and run) after putting ``code/`` on sys.path."""
    (path / "code").mkdir(parents=True)
    (path / "code" / "airlock_evil_loader.py").write_text(
        _marker_source(marker) + "def _load_pyfunc(path):\n    return None\n")
    (path / "MLmodel").write_text(
        "flavors:\n  python_function:\n    loader_module: airlock_evil_loader\n"
        "    code: code\n    python_version: 3.11.7\nmlflow_version: 3.17.2\n")
    return path


@dataclass
class Registry:
    server: MlflowServer
    broker: BrokerProcess
    public_key: Path
    saved: dict[tuple[str, str], Saved]
    markers: list[Path]
    dry_run: subprocess.CompletedProcess[str]
    before_dry_run: dict[str, Any]
    after_dry_run: dict[str, Any]
    first: subprocess.CompletedProcess[str]
    after_first: dict[str, Any] = field(default_factory=dict)


def migrate(registry_uri: str, broker: str, public_key: Path, *args: str,
            tmpdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    # Two quick retries, not MLflow's seven with long back-offs, nor none: the server closes
    # a keep-alive connection idle for 5 s (uvicorn's default) while a version converts, and a
    # download that reuses it just then is refused once (a fresh-clone run: one of 5 versions
    # failed so, 'conda.yaml failed with exception HTTPConnectionPool(...)').
    env.update({"AIRLOCK_SERVER": broker, "AIRLOCK_MIGRATE_PAGE_SIZE": str(PAGE_SIZE),
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"})
    return subprocess.run([AIRLOCK, "migrate", "--tracking-uri", registry_uri,
                           "--public-key", str(public_key), *args],
                          capture_output=True, text=True, timeout=900, env=env, check=False)


def snapshot(uri: str) -> dict[str, Any]:
    """Everything a migration could change: models, versions with their tags, aliases, runs."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    models = {m.name: (dict(m.tags), dict(m.aliases))
              for m in client.search_registered_models(max_results=1000)}
    versions = {(v.name, v.version): dict(v.tags)
                for v in client.search_model_versions(max_results=1000)}
    runs = [r.info.run_id for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], max_results=1000)]
    return {"models": models, "versions": versions, "runs": sorted(runs)}


def _register(uri: str, name: str, model_dir: Path) -> str:
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
    mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
    return str(mv.version)


def _model_dirs(tmp: Path) -> tuple[list[tuple[str, Saved]], list[tuple[str, Path]],
                                    list[Path]]:
    """The benign versions' directories (with the models they hold), the hostile ones', and
    the files each hostile one would write on the host."""
    benign: list[tuple[str, Saved]] = []
    hostile: list[tuple[str, Path]] = []
    markers: list[Path] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cases in BENIGN.items():
            for case in cases:
                benign.append((name, mlflow_models.BENIGN[case](tmp / "models" / name / case)))
        for name, make in (("evil-sklearn", mlflow_models.malicious_sklearn_dir),
                           ("evil-torch", malicious_torch_dir),
                           ("evil-loader", loader_module_dir)):
            marker = tmp / "host-markers" / name / "pwned"
            markers.append(marker)
            hostile.append((name, make(tmp / "models" / name, marker)))
    return benign, hostile, markers


@pytest.fixture(scope="module")
def registry(docker_client, tmp_path_factory) -> Iterator[Registry]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("migrate")
    # With several suites running on 2 cores, `mlflow server` has taken more than the
    # fixture's 120 s to come up; this module starts one server, so it can afford to wait.
    mlflow_server.START_TIMEOUT = max(mlflow_server.START_TIMEOUT, 400.0)
    key_path = tmp / "state" / "provenance-signing-key.pem"
    config = tmp / "airlock.toml"
    config.write_text(f'[sandbox]\nimage = "{IMAGE}"\n\n[pools]\nmin_warm = 0\n')
    # The server comes up, and the model directories are written, while the broker starts.
    with starting_mlflow_server(tmp) as starting, ThreadPoolExecutor(max_workers=1) as background:
        building = background.submit(_model_dirs, tmp)
        broker = start_broker(tmp, "--config", str(config),
                              env={"AIRLOCK_PROVENANCE_KEY": str(key_path)})
        try:
            public_key = tmp / "airlock.pub.pem"
            public_key.write_text(load_key(key_path).public_pem)
            benign, hostile, markers = building.result()
            server = starting.wait()
            saved = {(name, _register_now(server.uri, name, model.path)): model
                     for name, model in benign}
            for name, path in hostile:
                _register_now(server.uri, name, path)
            before = snapshot(server.uri)
            dry = migrate(server.uri, broker.address, public_key, "--all", "--dry-run", "--json")
            after_dry = snapshot(server.uri)
            first = migrate(server.uri, broker.address, public_key, "--all", "--json",
                            "--alias", "champion")
            state = Registry(server, broker, public_key, saved, markers, dry, before, after_dry,
                             first)
            state.after_first = snapshot(server.uri)
            yield state
        finally:
            code = broker.stop()
            assert code == 0, f"broker exited {code}:\n{broker.log.read_text()[-3000:]}"


def _doc(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _by_version(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(v["model"], v["version"]): v for v in doc["versions"]}


def _predict(model: Any, saved: Saved) -> tuple[np.ndarray, np.ndarray]:
    (inp,) = model.get_inputs()
    outputs = model.run(None, {inp.name: saved.sample.astype(np.float32)})
    if saved.kind == "torch":
        import torch

        with torch.no_grad():
            return np.asarray(outputs[0]), saved.model(torch.from_numpy(saved.sample)).numpy()
    names = [o.name for o in model.get_outputs()]
    return (np.asarray(outputs[names.index("probabilities")]),
            saved.model.predict_proba(saved.sample))


def test_dry_run_walks_everything_and_changes_nothing(registry: Registry) -> None:
    assert registry.dry_run.returncode == 0, registry.dry_run.stderr[-3000:]
    doc = _doc(registry.dry_run)
    assert doc["dry_run"] is True
    assert {v["status"] for v in doc["versions"]} == {"would_convert"}
    assert registry.after_dry_run == registry.before_dry_run


def test_whole_registry_is_walked_across_pages(registry: Registry) -> None:
    """7 registered models and 3 versions of one, with 2 results per search page."""
    doc = _doc(registry.first)
    expected = {(n, v) for (n, v) in registry.before_dry_run["versions"]}
    assert set(_by_version(doc)) == expected
    assert len(expected) == 8 and len(registry.before_dry_run["models"]) > PAGE_SIZE


def test_benign_versions_are_migrated_and_load_back_with_parity(registry: Registry) -> None:
    doc = _doc(registry.first)
    assert registry.first.returncode == 1, registry.first.stderr[-3000:]  # hostile ones failed
    outcomes = _by_version(doc)
    for (name, version), saved in registry.saved.items():
        outcome = outcomes[(name, version)]
        assert outcome["status"] == "converted", outcome
        assert outcome["format"] == "onnx"
        target = outcome["target"]
        # the expected source's bytes are downloaded and packed here as the client sent them:
        # the signed input sha256 must be theirs
        session = load_verified(f"models:/{target}", source=f"models:/{name}/{version}",
                                public_key=registry.public_key,
                                tracking_uri=registry.server.uri)
        got, expected = _predict(session, saved)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    # --alias: each target's alias is its newest source version's twin
    models = registry.after_first["models"]
    assert models["fraud-airlock"][1]["champion"] == outcomes[("fraud", "3")]["target"].split(
        "/")[1]
    champion = load_verified("models:/forecast-airlock@champion", source="models:/forecast",
                             public_key=registry.public_key, tracking_uri=registry.server.uri)
    got, expected = _predict(champion, registry.saved[("forecast", "2")])
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_migrated_versions_hold_only_the_file_and_its_provenance(registry: Registry) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry.server.uri, registry_uri=registry.server.uri)
    versions = registry.after_first["versions"]
    twins = {k: t for k, t in versions.items() if k[0].endswith("-airlock")}
    assert len(twins) == len(registry.saved)
    for (name, version), tag_map in twins.items():
        mv = client.get_model_version(name, version)
        files = sorted(a.path for a in client.list_artifacts(mv.run_id, "model"))
        assert files == ["model/model.onnx", "model/model.onnx.provenance.json"]
        source = (tag_map[tags.SOURCE_MODEL], tag_map[tags.SOURCE_VERSION])
        assert versions[source][tags.MIGRATED_TO] == f"{name}/{version}"
        assert len(tag_map[tags.OUTPUT_SHA256]) == 64 and len(tag_map[tags.SOURCE_SHA256]) == 64
        assert tag_map[tags.VERDICT] in {"format_safe_only", "integrity_verified"}
    # The original (pickled) versions are refused by the safe load: not Airlock's outputs.
    with pytest.raises(SafeLoadError) as info:
        load_verified("models:/fraud/1", source="models:/fraud",
                      public_key=registry.public_key, tracking_uri=registry.server.uri)
    assert info.value.reason == "NOT_AIRLOCK_OUTPUT"


def test_hostile_versions_are_refused_with_reasons_and_leave_no_trace(
        registry: Registry) -> None:
    outcomes = _by_version(_doc(registry.first))
    versions = registry.after_first["versions"]
    for name in HOSTILE:
        outcome = outcomes[(name, "1")]
        assert outcome["status"] in {"rejected", "failed"}, outcome
        assert outcome["reason"] and outcome["message"], outcome
        assert versions[(name, "1")][tags.REASON] == outcome["reason"]
        assert f"{name}-airlock" not in registry.after_first["models"]
    assert outcomes[("evil-loader", "1")]["reason"] == "UNSUPPORTED_FLAVOR"
    for marker in registry.markers:
        assert not marker.exists() and not marker.parent.exists(), marker
    assert "[8/8]" in registry.first.stderr  # progress went to stderr, one line per version


def test_rerun_does_nothing_new(registry: Registry) -> None:
    again = migrate(registry.server.uri, registry.broker.address, registry.public_key,
                    "--all", "--json", "--alias", "champion")
    assert again.returncode == 1, again.stderr[-3000:]
    doc = _doc(again)
    assert doc["counts"]["converted"] == 0
    statuses = {(v["model"], v["status"]) for v in doc["versions"]}
    assert {s for _, s in statuses} <= {"already_migrated", "failed_earlier"}
    assert snapshot(registry.server.uri) == registry.after_first
    for marker in registry.markers:
        assert not marker.exists()

    table = migrate(registry.server.uri, registry.broker.address, registry.public_key,
                    "--model", "fraud")
    assert table.returncode == 0, table.stderr[-3000:]
    assert table.stdout.splitlines()[0].split()[:3] == ["MODEL", "VERSION", "STATUS"]
    assert "3 already migrated" in table.stdout


# -- issue #11: a twin is believed from its signed provenance, never from its tags -------------
# These run last: they add a model to the module's registry.


def _register_now(uri: str, name: str, model_dir: Path) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _register(uri, name, model_dir)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def log_folder(uri: str, folder: Path) -> Any:
    """A new run on ``uri`` holding ``folder``'s files under ``model/``: what anyone with
    write access to the registry can make."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(folder), artifact_path="model")
    finally:
        mlflow.set_tracking_uri(None)
    return run


def _plant_forged_twin(uri: str, source: str, version: str, result: ConversionResult) -> str:
    """What anyone with write access to the registry can do: register an output Airlock
    signed (for *their* model) as ``<source>-airlock/N``, with every tag a real twin of
    ``source``/``version`` has, consistent with the signed record."""
    from mlflow import MlflowClient

    record = result.provenance_record
    assert record is not None
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    target = f"{source}-airlock"
    if not client.search_registered_models(filter_string=f"name = '{target}'"):
        client.create_registered_model(target, tags={tags.ROLE: tags.ROLE_MIGRATED,
                                                     tags.SOURCE_MODEL: source})
    folder = result.output.parent / "forged"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(result.output.read_bytes())
    (folder / "model.onnx.provenance.json").write_bytes(result.provenance)
    run = log_folder(uri, folder)
    lineage = {
        tags.SOURCE_MODEL: source, tags.SOURCE_VERSION: version,
        tags.SOURCE_SHA256: record.input_sha256, tags.OUTPUT_SHA256: record.output_sha256,
        tags.OUTPUT_FORMAT: "onnx", tags.OUTPUT_FILE: "model.onnx",
        tags.PROVENANCE_FILE: "model.onnx.provenance.json", tags.VERDICT: record.assurance,
        tags.VALIDATION: record.validation, tags.JOB_ID: record.job_id,
        tags.PROVENANCE_KEY: record.key_fingerprint}
    mv = client.create_model_version(target, f"{run.info.artifact_uri}/model", run.info.run_id,
                                     tags=lineage)
    return str(mv.version)


@pytest.fixture(scope="module")
def forged(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``payments`` v1 (a benign sklearn model) and, before any migration of it, a forged twin:
    the attacker's own model sent through the real broker (so validly signed, naming
    ``models:/payments/1`` as its subject), registered as ``payments-airlock/1`` with every tag
    right. Then ``airlock migrate --model payments --alias champion``."""
    tmp = tmp_path_factory.mktemp("forged")
    uri = registry.server.uri
    saved = mlflow_models.BENIGN["sklearn-pickle"](tmp / "payments")
    _register_now(uri, "payments", saved.path)
    backdoor, _ = models.make_onnx(tmp / "attacker")
    out = tmp / "attacker" / "signed" / "model.onnx"
    with Client(registry.broker.address, public_key=registry.public_key) as client:
        result = client.convert(backdoor, out, subject="models:/payments/1")
    twin = _plant_forged_twin(uri, "payments", "1", result)
    before = snapshot(uri)
    run = migrate(uri, registry.broker.address, registry.public_key, "--model", "payments",
                  "--alias", "champion", "--json")
    return {"saved": saved, "forged": twin, "run": run, "before": before,
            "record": result.provenance_record}


def test_a_forged_twin_is_not_already_migrated_and_never_gets_the_alias(
        registry: Registry, forged: dict[str, Any]) -> None:
    run = forged["run"]
    assert run.returncode == 0, run.stderr[-3000:]
    (outcome,) = _doc(run)["versions"]
    assert outcome["status"] == "converted", outcome  # not "already_migrated"
    genuine = outcome["target"].rpartition("/")[2]
    assert genuine != forged["forged"]
    assert f"payments-airlock/{forged['forged']} (SOURCE_MISMATCH)" in outcome["message"]
    assert f"WARNING: payments-airlock/{forged['forged']} claims" in run.stderr
    models = snapshot(registry.server.uri)["models"]
    assert models["payments-airlock"][1] == {"champion": genuine}
    champion = load_verified("models:/payments-airlock@champion", source="models:/payments",
                             public_key=registry.public_key, tracking_uri=registry.server.uri)
    got, expected = _predict(champion, forged["saved"])
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_load_verified_refuses_the_forged_twin_for_its_source(
        registry: Registry, forged: dict[str, Any]) -> None:
    record = forged["record"]  # the attacker's conversion is validly signed, with their subject
    assert record.subject == "models:/payments/1" and record.principal  # whoever asked
    uri = f"models:/payments-airlock/{forged['forged']}"
    for source in ("models:/payments", "models:/payments/1"):
        with pytest.raises(ProvenanceError) as info:
            load_verified(uri, source=source, public_key=registry.public_key,
                          tracking_uri=registry.server.uri)
        assert info.value.reason == "SOURCE_MISMATCH", source


def test_migrate_refuses_a_key_it_did_not_pin(registry: Registry) -> None:
    before = snapshot(registry.server.uri)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MLFLOW_") and k != "AIRLOCK_PUBLIC_KEY"}
    env["AIRLOCK_SERVER"] = registry.broker.address
    done = subprocess.run([AIRLOCK, "migrate", "--tracking-uri", registry.server.uri,
                           "--model", "fraud", "--alias", "champion"],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "--public-key" in done.stderr and "trust on first use" in done.stderr
    assert snapshot(registry.server.uri) == before

"""``airlock migrate`` killed (SIGKILL) just after the broker converted a version, then run
again, on a real registry (loopback MLflow server), broker, engine and image: every version
ends migrated once, the broker's audit log shows one sandbox per version (the resumed run is
answered from the stored result, or adopts the killed run's open MLflow run), and no run of
``airlock-migrations`` is left RUNNING. The review that found it: two ok conversions of
``models:/model2/1`` and a run "airlock model2 v1" RUNNING for ever. The killed run's work
directory, with its downloads, is removed by the next run (one per suite run had piled up
in ``/tmp``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.security.keys import load_key
from tests.conftest import AIRLOCK, IMAGE, start_broker
from tests.fixtures import mlflow_models
from tests.integration.mlflow_server import MlflowServer
from tests.integration.test_mlflow_migrate import _register_now, migrate

pytestmark = pytest.mark.integration

PREFIX = "crash-"
#: model -> versions; the run is killed once model2 v1 is converted
MODELS = {"model1": 1, "model2": 2}
SUBJECTS = [f"models:/{PREFIX}{name}/{v}" for name, n in MODELS.items()
            for v in range(1, n + 1)]
KILL_AFTER = f"models:/{PREFIX}model2/1"
DEADLINE = 600.0


def _audit(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r.get("subject") in SUBJECTS]


def _sandboxes(records: list[dict[str, Any]]) -> Counter[str]:
    """Conversions that ran a sandbox and answered ok, per subject (replays ran none)."""
    return Counter(r["subject"] for r in records
                   if r.get("outcome") == "ok" and not r.get("replay_of"))


def _open_runs(uri: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.get_experiment_by_name("airlock-migrations")
    if found is None:
        return []
    return [r.info.run_name for r in client.search_runs(
        [found.experiment_id], filter_string="attributes.status = 'RUNNING'")
        if r.info.run_name.startswith(f"airlock {PREFIX}")]


def test_a_run_killed_after_a_conversion_resumes_without_converting_twice(
        docker_client, mlflow_registry: MlflowServer,  # type: ignore[no-untyped-def]
        tmp_path: Path) -> None:
    server = mlflow_registry
    saved = mlflow_models.BENIGN["sklearn-pickle"](tmp_path / "model").path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, versions in MODELS.items():
            for _ in range(versions):
                _register_now(server.uri, PREFIX + name, saved)
    key_path = tmp_path / "state" / "provenance-signing-key.pem"
    config = tmp_path / "airlock.toml"
    config.write_text(f'[sandbox]\nimage = "{IMAGE}"\n\n[pools]\nprofiles = ["sklearn"]\n')
    broker = start_broker(tmp_path, "--config", str(config),
                          env={"AIRLOCK_PROVENANCE_KEY": str(key_path)})
    try:
        public_key = tmp_path / "airlock.pub.pem"
        public_key.write_text(load_key(key_path).public_pem)
        models = [arg for name in MODELS for arg in ("--model", PREFIX + name)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["AIRLOCK_SERVER"] = broker.address
        # A killed process cleans up nothing itself: its work directory stays until the next
        # run sweeps it. Both runs use a TMPDIR of their own, under tmp_path.
        tmpdir = tmp_path / "runs-tmp"
        tmpdir.mkdir(mode=0o700)
        env["TMPDIR"] = str(tmpdir)
        killed = subprocess.Popen(
            [AIRLOCK, "migrate", "--tracking-uri", server.uri, "--public-key",
             str(public_key), "--jobs", "1", *models],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            deadline = time.monotonic() + DEADLINE
            while not _sandboxes(_audit(broker.audit))[KILL_AFTER]:
                assert killed.poll() is None, "the first run ended before it was killed"
                assert time.monotonic() < deadline, "model2 v1 was never converted"
                time.sleep(0.02)
            killed.send_signal(signal.SIGKILL)  # converted; its twin not registered yet
        finally:
            killed.kill()
            killed.wait()
        left = list(tmpdir.iterdir())
        assert [p.name.startswith(".airlock-run.") for p in left] == [True], left
        past = time.time() - 120  # a leftover is one untouched for a minute (_part_files)
        os.utime(left[0], (past, past))

        again = migrate(server.uri, broker.address, public_key, *models, "--json",
                        tmpdir=tmpdir)

        assert again.returncode == 0, again.stderr[-3000:]
        # The killed run's downloads went with its work directory, and the new run's with its.
        assert list(tmpdir.iterdir()) == []
        assert "removed 1 work directory that killed commands left" in again.stderr
        doc = json.loads(again.stdout)
        statuses = {(v["model"], v["version"]): v["status"] for v in doc["versions"]}
        assert set(statuses.values()) <= {"converted", "already_migrated"}, statuses
        assert len(statuses) == len(SUBJECTS)
        deadline = time.monotonic() + 60
        while len(_audit(broker.audit)) < len(SUBJECTS) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _sandboxes(_audit(broker.audit)) == dict.fromkeys(SUBJECTS, 1), \
            _audit(broker.audit)
        assert _open_runs(server.uri) == []
    finally:
        code = broker.stop()
        assert code == 0, f"broker exited {code}:\n{broker.log.read_text()[-3000:]}"

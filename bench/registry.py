"""S8: ``airlock migrate --all`` of a local MLflow registry, against the same conversions in
process.

The registry is built here, in the benchmark's own temporary directory: a sqlite backend
store and a local artifact root (no tracking server), one registered model holding ``n``
versions, each a small scikit-learn pipeline (StandardScaler + LogisticRegression, fitted on
its own seed, so no two versions have the same bytes) saved with ``mlflow.sklearn.save_model``
and registered from a run, as a user's training job would. MLflow 3 saves them in its default
format for scikit-learn, skops. Building it is setup, timed apart
and kept off the measured time.

Airlock's figure is the ``airlock`` command as a user runs it (its own process, from its
start to its exit: importing MLflow, walking the registry, downloading, converting in the
broker's sandboxes, verifying and registering each twin), with an explicit ``--jobs``. The
baseline (UNSAFE, see ``bench.baseline``) is the same versions loaded with
``mlflow.sklearn.load_model("models:/NAME/V")`` in the benchmark's process and converted with
skl2onnx, one after another, libraries already imported; it registers nothing, which is part
of what the ratio shows.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import baseline
from bench.broker import AIRLOCK, BenchError, Broker

#: The registered model S8 migrates.
MODEL = "bench-s8"
#: A fixed requirement list: left to itself, ``save_model`` infers one by loading the model
#: in a subprocess, about a second per version.
REQUIREMENTS = ["scikit-learn"]


@dataclass(frozen=True)
class LocalRegistry:
    uri: str  # sqlite:///<root>/mlflow.db, tracking and registry alike
    root: Path
    versions: list[str]
    setup_s: float


def build(root: Path, n: int) -> LocalRegistry:
    """A sqlite-backed registry under ``root`` with ``n`` versions of ``MODEL``."""
    began = time.perf_counter()
    import mlflow.sklearn
    import numpy as np
    from mlflow import MlflowClient
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    root.mkdir(parents=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("bench-s8",
                                          artifact_location=(root / "artifacts").as_uri())
    client.create_registered_model(MODEL)
    versions: list[str] = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        x = rng.random((64, 4), dtype=np.float32)
        y = (x[:, 0] + x[:, 1] > 1.0).astype(np.int64)
        model = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
        saved = root / "saved" / f"v{seed}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.sklearn.save_model(model, str(saved), pip_requirements=REQUIREMENTS)
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(saved), artifact_path="model")
        client.set_terminated(run.info.run_id)
        mv = client.create_model_version(MODEL, f"{run.info.artifact_uri}/model",
                                         run.info.run_id)
        versions.append(str(mv.version))
    return LocalRegistry(uri, root, versions, time.perf_counter() - began)


def in_process(registry: LocalRegistry) -> list[float]:
    """UNSAFE: each version loaded with MLflow's sklearn loader and converted, in a row."""
    import mlflow

    times: list[float] = []
    mlflow.set_tracking_uri(registry.uri)  # where ``models:/`` URIs resolve
    mlflow.set_registry_uri(registry.uri)
    try:
        for version in registry.versions:
            elapsed, _ = baseline.timed(baseline.mlflow_sklearn_to_onnx,
                                        f"models:/{MODEL}/{version}")
            times.append(elapsed)
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the default
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
    return times


def migrate(registry: LocalRegistry, broker: Broker, public_key: Path, jobs: int
            ) -> tuple[float, dict[str, Any], str]:
    """``airlock migrate --all --json --jobs N``: wall seconds, its JSON summary, its stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["AIRLOCK_SERVER"] = broker.address
    began = time.perf_counter()
    # In the registry's directory: a sqlite store puts the artifacts of an experiment it
    # creates (the twins') under ./mlruns of the working directory.
    done = subprocess.run([str(AIRLOCK), "migrate", "--all", "--tracking-uri", registry.uri,
                           "--public-key", str(public_key), "--jobs", str(jobs), "--json"],
                          capture_output=True, text=True, env=env, timeout=3600, check=False,
                          cwd=registry.root)
    wall = time.perf_counter() - began
    if not done.stdout.strip():
        raise BenchError(f"airlock migrate exited {done.returncode}: {done.stderr[-3000:]}")
    summary: dict[str, Any] = json.loads(done.stdout)
    return wall, summary, done.stderr


def scenario(broker: Broker, n: int, jobs: int, work: Path) -> dict[str, Any]:
    """S8 on the warm broker: build the registry (untimed), time the in-process baseline over
    its versions, then ``airlock migrate --all`` of it, starting on a ready pool."""
    from airlock_broker.security.keys import KEY_FILE_NAME, load_key

    registry = build(work / "s8-registry", n)
    public_key = work / "s8-airlock.pub.pem"
    public_key.write_text(load_key(broker.spool / KEY_FILE_NAME).public_pem)
    in_process(replace(registry, versions=registry.versions[:1]))  # first-call costs, untimed
    broker.wait_ready()
    base = in_process(registry)
    base_wall = sum(base)
    broker.wait_ready()
    counters0 = broker.pool_counters()
    wall, summary, stderr = migrate(registry, broker, public_key, jobs)
    counters1 = broker.pool_counters()
    converted = summary["counts"].get("converted", 0)
    if summary["exit_code"] != 0 or converted != n:
        raise BenchError(f"airlock migrate: {summary['status']}, {summary['counts']}; "
                         f"{stderr[-2000:]}")
    per_minute = n * 60 / wall
    base_per_minute = n * 60 / base_wall
    return {
        "n": n, "jobs": summary["jobs"],
        "versions_per_minute": round(per_minute, 1),
        "migrate_wall_s": round(wall, 2),
        # The command's own rate, from its first version's start to its last's end (no
        # process start, no MLflow import, no registry walk).
        "versions_per_minute_reported": summary["versions_per_minute"],
        "baseline_versions_per_minute": round(base_per_minute, 1),
        "baseline_wall_s": round(base_wall, 2),
        "ratio": round(base_per_minute / per_minute, 1),
        "registry_setup_s": round(registry.setup_s, 1),
        "served_warm": sum(counters1[p]["served_warm"] - counters0[p]["served_warm"]
                           for p in counters1),
        "served_cold": sum(counters1[p]["served_cold"] - counters0[p]["served_cold"]
                           for p in counters1),
        "samples": {"baseline_ms": [round(s * 1000, 2) for s in base]},
    }

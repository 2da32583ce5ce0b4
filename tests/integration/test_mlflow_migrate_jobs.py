"""``airlock migrate --jobs 4`` on a real registry (loopback MLflow server), broker, engine and
image, against ``--jobs 1`` on an identical registry: the same outcomes, tags, twins and
aliases, the hostile version refused alike and harmless, and the broker's audit log showing
exactly one conversion per version.

The two registries live on the session's tracking server under two prefixes (``serial-``,
``parallel-``): the same model directories registered in the same order, so everything but
the names and the twins' numbers must match.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.security.keys import load_key
from airlock_client import _lineage as tags
from tests.conftest import IMAGE, BrokerProcess, start_broker
from tests.fixtures import mlflow_models
from tests.integration.mlflow_server import MlflowServer
from tests.integration.test_mlflow_migrate import _register_now, migrate, snapshot

pytestmark = pytest.mark.integration

#: registered model -> its versions, in order: "evil" is a ``__reduce__`` payload
MODELS = {
    "fraud": ["sklearn-pickle", "sklearn-cloudpickle", "evil", "sklearn-skops",
              "sklearn-pickle", "sklearn-cloudpickle"],
    "churn": ["sklearn-skops"],
}
PREFIXES = ("serial-", "parallel-")
VERSIONS = sum(len(v) for v in MODELS.values())
#: Audit records are appended as each job's handler ends, just after the client's answer.
AUDIT_DEADLINE = 60.0


@dataclass
class Runs:
    server: MlflowServer
    broker: BrokerProcess
    marker: Path
    serial: subprocess.CompletedProcess[str]
    parallel: subprocess.CompletedProcess[str]
    state: dict[str, Any]


def _register_models(uri: str, models: Path, marker: Path) -> None:
    """Write each case's directory once and register ``MODELS`` under both prefixes, in the
    same order; the hostile version's payload would write ``marker`` on the host."""
    dirs: dict[str, Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in {c for cases in MODELS.values() for c in cases}:
            path = models / case
            if case == "evil":
                dirs[case] = mlflow_models.malicious_sklearn_dir(path, marker)
            else:
                dirs[case] = mlflow_models.BENIGN[case](path).path
    for prefix in PREFIXES:
        for name, cases in MODELS.items():
            for case in cases:
                _register_now(uri, prefix + name, dirs[case])


@pytest.fixture(scope="module")
def runs(docker_client, mlflow_registry: MlflowServer,  # type: ignore[no-untyped-def]
         tmp_path_factory) -> Iterator[Runs]:
    """Both migrations, on the session's tracking server: they walk only their own models
    (``--model``), and everything compared is read under their prefixes."""
    tmp = tmp_path_factory.mktemp("migrate-jobs")
    server = mlflow_registry
    key_path = tmp / "state" / "provenance-signing-key.pem"
    config = tmp / "airlock.toml"
    # Every version is an sklearn model: warm sklearn containers only, no stock for the stream.
    config.write_text(f'[sandbox]\nimage = "{IMAGE}"\n\n'
                      f'[pools]\nprofiles = ["sklearn"]\nstream_window_seconds = 0\n')
    marker = tmp / "host-markers" / "pwned"
    with ThreadPoolExecutor(max_workers=2) as background:
        # The registries are built while the broker starts.
        registering = background.submit(_register_models, server.uri, tmp / "models", marker)
        broker = start_broker(tmp, "--config", str(config),
                              env={"AIRLOCK_PROVENANCE_KEY": str(key_path)})
        try:
            public_key = tmp / "airlock.pub.pem"
            public_key.write_text(load_key(key_path).public_pem)
            registering.result()

            def run(prefix: str, jobs: str) -> subprocess.CompletedProcess[str]:
                models = [arg for name in MODELS for arg in ("--model", prefix + name)]
                return migrate(server.uri, broker.address, public_key, *models, "--json",
                               "--alias", "champion", "--jobs", jobs)

            # The two runs touch disjoint models, so they run side by side: the broker's queue
            # (two jobs at a time by default) serves both, and neither waits for the other's
            # start-up, downloads and registrations.
            serial_run = background.submit(run, "serial-", "1")
            parallel_run = background.submit(run, "parallel-", "4")
            serial, parallel = serial_run.result(), parallel_run.result()
            yield Runs(server, broker, marker, serial, parallel, snapshot(server.uri))
        finally:
            code = broker.stop()
            assert code == 0, f"broker exited {code}:\n{broker.log.read_text()[-3000:]}"


def _doc(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _outcomes(proc: subprocess.CompletedProcess[str], prefix: str) -> list[tuple[Any, ...]]:
    """The report without what may differ: the prefix, the twins' numbers and output digests,
    the seconds."""
    return [(v["model"].removeprefix(prefix), v["version"], v["status"], v["format"],
             v["assurance"], v["source_sha256"], v["reason"])
            for v in _doc(proc)["versions"]]


def _lineage(state: dict[str, Any], prefix: str) -> dict[tuple[str, str], Any]:
    """Each source version's tags with ``migrated_to`` replaced by what the twin it names says
    of itself, and each target's aliases by the source version their twin names."""
    versions = state["versions"]
    found: dict[tuple[str, str], Any] = {}

    def twin_of(where: tuple[str, str]) -> dict[str, str]:
        # Not the job nor the output's digest: two conversions of the same bytes need not
        # give the same ONNX bytes (the signed record binds each twin to its own).
        twin = {k: v for k, v in versions[where].items()
                if k not in {tags.JOB_ID, tags.OUTPUT_SHA256}}
        twin[tags.SOURCE_MODEL] = twin[tags.SOURCE_MODEL].removeprefix(prefix)
        return twin

    for (name, version), tag_map in versions.items():
        if not name.startswith(prefix) or name.endswith("-airlock"):
            continue
        mine = dict(tag_map)
        if tags.MIGRATED_TO in mine:
            target, _, number = mine.pop(tags.MIGRATED_TO).rpartition("/")
            mine["twin"] = twin_of((target, number))
            assert mine["twin"][tags.SOURCE_VERSION] == version
        mine.pop(tags.MESSAGE, None)  # a sandbox's words; the reason is compared
        found[(name.removeprefix(prefix), version)] = mine
    for name, (_, aliases) in state["models"].items():
        if name.startswith(prefix) and name.endswith("-airlock"):
            for alias, number in aliases.items():
                found[(name.removeprefix(prefix), alias)] = twin_of((name, number))
    return found


def _audited(broker: BrokerProcess, prefix: str) -> Counter[str]:
    """Conversions per subject in the broker's audit log, once every version has one."""
    deadline = time.monotonic() + AUDIT_DEADLINE
    while True:
        lines = broker.audit.read_text().splitlines() if broker.audit.exists() else []
        seen = Counter(r.get("subject", "") for r in map(json.loads, lines)
                       if r.get("subject", "").startswith(f"models:/{prefix}"))
        if len(seen) >= VERSIONS or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def test_four_at_a_time_end_as_one_at_a_time(runs: Runs) -> None:
    for proc in (runs.serial, runs.parallel):
        assert proc.returncode == 1, proc.stderr[-3000:]  # the hostile version
    assert _doc(runs.serial)["jobs"] == 1 and _doc(runs.parallel)["jobs"] == 4
    expected = _outcomes(runs.serial, "serial-")
    assert _outcomes(runs.parallel, "parallel-") == expected
    statuses = {(o[0], o[1]): o[2] for o in expected}
    assert statuses.pop(("fraud", "3")) in {"rejected", "failed"}, expected
    assert set(statuses.values()) == {"converted"}, expected
    assert _lineage(runs.state, "parallel-") == _lineage(runs.state, "serial-")
    assert _lineage(runs.state, "parallel-")[("fraud-airlock", "champion")][
        tags.SOURCE_VERSION] == "6"
    assert not runs.marker.exists() and not runs.marker.parent.exists()


def test_the_audit_log_shows_one_conversion_per_version(runs: Runs) -> None:
    for prefix in PREFIXES:
        seen = _audited(runs.broker, prefix)
        assert seen == {f"models:/{prefix}{name}/{v}": 1 for name, cases in MODELS.items()
                        for v in range(1, len(cases) + 1)}, prefix


def test_progress_lines_are_whole_with_rate_and_time_left(runs: Runs) -> None:
    lines = runs.parallel.stderr.splitlines()
    done = [line for line in lines if re.fullmatch(
        rf"airlock migrate: \d+/{VERSIONS} done( \(\d+ failed\))?, [\d.]+/min"
        r"(, about \S+ left)?", line)]
    assert len(done) == VERSIONS, runs.parallel.stderr[-3000:]
    assert done[-1].startswith(f"airlock migrate: {VERSIONS}/{VERSIONS} done (1 failed), ")
    assert not [line for line in lines if line.count("airlock migrate:") > 1]
    assert f"{VERSIONS} version(s) in 2 registered model(s), 4 at a time" in runs.parallel.stderr

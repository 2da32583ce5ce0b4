"""``airlock migrate`` resumed after a crash (SIGKILL mid-run): nothing converted twice, no run
left RUNNING for ever. The review that found it: a re-run converted ``models:/model2/1`` a
second time (two ok conversions in the audit log) and left the killed run's MLflow run
"airlock model2 v1" RUNNING, never registered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airlock_broker.security.keys import SigningKey, create_key
from airlock_client import Client, _migrate_cli, cli
from airlock_client import _lineage as tags
from airlock_client.migrate import Migration, Options, Status
from tests.unit.fake_registry import FakeRegistry
from tests.unit.migrate_helpers import FakeSandbox, source_dir
from tests.unit.test_idempotency import start  # noqa: F401  (the in-process broker fixture)


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return create_key(tmp_path / "state" / "key.pem")


def _converter(address: str, tmp_path: Path, *argv: str) -> _migrate_cli.Broker:
    """The CLI's broker, as one ``airlock migrate`` process makes it."""
    with Client(address) as probe:
        pem = probe.provenance_key().public_key_pem.encode()
    args = cli.build_parser().parse_args(
        ["migrate", "--all", "--tracking-uri", "http://registry.example:5000",
         "--server", address, *argv])
    broker = _migrate_cli._converter(args, pem)
    broker.lanes.size(1)  # as run_migrate does, once it knows --jobs
    return broker


def test_a_resumed_run_is_answered_from_the_brokers_stored_result(
        start: Any, tmp_path: Path) -> None:  # noqa: F811
    """Two migrate processes converting the same version (the killed one, the resumed one):
    one sandbox, the second answered with the first's stored result."""
    run = start()
    model = source_dir(tmp_path / "m" / "model", "models:/model2/1")
    answers = []
    for attempt in range(2):
        broker = _converter(run.address, tmp_path)
        try:
            answers.append(broker.convert(model, tmp_path / f"out{attempt}" / "converted",
                                          "models:/model2/1"))
        finally:
            broker.close()
    assert run.conversions == 1, "the resumed run converted the version again"
    assert answers[1].replayed and answers[1].job_id == answers[0].job_id
    keys = {d["idempotency_key"] for d in run.audit()}
    assert len(keys) == 1


def test_another_version_or_other_options_get_another_key(start: Any,  # noqa: F811
                                                          tmp_path: Path) -> None:
    run = start()
    model = source_dir(tmp_path / "m" / "model", "models:/model2/1")
    calls = [((), "models:/model2/1"), ((), "models:/model2/2"),
             (("--timeout", "60"), "models:/model2/1")]
    for i, (argv, subject) in enumerate(calls):
        broker = _converter(run.address, tmp_path, *argv)
        try:
            broker.convert(model, tmp_path / f"out{i}" / "converted", subject)
        finally:
            broker.close()
    assert run.conversions == 3
    assert len({d["idempotency_key"] for d in run.audit()}) == 3


# -- runs a killed migrate left open -------------------------------------------------------------


class Killed(BaseException):
    """SIGKILL: the process ends here; no ``finally`` of it writes anything more."""


class CrashingRegistry(FakeRegistry):
    """Dies at the ``nth`` call named ``at`` (and writes nothing after it)."""

    def __init__(self, at: str, nth: int) -> None:
        super().__init__()
        self.at, self.nth, self.dead = at, nth, False

    def _write(self, *call: Any) -> None:
        if call[0] == self.at:
            self.nth -= 1
            self.dead = self.dead or self.nth == 0
        if self.dead:
            raise Killed
        super()._write(*call)

    def revive(self) -> None:
        self.at, self.dead = "", False


def _migrate(registry: FakeRegistry, sandbox: FakeSandbox, jobs: int = 1) -> list[Any]:
    return Migration(registry, fetch=sandbox.fetch, convert=sandbox.convert,
                     download=registry.download, public_key=sandbox.key.public_pem.encode(),
                     options=Options(jobs=jobs)).run(None)


def _killed(key: SigningKey, at: str, nth: int) -> tuple[CrashingRegistry, FakeSandbox]:
    """A run killed at the ``nth`` registry call ``at``: model1 v1 was migrated, model2 v1
    is where it died; then the process is gone."""
    registry = CrashingRegistry(at, nth)
    registry.add_model("model1", versions=1)
    registry.add_model("model2", versions=2)
    sandbox = FakeSandbox(key)
    with pytest.raises(Killed):
        _migrate(registry, sandbox)
    registry.revive()
    return registry, sandbox


def _running(registry: FakeRegistry) -> list[str]:
    return [run_id for run_id, run in registry.runs.items() if run["status"] == "RUNNING"]


def test_a_run_killed_before_registering_is_adopted_not_converted_again(
        key: SigningKey) -> None:
    registry, sandbox = _killed(key, "create_model_version", 2)
    (left,) = _running(registry)  # "airlock model2 v1", its two files logged
    assert sandbox.converted.count("models:/model2/1") == 1

    outcomes = _migrate(registry, sandbox)

    assert sandbox.converted.count("models:/model2/1") == 1, "converted twice"
    assert [(o.model, o.version, o.status) for o in outcomes] == [
        ("model1", "1", Status.ALREADY_MIGRATED), ("model2", "1", Status.CONVERTED),
        ("model2", "2", Status.CONVERTED)]
    assert "not converted again" in outcomes[1].message
    twin = registry.version("model2-airlock", 1)
    assert twin.run_id == left and twin.tags[tags.SOURCE_VERSION] == "1"
    assert registry.version("model2", 1).tags[tags.MIGRATED_TO] == "model2-airlock/1"
    assert registry.runs[left]["status"] == "FINISHED" and not _running(registry)
    again = _migrate(registry, sandbox)
    assert {o.status for o in again} == {Status.ALREADY_MIGRATED}


def test_a_run_killed_before_its_files_were_logged_is_failed_and_replaced(
        key: SigningKey) -> None:
    registry, sandbox = _killed(key, "log_artifact", 3)
    (left,) = _running(registry)

    outcomes = _migrate(registry, sandbox)

    assert [o.status for o in outcomes] == [Status.ALREADY_MIGRATED, Status.CONVERTED,
                                            Status.CONVERTED]
    assert registry.runs[left]["status"] == "FAILED" and not _running(registry)
    twin = registry.version("model2-airlock", 1)
    assert twin.run_id != left and registry.runs[twin.run_id]["status"] == "FINISHED"


def test_a_forged_open_run_is_failed_never_registered(key: SigningKey) -> None:
    registry, sandbox = _killed(key, "create_model_version", 2)
    (left,) = _running(registry)
    files = registry.runs[left]["artifacts"]
    files["model/model.onnx"] = b"backdoor" + files["model/model.onnx"]

    outcomes = _migrate(registry, sandbox)

    assert outcomes[1].status == Status.CONVERTED
    assert registry.runs[left]["status"] == "FAILED" and not _running(registry)
    assert registry.version("model2-airlock", 1).run_id != left
    assert sandbox.converted.count("models:/model2/1") == 2


def test_a_run_killed_after_registering_is_finished(key: SigningKey) -> None:
    registry, sandbox = _killed(key, "set_terminated", 2)
    (left,) = _running(registry)
    assert registry.version("model2-airlock", 1).run_id == left

    outcomes = _migrate(registry, sandbox)

    assert [o.status for o in outcomes][:2] == [Status.ALREADY_MIGRATED] * 2
    assert registry.runs[left]["status"] == "FINISHED" and not _running(registry)
    assert sandbox.converted.count("models:/model2/1") == 1


class _Recording:
    """A client that records the key of each conversion and refuses ``refuse`` once."""

    def __init__(self, refuse: str = "") -> None:
        self.keys: list[str | None] = []
        self.refuse = refuse

    def convert(self, artifact: Any, output: Any, **options: Any) -> str:
        key = options.get("idempotency_key")
        self.keys.append(key)
        if key is not None and key == self.refuse:
            from airlock_client import ConversionError

            raise ConversionError("IDEMPOTENCY_KEY_REUSED", "other bytes", kind="rejected",
                                  code="FAILED_PRECONDITION")
        return "converted"


def test_each_file_of_a_directory_version_has_a_key_of_its_own() -> None:
    """A transformers version's files are converted one by one (``convert_directory``):
    each under the key of its own subject and kind, the same in a resumed process, so a run
    killed half-way through a many-GiB model is answered from the broker's stored results."""
    def keys(client: _Recording) -> list[str | None]:
        keyed = _migrate_cli.KeyedClient(
            client, "http://registry.example:5000", _migrate_cli.Lanes(1))  # type: ignore[arg-type]
        for subject, declared in (("models:/lm/1/pytorch_model-00001-of-00002.bin", None),
                                  ("models:/lm/1/pytorch_model-00002-of-00002.bin", None),
                                  ("models:/lm/1/config.json", "json"),
                                  ("models:/lm/2/config.json", "json")):
            keyed.convert("in", "out", target="safetensors", loading_policy="safe_only",
                          subject=subject, declared_format=declared, job_timeout=0)
        return client.keys

    first, resumed = keys(_Recording()), keys(_Recording())
    assert first == resumed and len(set(first)) == 4
    assert all(k and k.startswith("airlock-migrate-") for k in first)
    # Bytes that changed since the key was first used: converted again under a fresh key.
    again = _Recording(refuse=str(first[2]))
    assert keys(again)[2:4] == [first[2], None]

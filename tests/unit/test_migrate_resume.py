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
from tests.unit.migrate_helpers import source_dir
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
    return _migrate_cli._converter(args, pem)


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

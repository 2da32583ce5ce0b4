"""``airlock migrate`` stopped by Ctrl-C or SIGTERM: no traceback, the summary of what
finished (one JSON object with ``--json``), the versions never started counted, exit 130."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.security.keys import SigningKey, create_key
from airlock_client import _migrate_cli
from airlock_client._types import ConversionResult
from tests.unit.migrate_helpers import FakeSandbox
from tests.unit.test_migrate_jobs import _cli, _registry

#: The walk: fraud v1-v5, churn v1-v4, encoder v1-v3.
VERSIONS = 12

#: A Ctrl-C raises here however the suite was started (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("ctrl_c_raises")


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return create_key(tmp_path / "state" / "key.pem")


class StopAt(FakeSandbox):
    """Converts; the conversion of ``subject`` also stops the run as ``stop`` says."""

    def __init__(self, key: SigningKey, subject: str, stop: Any) -> None:
        super().__init__(key)
        self.subject, self.stop = subject, stop

    def convert(self, model_dir: Path, output: Path, subject: str) -> ConversionResult:
        result = super().convert(model_dir, output, subject)
        if subject == self.subject:
            self.stop()
        return result


def _interrupt() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the main thread gets KeyboardInterrupt


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _run(monkeypatch: pytest.MonkeyPatch, key: SigningKey, sandbox: FakeSandbox,
         *argv: str) -> int:
    try:
        return _cli(monkeypatch, key, _registry(), sandbox, [], "--all", "--jobs", "1",
                    *argv)
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped airlock migrate (a traceback, no summary)")


@pytest.mark.parametrize("stop", [_interrupt, _sigterm], ids=["ctrl-c", "sigterm"])
def test_a_stopped_run_prints_what_finished_and_what_never_started(
        monkeypatch: pytest.MonkeyPatch, key: SigningKey,
        capsys: pytest.CaptureFixture[str], stop: Any) -> None:
    # Before the fix SIGTERM would end pytest itself: count it here instead.
    terms: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum))
    try:
        sandbox = StopAt(key, "models:/fraud/3", stop)
        code = _run(monkeypatch, key, sandbox, "--json")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not terms, "SIGTERM did not stop the run"
    assert code == 130
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["status"] == "interrupted" and doc["exit_code"] == 130
    assert doc["counts"]["converted"] == 3 and doc["counts"]["not_started"] == VERSIONS - 3
    assert len(doc["versions"]) == VERSIONS
    assert [v["status"] for v in doc["versions"]][2:4] == ["converted", "not_started"]
    assert "Traceback" not in captured.err


def test_the_table_counts_the_versions_never_started(
        monkeypatch: pytest.MonkeyPatch, key: SigningKey,
        capsys: pytest.CaptureFixture[str]) -> None:
    sandbox = StopAt(key, "models:/fraud/2", _interrupt)
    assert _run(monkeypatch, key, sandbox) == 130
    out = capsys.readouterr().out
    assert f"{VERSIONS} version(s): 2 converted, {VERSIONS - 2} not started" in out
    assert out.count("not_started") == VERSIONS - 2


def test_an_aborted_run_counts_the_versions_never_started(
        monkeypatch: pytest.MonkeyPatch, key: SigningKey,
        capsys: pytest.CaptureFixture[str]) -> None:
    from airlock_client._errors import ServiceUnavailable

    sandbox = FakeSandbox(key, plan={("fraud", "4"): ServiceUnavailable("gone")})
    assert _run(monkeypatch, key, sandbox) == _migrate_cli.EXIT_UNAVAILABLE
    out = capsys.readouterr().out
    assert f"{VERSIONS} version(s): 3 converted, {VERSIONS - 3} not started" in out

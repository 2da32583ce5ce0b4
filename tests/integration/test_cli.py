"""The ``airlock`` command as scripts use it: exit codes, --json, default output names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, free_port, run_broker_cli, run_cli
from tests.fixtures import models

pytestmark = pytest.mark.integration


def test_convert_writes_beside_the_input_and_prints_json(broker: BrokerProcess,
                                                         tmp_path: Path) -> None:
    artifact, _ = models.make_sklearn_pickle(tmp_path)
    done = run_cli("convert", str(artifact), "--json", server=broker.address)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] == "ok" and doc["reason"] is None and doc["format"] == "onnx"
    out = Path(doc["output"])
    assert out == artifact.with_suffix(".onnx")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == doc["sha256"]
    # read by the policy loader alone (issue 14): no artifact code ran
    assert doc["executed_artifact_code"] is False and doc["assurance"] == "integrity_verified"
    assert not list(tmp_path.glob(".*")), "temporary files left beside the output"


def test_human_output_names_the_result(broker: BrokerProcess, tmp_path: Path) -> None:
    artifact, _ = models.make_npy(tmp_path)
    out = tmp_path / "w.safetensors"
    done = run_cli("convert", str(artifact), "-o", str(out), server=broker.address)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout and "sha256" in done.stdout and out.is_file()


def test_declared_format_that_lies_exits_1_rejected(broker: BrokerProcess,
                                                    tmp_path: Path) -> None:
    artifact, _ = models.make_sklearn_pickle(tmp_path)
    done = run_cli("convert", str(artifact), "--format", "safetensors", "--json",
                   server=broker.address)
    assert done.returncode == 1
    doc = json.loads(done.stdout)
    assert (doc["status"], doc["reason"], doc["output"]) == ("rejected", "FORMAT_MISMATCH", None)


def test_unreachable_service_exits_3(tmp_path: Path) -> None:
    artifact, _ = models.make_npy(tmp_path)
    done = run_cli("convert", str(artifact), "--json", server=f"127.0.0.1:{free_port()}",
                   timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] == "failed"
    assert "no broker answered" in doc["message"] and "AIRLOCK_SERVER" in doc["message"], doc


@pytest.mark.parametrize("args", [
    ["convert"], ["convert", "/nonexistent/model.pkl"], ["convert", "x", "--to", "pickle"],
    ["convert", "{artifact}", "--input-shape", "1,abc"], ["frobnicate"],
])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    artifact, _ = models.make_npy(tmp_path)
    done = run_cli(*[a.format(artifact=artifact) for a in args], server="127.0.0.1:1")
    assert done.returncode == 2, done.stdout + done.stderr


def test_serve_refuses_an_unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "airlock.toml"
    config.write_text("[sandbox]\nnetwork_disabled = false\nprivileged = true\n")
    done = run_broker_cli("serve", "--config", str(config), "--listen", "127.0.0.1:0")
    assert done.returncode == 2 and "privileged" in done.stderr


@pytest.mark.parametrize("args", [
    ["serve", "--listen", "127.0.0.1:0"], ["token", "create", "--principal", "x", "--role",
                                          "admin"], ["keys", "export", "--json"],
])
def test_the_brokers_commands_say_where_they_are(args: list[str]) -> None:
    # The client never imports the broker: the old names exit 2 and name airlock-broker.
    done = run_cli(*args, server="127.0.0.1:1", timeout=60)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert f"airlock-broker {args[0]}" in done.stderr and "install airlock-broker" in done.stderr

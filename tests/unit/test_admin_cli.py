"""``airlock pool``, ``selftest``, ``keys`` and ``verify`` say what went wrong the way every
command does.

Found by review (each failed before): ``airlock pool drain --profile torch`` drained every
pool and exited 0 (the flag was read by restart alone), and with ``--json`` a broker that was
not there, or a usage error, printed nothing on stdout, where a script reads its object."""

from __future__ import annotations

import json

import pytest

from airlock_client.cli import main

NOWHERE = ["--server", "127.0.0.1:9"]


@pytest.mark.parametrize("action", ["drain", "resume", "status"])
def test_a_profile_is_refused_where_the_action_is_every_pools(
        action: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pool", action, "--profile", "torch", "--json", *NOWHERE]) == 2
    out = capsys.readouterr()
    doc = json.loads(out.out)  # refused before anything is asked of the broker
    assert (doc["ok"], doc["reason"]) == (False, "USAGE")
    assert f"{action} acts on every pool" in out.err


@pytest.mark.parametrize("argv", [["pool", "status"], ["pool", "restart", "--profile", "light"],
                                  ["selftest"]])
def test_an_unreachable_broker_is_one_json_object_and_exit_3(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--json", *NOWHERE]) == 3
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert (doc["ok"], doc["status"], doc["reason"]) == (False, "failed", "UNAVAILABLE")
    assert "Traceback" not in out.err and "UNAVAILABLE" in out.err


class _Publishing:
    """A broker's client that publishes ``pem``."""

    pem = ""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __enter__(self) -> _Publishing:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def provenance_key(self) -> object:
        from airlock_client._types import ProvenanceKey
        from airlock_client.provenance import fingerprint

        return ProvenanceKey(public_key_pem=self.pem, fingerprint=fingerprint(self.pem.encode()),
                             algorithm="ecdsa-p256-sha256")


def test_keys_fetch_says_why_it_cannot_write_and_never_replaces_another_pinned_key(
        tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """Found by review: ``-o`` naming a directory (or one that is not there) was a traceback
    with no ``--json`` object, and an existing file holding another key, one pinned by hand,
    was replaced by the key the broker publishes over the API (trust on first use)."""
    from airlock_broker.security.keys import create_key
    from airlock_client import _provenance_cli

    broker, pinned = (create_key(tmp_path / n / "key.pem") for n in ("broker", "pinned"))
    _Publishing.pem = broker.public_pem
    monkeypatch.setattr(_provenance_cli, "Client", _Publishing)

    def fetch(output: object) -> tuple[int, dict[str, object]]:
        code = main(["keys", "fetch", "-o", str(output), "--json", *NOWHERE])
        return code, json.loads(capsys.readouterr().out)

    for output in (tmp_path, tmp_path / "nowhere" / "key.pem"):
        code, doc = fetch(output)
        assert (code, doc["reason"]) == (2, "USAGE") and "cannot write the key" in str(doc)
    held = tmp_path / "airlock.pub.pem"
    held.write_text(pinned.public_pem)
    code, doc = fetch(held)
    assert (code, doc["reason"]) == (2, "USAGE") and "holds another public key" in str(doc)
    assert held.read_text() == pinned.public_pem
    held.write_text(broker.public_pem)  # the same key: fetched again, nothing to refuse
    assert fetch(held)[0] == 0 and held.read_text() == broker.public_pem


def test_verify_prints_its_json_object_on_a_usage_error(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert main(["verify", str(tmp_path / "nope.onnx"), "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert (doc["ok"], doc["reason"]) == (False, "USAGE") and "nope.onnx" in doc["message"]


@pytest.mark.parametrize("command", [["convert", "m.pkl"], ["migrate", "--all"]])
def test_a_longer_sandbox_timeout_lengthens_the_calls_deadline(command: list[str]) -> None:
    """Found by review: the client's 900 s deadline for a call held whatever ``--timeout``
    said, so a job given 1800 s ended DEADLINE_EXCEEDED at 900."""
    from airlock_client._cli_connection import client_options
    from airlock_client._types import CALL_SECONDS
    from airlock_client.cli import build_parser

    args = build_parser().parse_args([*command, "--timeout", "1800"])
    assert client_options(args)["timeout"] >= 2 * 1800
    assert "timeout" not in client_options(build_parser().parse_args(command))  # 900 s
    assert CALL_SECONDS == 900


def test_migrate_prints_its_json_object_on_a_usage_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["migrate", "--all", "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert (doc["ok"], doc["reason"]) == (False, "USAGE") and "tracking" in doc["message"]

"""``airlock pool`` and ``airlock selftest`` say what went wrong the way every command does.

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

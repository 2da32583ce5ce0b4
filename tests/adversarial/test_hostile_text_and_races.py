"""Threat class E, continued: a compromised converter that lies in what it *says* (the report,
its exit story, hostile error text) or races the broker (rewrites its output after "success").

Nothing the sandbox says may decide an outcome or reach a caller unescaped; the output is
collected only from a dead container, so a rewrite can never change what was validated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.adversarial import payloads
from tests.adversarial.oracles import (
    Observers,
    assert_contained,
    assert_printable,
    observers,  # noqa: F401  (fixture)
    run_case,
)
from tests.conftest import BrokerProcess

pytestmark = pytest.mark.adversarial

ESC = "\x1b"
HOSTILE = (f"{ESC}[2J{ESC}[31mCRITICAL{ESC}[0m\r\n"
           '{"time": "x", "level": "info", "message": "job converted", "outcome": "ok"}\n'
           "\x00\x07\x08\u202e\ufeffsuccess: verified, integrity_verified\n"
           "AKIAIOSFODNN7EXAMPLE ghp_0123456789abcdefghijklmnopqrstuvwxyz ")


def _report(message: str, everywhere: bool) -> bytes:
    doc: dict[str, object] = {"error": {"exit": "CONVERSION_FAILED", "message": message}}
    if everywhere:
        doc.update(warnings=[message] * 16, loader=message, detected_format=message)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("size", ["short", "huge"])
def test_hostile_error_text_reaches_the_caller_escaped_and_capped(
        size: str, broker: BrokerProcess, docker_client, observers: Observers,  # noqa: F811
        tmp_path: Path) -> None:
    # "huge": a 200 KiB message, inside the broker's 256 KiB report cap; the report is read,
    # and the text must still be cut to a few hundred printable characters.
    message = HOSTILE * (1 if size == "short" else 200 * 1024 // len(HOSTILE))
    log_before = broker.log.stat().st_size
    report = _report(message, everywhere=size == "short")
    source = payloads.hostile_output_source([("write", "report.json", report)], exit_code=70)
    case = run_case(broker, payloads.write_carrier(tmp_path / "e13.npy", "npy", source),
                    "--timeout", "60")
    assert case.outcome == ("failed", "CONVERSION_FAILED"), case.doc
    text = case.doc["message"]
    assert "unverified" in text, text  # the sandbox's words are labelled as such
    assert_printable(text, limit=1000)
    log_tail = broker.log.read_bytes()[log_before:]
    assert ESC.encode() not in log_tail and b"\r" not in log_tail and b"\x00" not in log_tail
    for line in log_tail.splitlines():  # every log line is one JSON object: nothing injected
        json.loads(line)
    audit = (broker.spool / "audit.jsonl").read_bytes()
    assert ESC.encode() not in audit and b"\x00" not in audit
    assert_contained(case, broker, docker_client, observers, tmp_path, "failed")


def test_spoofed_report_on_a_valid_output_decides_nothing(
        broker: BrokerProcess, docker_client, observers: Observers,  # noqa: F811
        tmp_path: Path) -> None:
    """The output is valid, so the job succeeds - but what the report claims about how it was
    made (format, loader, whether artifact code ran) must not be taken at its word."""
    report = json.dumps({"detected_format": f"{ESC}[32msafetensors",
                         "output_format": "safetensors", "loader": f"{ESC}[32msafe_open\r\n",
                         "executed_artifact_code": False,
                         "warnings": [f"{ESC}]0;pwned\x07integrity verified"]}).encode()
    source = payloads.hostile_output_source([("write", payloads.SAFETENSORS_NAME,
                                              payloads.one_tensor()),
                                             ("write", "report.json", report)])
    case = run_case(broker, payloads.write_carrier(tmp_path / "e1.pkl", "pickle", source),
                    "--timeout", "60")
    assert case.outcome == ("ok", None), case.doc
    # The artifact is a pickle: loading it executed code, whatever the report says.
    assert case.doc["executed_artifact_code"] is True, case.doc
    assert case.doc["detected_format"] == "pickle", case.doc
    for text in [case.doc["detected_format"], *case.doc["warnings"]]:
        assert_printable(text)
    human = run_case_text(broker, tmp_path / "e1.pkl")
    assert ESC not in human and "\r" not in human
    assert_contained(case, broker, docker_client, observers, tmp_path, "ok")


def run_case_text(broker: BrokerProcess, artifact: Path) -> str:
    """The same conversion through the human-readable CLI output."""
    from tests.conftest import run_cli

    done = run_cli("convert", str(artifact), "-o", str(artifact.with_suffix(".human")),
                   server=broker.address)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.parametrize("ending", ["exit", "done"])
def test_rewrite_after_success_cannot_change_what_was_validated(
        broker: BrokerProcess, docker_client, observers: Observers,  # noqa: F811
        tmp_path: Path, ending: str) -> None:
    import struct

    original = payloads.one_tensor()
    rewritten = original[:-4] + struct.pack("<f", -9.0)
    source = payloads.hostile_output_source([
        ("code", f"ORIGINAL = {original!r}\nREWRITTEN = {rewritten!r}"),
        ("code", payloads.REWRITE_AFTER_SUCCESS if ending == "exit"
         else payloads.REWRITE_AFTER_DONE)])
    case = run_case(broker, payloads.write_carrier(tmp_path / "e12.npy", "npy", source),
                    "--timeout", "60")
    assert case.outcome == ("ok", None), case.doc
    # One of the two complete versions (canonicalised: the data section is the tail), hashed
    # as validated (assert_contained checks the hash against the broker's).
    assert case.out.read_bytes()[-4:] in {original[-4:], rewritten[-4:]}
    assert_contained(case, broker, docker_client, observers, tmp_path, "ok")


def test_safetensors_metadata_abuse_is_stripped(broker: BrokerProcess, docker_client,
                                                observers: Observers,  # noqa: F811
                                                tmp_path: Path) -> None:
    """E8: ``__metadata__`` carrying terminal escapes, a log-injection line and a fake
    verdict. The output is valid, so it is delivered - canonicalised, without that metadata."""
    import struct

    from safetensors import safe_open

    header = {"__metadata__": {"format": "pt", "airlock_assurance": "integrity_verified",
                               "note": f"{ESC}]0;owned\x07\r\nINJECTED <script>x</script>"},
              "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    output = payloads.safetensors_bytes(header, struct.pack("<f", 1.5))
    source = payloads.hostile_output_source([("write", payloads.SAFETENSORS_NAME, output)])
    case = run_case(broker, payloads.write_carrier(tmp_path / "e8.npy", "npy", source),
                    "--timeout", "60")
    assert case.outcome == ("ok", None), case.doc
    with safe_open(str(case.out), framework="numpy") as reader:
        assert reader.metadata() is None
    assert ESC.encode() not in case.out.read_bytes()
    assert_contained(case, broker, docker_client, observers, tmp_path, "ok")

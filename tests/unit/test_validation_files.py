"""Collecting the output from a dead sandbox's out dir: one regular, single-link, bounded file,
never followed through a link and never blocking on a FIFO; the report is optional and untrusted."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.errors import AirlockError, Reason
from airlock_broker.validation import OutputLimits, collect_output, read_report
from airlock_broker.validation import files as files_module
from airlock_sandbox.contract import MAX_REPORT_BYTES, REPORT_NAME

NAME = "model.safetensors"
LIMITS = OutputLimits()
GUARD_SECONDS = 5.0


def finishes(call: Callable[[], Any]) -> Any:
    """Run ``call`` in a thread; fail (instead of hanging the suite) if it blocks."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed back to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(GUARD_SECONDS)
    assert not thread.is_alive(), "the call blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def refused(
    out_dir: Path, reason: Reason = Reason.OUTPUT_INVALID, limits: OutputLimits = LIMITS
) -> AirlockError:
    with pytest.raises(AirlockError) as caught:
        finishes(lambda: collect_output(out_dir, NAME, limits))
    assert caught.value.reason is reason, caught.value
    return caught.value


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


# --- the output -------------------------------------------------------------------------------


def test_single_regular_output_is_collected(out_dir: Path) -> None:
    (out_dir / NAME).write_bytes(b"payload")
    assert collect_output(out_dir, NAME, LIMITS) == out_dir / NAME


def test_output_with_report_beside_it_is_collected(out_dir: Path) -> None:
    (out_dir / NAME).write_bytes(b"payload")
    (out_dir / REPORT_NAME).write_text("{}")
    assert collect_output(out_dir, NAME, LIMITS) == out_dir / NAME


def test_symlinked_output_is_rejected(out_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"root:x:0:0")
    (out_dir / NAME).symlink_to(secret)
    assert "symlink" in refused(out_dir).message


def test_dangling_symlink_output_is_rejected(out_dir: Path) -> None:
    (out_dir / NAME).symlink_to("/nonexistent/target")
    refused(out_dir)


def test_hardlinked_output_is_rejected(out_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"payload")
    os.link(elsewhere, out_dir / NAME)
    assert "hard links" in refused(out_dir).message


def test_fifo_output_is_rejected_without_blocking(out_dir: Path) -> None:
    os.mkfifo(out_dir / NAME)
    assert "FIFO" in refused(out_dir).message


def test_fifo_swapped_in_after_lstat_does_not_block(
    out_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race O_NONBLOCK exists for: lstat saw a regular file, open meets a FIFO.
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"payload")
    os.mkfifo(out_dir / NAME)
    real_lstat = os.lstat
    monkeypatch.setattr(
        files_module.os, "lstat",
        lambda p, *a, **k: real_lstat(decoy) if Path(p).name == NAME else real_lstat(p, *a, **k),
    )  # fmt: skip
    refused(out_dir)


def test_output_replaced_between_lstat_and_open_is_rejected(
    out_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"payload")
    (out_dir / NAME).write_bytes(b"payload")
    real_lstat = os.lstat
    monkeypatch.setattr(
        files_module.os, "lstat",
        lambda p, *a, **k: real_lstat(decoy) if Path(p).name == NAME else real_lstat(p, *a, **k),
    )  # fmt: skip
    assert "replaced" in refused(out_dir).message


def test_socket_output_is_rejected(tmp_path: Path) -> None:
    # AF_UNIX paths are short: use a short directory.
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"al-{os.getpid()}"
    out_dir.mkdir()
    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(out_dir / NAME))
            assert "socket" in refused(out_dir).message
    finally:
        for child in out_dir.iterdir():
            child.unlink()
        out_dir.rmdir()


def test_directory_instead_of_file_is_rejected(out_dir: Path) -> None:
    (out_dir / NAME).mkdir()
    assert "directory" in refused(out_dir).message


def test_device_output_is_rejected(out_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    os.mknod(out_dir / NAME, 0o600 | 0o020000, os.makedev(1, 3))  # character device /dev/null
    assert "device" in refused(out_dir).message


def test_extra_file_beside_output_is_rejected(out_dir: Path) -> None:
    (out_dir / NAME).write_bytes(b"payload")
    (out_dir / "model.safetensors.index.json").write_text("{}")
    assert "unexpected" in refused(out_dir).message


def test_extra_directory_beside_output_is_rejected(out_dir: Path) -> None:
    (out_dir / NAME).write_bytes(b"payload")
    (out_dir / "...").mkdir()
    refused(out_dir)


def test_hostile_entry_name_is_escaped_in_the_message(out_dir: Path) -> None:
    (out_dir / NAME).write_bytes(b"payload")
    (out_dir / ("\x1b[2J" + "x" * 240)).write_bytes(b"")
    message = refused(out_dir).message
    assert "\x1b" not in message and len(message) < 200


def test_missing_output_is_rejected(out_dir: Path) -> None:
    (out_dir / REPORT_NAME).write_text("{}")
    assert "no output" in refused(out_dir).message


def test_empty_output_is_rejected(out_dir: Path) -> None:
    (out_dir / NAME).write_bytes(b"")
    assert "empty" in refused(out_dir).message


def test_oversized_output_is_too_large(out_dir: Path) -> None:
    with (out_dir / NAME).open("wb") as handle:
        handle.truncate(1025)
    refused(out_dir, Reason.OUTPUT_TOO_LARGE, OutputLimits(max_output_bytes=1024))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", REPORT_NAME])
def test_expected_name_must_be_a_plain_file_name(out_dir: Path, name: str) -> None:
    with pytest.raises(ValueError):
        collect_output(out_dir, name, LIMITS)


# --- the report -------------------------------------------------------------------------------


def test_well_formed_report_is_read(out_dir: Path) -> None:
    (out_dir / REPORT_NAME).write_text('{"loader": "torch", "parity": {"max_abs": 0.0}}')
    assert read_report(out_dir) == {"loader": "torch", "parity": {"max_abs": 0.0}}


def test_missing_report_is_none(out_dir: Path) -> None:
    assert read_report(out_dir) is None


def test_symlinked_report_is_none(
    out_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "s3cr3t"}')
    (out_dir / REPORT_NAME).symlink_to(secret)
    with caplog.at_level(logging.WARNING):
        assert read_report(out_dir) is None
    assert "ignoring report" in caplog.text


def test_hardlinked_report_is_none(out_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    os.link(elsewhere, out_dir / REPORT_NAME)
    assert read_report(out_dir) is None


def test_fifo_report_is_none_without_blocking(out_dir: Path) -> None:
    os.mkfifo(out_dir / REPORT_NAME)
    assert finishes(lambda: read_report(out_dir)) is None


def test_too_big_report_is_none(out_dir: Path) -> None:
    padding = " " * MAX_REPORT_BYTES
    (out_dir / REPORT_NAME).write_text("{}" + padding)
    assert read_report(out_dir) is None


def test_report_with_duplicate_keys_is_none(out_dir: Path) -> None:
    (out_dir / REPORT_NAME).write_text('{"status": "ok", "status": "failed"}')
    assert read_report(out_dir) is None


def test_report_with_nested_duplicate_keys_is_none(out_dir: Path) -> None:
    (out_dir / REPORT_NAME).write_text('{"parity": {"ok": true, "ok": false}}')
    assert read_report(out_dir) is None


@pytest.mark.parametrize(
    "text",
    [
        '{"x": NaN}',
        '{"x": Infinity}',
        "[1, 2]",
        '"just a string"',
        "{",
        "",
        '{"x": 1} trailing',
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_report_that_is_not_a_strict_json_object_is_none(out_dir: Path, text: str) -> None:
    (out_dir / REPORT_NAME).write_text(text)
    assert read_report(out_dir) is None


def test_report_with_invalid_utf8_is_none(out_dir: Path) -> None:
    (out_dir / REPORT_NAME).write_bytes(b'{"x": "\xff"}')
    assert read_report(out_dir) is None


def test_directory_report_is_none(out_dir: Path) -> None:
    (out_dir / REPORT_NAME).mkdir()
    assert read_report(out_dir) is None

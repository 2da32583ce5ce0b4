"""``airlock convert FILE FILE ...``: several files through ``Client.convert_many``, against
the real broker, engine and image (issue #15: bulk conversion from the command line)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from airlock_client import Client
from airlock_client.provenance import provenance_path
from tests.adversarial.payloads import fake_success_pickle, sleeper_pickle
from tests.conftest import AIRLOCK, CTRL_C_ABLE, BrokerProcess, free_port, run_cli
from tests.fixtures import models

pytestmark = pytest.mark.integration


def _pickles(tmp_path: Path, names: list[str]) -> list[Path]:
    made, _ = models.make_sklearn_pickle(tmp_path / "made")
    paths = []
    for name in names:
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made, path)
        paths.append(path)
    return paths


def test_several_files_convert_into_one_directory_and_a_bad_one_fails_alone(
        broker: BrokerProcess, tmp_path: Path) -> None:
    a, b, c = _pickles(tmp_path, ["a.pkl", "b.pkl", "c.pkl"])
    junk = tmp_path / "in" / "junk.bin"
    junk.write_bytes(b"\x00not a model at all\xff" * 64)
    out = tmp_path / "out"
    done = run_cli("convert", str(a), str(junk), str(b), str(c), "-o", str(out), "--jobs", "2",
                   "--json", server=broker.address)
    assert done.returncode == 1, done.stdout + done.stderr  # the junk's: rejected
    doc = json.loads(done.stdout)
    assert (doc["ok"], doc["converted"], doc["failed"], doc["not_started"]) == (False, 3, 1, 0)
    by_input = {f["input"]: f for f in doc["files"]}
    assert set(by_input) == {str(a), str(junk), str(b), str(c)}
    assert by_input[str(junk)]["status"] == "rejected"
    assert by_input[str(junk)]["reason"] == "UNSUPPORTED_FORMAT"
    # A failed file's object is the one `convert FILE --json` prints, plus its input.
    alone = run_cli("convert", str(junk), "--json", server=broker.address)
    assert set(by_input[str(junk)]) == set(json.loads(alone.stdout)) | {"input"}
    for source in (a, b, c):
        entry = by_input[str(source)]
        assert entry["ok"] and entry["format"] == "onnx", entry
        assert entry["output"] == str(out / f"{source.stem}.onnx")
        assert Path(entry["provenance"]) == provenance_path(Path(entry["output"]))
        assert Path(entry["provenance"]).is_file()
    # One line per file on stderr as it ended; nothing half-written left in the directory.
    assert done.stderr.count("airlock convert: ") == 4, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s.stem}.onnx" for s in (a, b, c)]
        + [provenance_path(out / f"{s.stem}.onnx").name for s in (a, b, c)])


def test_several_files_beside_their_inputs_say_what_they_did(broker: BrokerProcess,
                                                             tmp_path: Path) -> None:
    a, b = _pickles(tmp_path, ["a.pkl", "b.pkl"])
    done = run_cli("convert", str(a), str(b), server=broker.address)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (a.with_suffix(".onnx")).is_file() and (b.with_suffix(".onnx")).is_file()
    assert "2 of 2 converted, 0 failed" in done.stdout
    assert f"converted {a} -> {a.with_suffix('.onnx')} (onnx, " in done.stdout


def test_an_unreachable_broker_ends_the_batch_and_the_rest_is_not_started(
        tmp_path: Path) -> None:
    a, b, c = _pickles(tmp_path, ["a.pkl", "b.pkl", "c.pkl"])
    done = run_cli("convert", str(a), str(b), str(c), "--jobs", "1", "--json",
                   server=f"127.0.0.1:{free_port()}", timeout=180)
    assert done.returncode == 3, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert (doc["converted"], doc["failed"], doc["not_started"]) == (0, 1, 2)


@pytest.mark.parametrize(("layout", "expected"), [
    (["x/m.pkl", "y/m.pkl", "-o", "{out}"], "would both be written as"),
    (["x/m.pkl", "x"], "each must be a file"),
    (["x/m.pkl", "y/m.pkl", "--subject", "s"], "--subject names one input"),
    (["x/m.pkl", "y/n.pkl", "-o", "x/m.pkl"], "names a directory"),
    # The same file twice, spelled two ways: converted twice into one output before.
    (["x/m.pkl", "x/../x/m.pkl"], "are the same file"),
    # Both become x/a.converted.safetensors: one overwrote the other before.
    (["x/a.safetensors", "x/a.converted.pkl"], "would both be written as"),
    # -o under a file: a traceback before.
    (["x/m.pkl", "y/n.pkl", "-o", "x/m.pkl/out"], "cannot make it a directory"),
])
def test_several_inputs_that_cannot_go_together_are_a_usage_error(
        tmp_path: Path, layout: list[str], expected: str) -> None:
    for name in ("x/m.pkl", "y/m.pkl", "y/n.pkl", "x/a.safetensors", "x/a.converted.pkl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"never sent")
    args = [a.format(out=tmp_path / "out") if a.startswith("{") else
            (str(tmp_path / a) if "/" in a or a == "x" else a) for a in layout]
    done = run_cli("convert", *args, "--json", server="127.0.0.1:1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr
    assert json.loads(done.stdout)["reason"] == "USAGE"


def test_an_option_the_client_refuses_for_every_file_is_a_usage_error_once(
        tmp_path: Path) -> None:
    for name in ("a.pkl", "b.pkl"):
        (tmp_path / name).write_bytes(b"never sent")
    sample = tmp_path / "rows.npy"
    sample.write_bytes(b"\x93NUMPY" + b"\x00" * (2 * 1024 * 1024))  # over the 1 MiB cap
    done = run_cli("convert", str(tmp_path / "a.pkl"), str(tmp_path / "b.pkl"), "--jobs", "1",
                   "--sample-input", str(sample), "--json", server="127.0.0.1:1")
    assert done.returncode == 2, done.stdout + done.stderr
    doc = json.loads(done.stdout)  # refused before anything is sent (the broker is not there)
    assert (doc["status"], doc["reason"]) == ("usage", "USAGE")
    assert "parity sample" in doc["message"]


def test_an_address_the_client_cannot_use_is_a_usage_error(tmp_path: Path) -> None:
    a, b = _pickles(tmp_path, ["a.pkl", "b.pkl"])
    done = run_cli("convert", str(a), str(b), "--json", server="unix:")
    assert done.returncode == 2, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert (doc["status"], doc["reason"]) == ("usage", "USAGE")
    assert "absolute path" in doc["message"] and "Traceback" not in done.stderr


def test_a_file_that_cannot_be_put_in_place_fails_alone_and_keeps_its_conversion(
        broker: BrokerProcess, tmp_path: Path) -> None:
    a, b = _pickles(tmp_path, ["a.pkl", "b.pkl"])
    (tmp_path / "in" / "a.onnx").mkdir()  # a's final name is taken by a directory
    done = run_cli("convert", str(a), str(b), "--json", server=broker.address)
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    by_input = {f["input"]: f for f in doc["files"]}
    assert by_input[str(b)]["ok"] and Path(by_input[str(b)]["output"]).is_file()
    failed = by_input[str(a)]
    assert (failed["status"], failed["reason"]) == ("failed", "OUTPUT_NOT_PLACED"), failed
    [kept] = (tmp_path / "in").glob(".a.pkl.*.airlock-out")  # this run's temporary name
    assert kept.is_file() and str(kept) in failed["message"]  # the conversion is not lost


def test_one_file_that_cannot_be_put_in_place_says_so_and_keeps_its_conversion(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """The same for a file converted alone: its final name taken by a directory raised
    IsADirectoryError out of the CLI, a traceback and no JSON object."""
    [a] = _pickles(tmp_path, ["a.pkl"])
    (tmp_path / "in" / "a.onnx").mkdir()
    done = run_cli("convert", str(a), "--json", server=broker.address)
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert (doc["status"], doc["reason"]) == ("failed", "OUTPUT_NOT_PLACED"), doc
    [kept] = (tmp_path / "in").glob(".a.pkl.*.airlock-out")  # this run's temporary name
    assert kept.is_file() and str(kept) in doc["message"] and doc["job_id"]
    assert "Traceback" not in done.stderr


def test_a_second_ctrl_c_cancels_the_conversions_in_flight(broker: BrokerProcess,
                                                           tmp_path: Path) -> None:
    """The first Ctrl-C lets the conversions in flight finish; a second one does not wait for
    two that would sleep for 10 minutes: it cancels them (their sandboxes go) and removes
    their outputs. Fails on a client that waits for them (the process outlives the wait)."""
    sleepers = [sleeper_pickle(tmp_path / f"slow-{i}.pkl", seconds=600) for i in range(2)]
    out = tmp_path / "out"
    process = subprocess.Popen(
        [*CTRL_C_ABLE, AIRLOCK, "convert", *map(str, sleepers), "-o", str(out), "--jobs", "2",
         "--timeout", "600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "AIRLOCK_SERVER": broker.address})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")),
                              daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        with Client(broker.unix_address) as admin:  # the admin role (root on its socket)
            _until(lambda: sum(p.busy for p in admin.pool_status()) >= 2, 120,
                   "both sleepers running in their sandboxes",
                   lambda: f"pools: {admin.pool_status()}; stderr: {''.join(lines)}")
        process.send_signal(signal.SIGINT)
        _until(lambda: any("finish first" in line for line in lines), 60,
               "the first Ctrl-C's notice", lambda: "".join(lines))
        assert process.poll() is None  # the first Ctrl-C waits for them
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    said = "".join(lines)
    assert "cancelling the conversions in flight" in said, said
    assert "0 of 2 converted" in said, said
    assert list(out.iterdir()) == []  # no half-written output is left


def _until(probe: Callable[[], object], seconds: float, what: str,
           describe: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + seconds
    while not probe():
        assert time.monotonic() < deadline, f"timed out after {seconds:g} s waiting for " \
                                            f"{what}. {describe()}"
        time.sleep(0.2)


def test_ctrl_c_lets_the_conversions_in_flight_finish_and_keeps_them(broker: BrokerProcess,
                                                                    tmp_path: Path) -> None:
    """Two of three files converting (each ~15 s) when Ctrl-C comes: both finish and are
    kept, with their provenance; the third never starts; exit 130. Fails on a client that
    waits for them but drops their outcomes (their outputs were removed)."""
    inputs = [fake_success_pickle(tmp_path / f"{name}.pkl", sleep_seconds=15)
              for name in ("a", "b", "c")]
    out = tmp_path / "out"
    process = subprocess.Popen(
        [*CTRL_C_ABLE, AIRLOCK, "convert", *map(str, inputs), "-o", str(out), "--jobs", "2",
         "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "AIRLOCK_SERVER": broker.address})
    try:
        with Client(broker.unix_address) as admin:  # the admin role (root on its socket)
            _until(lambda: sum(p.busy for p in admin.pool_status()) >= 2, 120,
                   "two conversions in their sandboxes")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stdout + stderr
    assert "finish first" in stderr, stderr
    doc = json.loads(stdout)
    assert (doc["status"], doc["converted"], doc["failed"], doc["not_started"]) == (
        "interrupted", 2, 0, 1), doc
    kept = sorted(p.name for p in out.iterdir())
    assert kept == sorted(["a.safetensors", "b.safetensors",
                           provenance_path(out / "a.safetensors").name,
                           provenance_path(out / "b.safetensors").name]), kept

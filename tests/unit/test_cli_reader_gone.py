"""``airlock ... | head``: a reader of the command's output that leaves before it is written
ends the command quietly, with 141 (what a shell reports for a command SIGPIPE ended), not a
BrokenPipeError traceback; whatever the command did is done."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def _to_a_reader_gone(*args: str) -> subprocess.CompletedProcess[str]:
    read, write = os.pipe()
    os.close(read)  # the reader left: every write to the pipe fails (EPIPE)
    try:
        return subprocess.run([sys.executable, "-m", "airlock_client.cli", *args],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                              check=False)
    finally:
        os.close(write)


def _quiet(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_a_commands_report_to_a_reader_gone_ends_quietly(tmp_path: Path) -> None:
    """A command that ran and returned (here: verify, whose JSON says what failed: the file
    has no record)."""
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    key = tmp_path / "key.pem"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    done = _to_a_reader_gone("verify", str(tmp_path / "model.safetensors"), "--json",
                             "--public-key", str(key))
    _quiet(done)


def test_a_broken_pipe_that_is_not_stdouts_is_not_hidden() -> None:
    """Another pipe or socket failing (an output FIFO whose reader left, a peer gone) is an
    error of the command, reported as such; stdout's reader is still there."""
    code = ("import sys\nfrom airlock_client import cli\n"
            "def run(argv):\n    raise BrokenPipeError(32, 'a socket of the command')\n"
            "cli._run = run\nsys.exit(cli.main([]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 1 and "a socket of the command" in done.stderr, done

"""``airlock verify DIR`` refuses, before checking any signature, a directory it cannot
vouch for: no weights, weights without a record, anything but regular files. (What it
accepts, and a shard swapped in from another conversion: tests/integration/
test_model_directories.py, with the broker's real records.)"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from airlock_broker.api.auth import Principal
from airlock_broker.api.provenance import sign, statement
from airlock_broker.security.keys import SigningKey, create_key
from airlock_client import cli
from airlock_client.provenance import SUFFIX, ProvenanceError
from airlock_client.verify_dir import verify_directory
from airlock_sandbox.contract import LoadingPolicy, OutputFormat, Target
from airlock_sandbox.formats import ArtifactFormat
from airlock_sandbox.policy import SandboxPolicy

KEY = ec.generate_private_key(ec.SECP256R1()).public_key()


@pytest.mark.parametrize(("files", "link", "reason", "words"), [
    ({}, None, "PROVENANCE_MISSING", "holds no model.safetensors"),
    ({"config.json": "{}"}, None, "PROVENANCE_MISSING", "holds no model.safetensors"),
    ({"model.safetensors": "x"}, None, "PROVENANCE_MISSING", "has no signed record"),
    ({"adapter_model.safetensors": "x"}, None, "PROVENANCE_MISSING", "has no signed record"),
    ({"model.safetensors.index.json": "{}"}, None, "PROVENANCE_MISSING",
     "has no signed record"),
    ({"model.safetensors": "x"}, "config.json", "UNEXPECTED_FILE", "not a regular file"),
    ({"model.safetensors": "x", "adapter_model.safetensors": "y"}, None, "UNEXPECTED_FILE",
     "no conversion writes both"),
])
def test_what_cannot_be_vouched_for_is_refused(tmp_path: Path, files: dict[str, str],
                                               link: str | None, reason: str,
                                               words: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if link is not None:
        (tmp_path / link).symlink_to("/etc/passwd")
    with pytest.raises(ProvenanceError, match=words) as caught:
        verify_directory(tmp_path, KEY)
    assert caught.value.reason == reason


def _signed(key: SigningKey, path: Path, data: bytes, *, subject: str, principal: Principal,
            declared: str = "", given: bytes | None = None,
            report: dict[str, Any] | None = None) -> None:
    """``data`` at ``path`` with a record the broker would sign: a safetensors conversion's,
    or (``declared``) a carried data file's of that kind; ``given``: the input it records,
    when not ``data`` itself; ``report``: what its sandbox said."""
    from airlock_broker.conversion.jobs import JobRequest, JobResult
    from airlock_broker.conversion.outputs import ValidatedOutput
    from airlock_broker.sandboxes.sandbox import Outcome

    fmt = OutputFormat.DATA if declared else OutputFormat.SAFETENSORS
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    source = data if given is None else given
    result = JobResult(
        job_id=f"job-{path.name}", input_sha256=hashlib.sha256(source).hexdigest(),
        input_size=len(source),
        detected_format=ArtifactFormat(declared) if declared else ArtifactFormat.PYTORCH_ZIP,
        output=ValidatedOutput(format=fmt, size=len(data), sha256=digest, path=path,
                               write_into=lambda fd: None),
        outcome=Outcome(exit_code=0, oom_killed=False, timed_out=False, duration_seconds=0.1,
                        image_id="sha256:" + "ab" * 32, runtime="runc"),
        policy=LoadingPolicy.SAFE_ONLY, report=report or {})
    request = JobRequest(job_id=result.job_id, declared_format=declared,
                         target=Target.DATA if declared else Target.SAFETENSORS,
                         subject=subject)
    record = sign(statement(result, request, SandboxPolicy(), principal=principal), key)
    (path.parent / (path.name + SUFFIX)).write_bytes(record)


def test_a_data_file_asked_for_by_another_caller_is_refused(tmp_path: Path) -> None:
    """A subject is the caller's word: another caller can have a config.json signed as part
    of this very directory. One directory is one caller's conversion: its data files must
    have been asked for by whoever asked for its weights."""
    key = create_key(tmp_path / "key.pem")
    alice = Principal("alice", "token", frozenset())
    mallory = Principal("mallory", "token", frozenset())
    out = tmp_path / "out"
    out.mkdir()
    _signed(key, out / "model.safetensors", b"weights", subject="/src/pytorch_model.bin",
            principal=alice)
    _signed(key, out / "config.json", b'{"auto_map": {"AutoModel": "evil.Model"}}',
            subject="/src/config.json", principal=mallory, declared="json")
    with pytest.raises(ProvenanceError, match="another caller's data file") as caught:
        verify_directory(out, key.public_pem.encode())
    assert caught.value.reason == "OUTPUT_MISMATCH"
    _signed(key, out / "config.json", b'{"model_type": "llama"}', subject="/src/config.json",
            principal=alice, declared="json")
    checked = verify_directory(out, key.public_pem.encode())
    assert [name for name, _ in checked.carried] == ["config.json"]


def test_a_carried_file_whose_record_says_it_changed_is_refused(tmp_path: Path) -> None:
    """A data file is carried unchanged: a record whose output is not its input (which the
    broker never signs) is not taken on the broker's word."""
    key = create_key(tmp_path / "key.pem")
    alice = Principal("alice", "token", frozenset())
    out = tmp_path / "out"
    out.mkdir()
    _signed(key, out / "model.safetensors", b"weights", subject="/src/pytorch_model.bin",
            principal=alice)
    _signed(key, out / "config.json", b'{"model_type": "llama"}', subject="/src/config.json",
            principal=alice, declared="json", given=b'{"model_type": "gpt2"}')
    with pytest.raises(ProvenanceError, match="differ from the bytes given") as caught:
        verify_directory(out, key.public_pem.encode())
    assert caught.value.reason == "OUTPUT_MISMATCH"


def test_a_file_of_another_size_is_refused_before_a_byte_is_hashed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weights file swapped for a sparse TiB took an hour of hashing to refuse."""
    import airlock_client.provenance as provenance

    key = create_key(tmp_path / "key.pem")
    out = tmp_path / "out"
    out.mkdir()
    _signed(key, out / "model.safetensors", b"weights", subject="/src/pytorch_model.bin",
            principal=Principal("alice", "token", frozenset()))
    os.truncate(out / "model.safetensors", 1 << 40)
    import airlock_client.verify_dir as verify_dir

    hashed: list[object] = []
    for module in (provenance, verify_dir):  # wherever a hash would be taken
        monkeypatch.setattr(module, "digest_of", lambda *a, **k: hashed.append(a),
                            raising=False)
    with pytest.raises(ProvenanceError, match="1099511627776 bytes") as caught:
        verify_directory(out, key.public_pem.encode())
    assert caught.value.reason == "OUTPUT_MISMATCH" and hashed == []
    with pytest.raises(ProvenanceError, match="1099511627776 bytes"):
        provenance.verify(out / "model.safetensors",
                          (out / ("model.safetensors" + SUFFIX)).read_bytes(),
                          key.public_pem.encode())
    assert hashed == []


def test_verifying_a_fifo_put_at_a_files_name_does_not_wait_for_a_writer(
        tmp_path: Path) -> None:
    """``provenance.verify(path, ...)`` opened the path as it was: a FIFO there blocked it
    for ever, and a link to /dev/zero read for ever."""
    import threading

    import airlock_client.provenance as provenance

    key = create_key(tmp_path / "key.pem")
    _signed(key, tmp_path / "model.safetensors", b"weights", subject="/src/x.bin",
            principal=Principal("alice", "token", frozenset()))
    envelope = (tmp_path / ("model.safetensors" + SUFFIX)).read_bytes()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    outcomes: list[str] = []

    def check(name: str) -> None:
        try:
            provenance.verify(tmp_path / name, envelope, key.public_pem.encode())
        except ProvenanceError as exc:
            outcomes.append(exc.reason)

    for name in ("fifo", "zero"):
        thread = threading.Thread(target=check, args=(name,), daemon=True)
        thread.start()
        thread.join(60)
    assert outcomes == ["UNEXPECTED_FILE", "UNEXPECTED_FILE"], outcomes


def test_a_data_file_of_a_short_subject_does_not_match_a_clipped_directory(
        tmp_path: Path) -> None:
    """A subject clipped at the front is compared on what both still hold; a data file whose
    subject was never clipped matched any directory whose clipped subject ended like it."""
    key = create_key(tmp_path / "key.pem")
    alice = Principal("alice", "token", frozenset())
    out = tmp_path / "out"
    out.mkdir()
    long_dir = "/" + "a" * 1100
    _signed(key, out / "model.safetensors", b"weights",
            subject=f"{long_dir}/pytorch_model.bin", principal=alice)
    _signed(key, out / "config.json", b'{"auto_map": {"AutoModel": "evil.Model"}}',
            subject="a/config.json", principal=alice, declared="json")
    with pytest.raises(ProvenanceError, match="another directory"):
        verify_directory(out, key.public_pem.encode())
    _signed(key, out / "config.json", b'{"model_type": "llama"}',
            subject=f"{long_dir}/config.json", principal=alice, declared="json")
    assert [n for n, _ in verify_directory(out, key.public_pem.encode()).carried] == \
        ["config.json"]


def test_a_directory_of_more_entries_than_any_output_is_read_no_further(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``verify DIR`` is for directories someone else made: one of millions of empty files
    was listed whole into memory (and each stat-ed) before anything was judged (tenth
    review)."""
    from airlock_client import verify_dir

    (tmp_path / "model.safetensors").write_text("x")
    real = os.scandir
    with real(tmp_path) as scan:
        entry = next(iter(scan))
    pulled = [0]

    class Endless:
        def __iter__(self):  # type: ignore[no-untyped-def]
            for _ in range(200_000):
                pulled[0] += 1
                yield entry

        def __enter__(self) -> Endless:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def scandir(path: int | str | os.PathLike[str]) -> object:
        if isinstance(path, int):  # verify_dir lists the directory through a descriptor
            return Endless()
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ProvenanceError, match="more than") as caught:
        verify_directory(tmp_path, KEY)
    assert caught.value.reason == "UNEXPECTED_FILE"
    assert pulled[0] == verify_dir.MAX_ENTRIES + 1


def test_verifying_a_directory_shows_the_warnings_its_records_sign(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Record version 5 signs the sandbox's warnings ("parity ran on generated rows only",
    what a checkpoint left out), and ``verify FILE`` prints them: ``verify DIR`` said only
    "verified" and each file's assurance."""
    key = create_key(tmp_path / "key.pem")
    (tmp_path / "pub.pem").write_text(key.public_pem)
    model = tmp_path / "model"
    model.mkdir()
    _signed(key, model / "model.safetensors", b"weights", subject="/m/model.bin",
            principal=Principal("alice", "token", frozenset()),
            report={"warnings": ["left out: optimizer \x1b[2J"]})
    assert cli.main(["verify", str(model), "--public-key", str(tmp_path / "pub.pem")]) == 0
    shown = capsys.readouterr().out
    assert "model.safetensors: warning left out: optimizer ?[2J" in " ".join(shown.split())

"""An output hashed while its sandbox writes it (conversion/output_tail.py).

The broker signs the digest it took while the file grew, so that digest must be of the bytes
it then delivers: the sandbox must not be able to change a byte once hashed. The kernel
guarantees it for an append-only file (workspace.append_only_output); here a process with
the sandbox's uid tries every way to rewrite, truncate, map, replace or unmark the file,
including between the hash and the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock_broker.conversion.output_tail import Followed, OutputTail
from airlock_broker.conversion.outputs import ValidatedOutput
from airlock_broker.sandboxes.workspace import JobWorkspace
from airlock_broker.validation.limits import OutputLimits
from airlock_broker.validation.safetensors_canonical import canonical_header_bytes
from airlock_broker.validation.safetensors_check import validate_safetensors
from airlock_sandbox.contract import OUTPUT_NAMES, OutputFormat

NAME = OUTPUT_NAMES[OutputFormat.SAFETENSORS]
UID = 10001
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="a tmpfs mount, an append-only "
                               "file and a second uid need root (CI runs as root)")

#: Run as the sandbox's uid: what a sandbox can do to its output file.
_SANDBOX = r"""
import errno, fcntl, json, mmap, os, sys
where, name, step = int(sys.argv[1]), sys.argv[2], sys.argv[3]  # the output directory's fd
tried = {}
def attempt(what, action):
    try:
        action()
        tried[what] = "done"
    except OSError as exc:
        tried[what] = errno.errorcode[exc.errno]
if step == "first":
    fd = os.open(name, os.O_WRONLY | os.O_APPEND, dir_fd=where)
    os.write(fd, b"A" * (3 * 1024 * 1024))
    os.close(fd)
else:  # after the broker hashed the first part: try to change it, then append the rest
    def rewrite():
        fd = os.open(name, os.O_WRONLY, dir_fd=where)
        os.pwrite(fd, b"Z" * 16, 0)
    attempt("rewrite", rewrite)
    fd = os.open(name, os.O_RDWR | os.O_APPEND, dir_fd=where)
    os.pwrite(fd, b"B" * 16, 0)  # on an O_APPEND descriptor: appended at the end
    attempt("map", lambda: mmap.mmap(fd, 16))
    attempt("truncate", lambda: os.ftruncate(fd, 0))
    attempt("unlink", lambda: os.unlink(name, dir_fd=where))
    attempt("rename", lambda: os.rename(name, "old", src_dir_fd=where, dst_dir_fd=where))
    os.close(os.open("new", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=where))
    attempt("replace", lambda: os.replace("new", name, src_dir_fd=where, dst_dir_fd=where))
    attempt("unmark", lambda: fcntl.ioctl(fd, 0x40086602, b"\0\0\0\0"))
    os.write(fd, b"C" * 1024)
    print(json.dumps(tried))
"""


#: The system's interpreter (stdlib only): the test's own may sit where that uid cannot read.
_PYTHON = "/usr/bin/python3"


def _as_sandbox(out_dir: Path, step: str) -> dict[str, str]:
    """The script above as the sandbox's uid, given the output directory by descriptor (the
    test's temporary directory is root's alone, as the spool is)."""
    where = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        done = subprocess.run([_PYTHON, "-c", _SANDBOX, str(where), NAME, step], user=UID,
                              group=UID, pass_fds=(where,), capture_output=True, text=True,
                              timeout=120, check=True)
    finally:
        os.close(where)
    return json.loads(done.stdout) if done.stdout.strip() else {}


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[JobWorkspace]:
    ws = JobWorkspace.create(tmp_path, uuid.uuid4().hex, uid=UID, gid=UID,
                             output_bytes=64 * 1024 * 1024)
    try:
        yield ws
    finally:
        ws.destroy()


def _wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@ROOT_ONLY
def test_the_digest_taken_while_the_sandbox_wrote_is_of_the_file_as_it_stays(
        workspace: JobWorkspace) -> None:
    """Whatever the sandbox tries once the broker has hashed a part, the file it leaves is
    the file hashed: every byte below the size the broker saw stays. Without the mark
    (a plain file), the rewrite succeeds and the digest is of bytes no longer there."""
    fd = workspace.append_only_output(NAME)
    assert fd is not None
    path = workspace.out_dir / NAME
    st = path.stat()
    assert (st.st_uid, st.st_size, st.st_mode & 0o777) == (UID, 0, 0o600)

    async def follow() -> tuple[Followed | None, dict[str, str]]:
        tail = OutputTail(fd, cap=64 * 1024 * 1024)
        tail.start()
        try:
            await asyncio.to_thread(_as_sandbox, workspace.out_dir, "first")
            await asyncio.to_thread(_wait_for, lambda: tail.hashed >= 3 * 1024 * 1024,
                                    "the first part hashed")
            tried = await asyncio.to_thread(_as_sandbox, workspace.out_dir, "then")
            return await tail.finish(), tried
        finally:
            await tail.close()

    followed, tried = asyncio.run(follow())
    data = path.read_bytes()
    assert data == b"A" * (3 * 1024 * 1024) + b"B" * 16 + b"C" * 1024
    assert followed is not None
    assert followed.size == len(data)
    assert followed.sha256 == hashlib.sha256(data).hexdigest()
    assert tried == {"rewrite": "EPERM", "map": "EACCES", "truncate": "EPERM",
                     "unlink": "EPERM", "rename": "EPERM", "replace": "EPERM",
                     "unmark": "EPERM"}


@ROOT_ONLY
def test_no_file_is_made_over_one_there(workspace: JobWorkspace) -> None:
    """A name already taken (a link, a file) is left alone: no output to follow."""
    (workspace.out_dir / "planted").symlink_to("/etc/passwd")
    assert workspace.append_only_output("planted") is None
    assert os.readlink(workspace.out_dir / "planted") == "/etc/passwd"
    first = workspace.append_only_output(NAME)
    assert first is not None
    os.close(first)
    assert workspace.append_only_output(NAME) is None


@ROOT_ONLY
def test_a_file_opened_for_writing_before_its_mark_is_not_followed(
        workspace: JobWorkspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel checks the mark when a file is opened, not when it is written: a
    descriptor opened in between could rewrite hashed bytes. The broker then follows nothing
    and takes the file away (the job writes its own, hashed once whole)."""
    from airlock_broker.sandboxes import workspace as module

    real = module._set_append_only
    early: list[int] = []

    def racing(fd: int, on: bool) -> bool:
        if on:  # a writer that got in between the file's making and its mark
            early.append(os.open(f"/proc/self/fd/{fd}", os.O_WRONLY))
        return real(fd, on)

    monkeypatch.setattr(module, "_set_append_only", racing)
    try:
        assert workspace.append_only_output(NAME) is None
        assert early and not (workspace.out_dir / NAME).exists()
    finally:
        for fd in early:
            os.close(fd)


@ROOT_ONLY
def test_the_readings_own_writer_is_followed_to_the_answers_digest(
        workspace: JobWorkspace, tmp_path: Path) -> None:
    """The worker's in-place writer (JobSpec.output_in_place) into the broker's append-only
    file, as root (whom the mark binds too): written through O_APPEND, canonical, and the
    digest taken while it was written is the answer's."""
    from airlock_sandbox.contract import ARTIFACT_NAME, JobMode, JobSpec
    from airlock_sandbox.formats import ArtifactFormat
    from airlock_worker import job as worker_job
    from airlock_worker.report import Report
    from tests.fixtures import models

    artifact, _check = models.make_state_dict(tmp_path)
    os.link(artifact, workspace.in_dir / ARTIFACT_NAME)
    fd = workspace.append_only_output(NAME)
    assert fd is not None
    spec = JobSpec(job_id="t", artifact_format=ArtifactFormat.ZIP,
                   mode=JobMode.EXTRACT_WEIGHTS, output_in_place=True)

    async def convert() -> tuple[ValidatedOutput, bool]:
        tail = OutputTail(fd, cap=64 * 1024 * 1024)
        tail.start()
        try:
            await asyncio.to_thread(worker_job.run, spec, str(workspace.in_dir),
                                    str(workspace.out_dir), Report())
            return await tail.digest_of(_validated(workspace.out_dir / NAME),
                                        await tail.finish())
        finally:
            await tail.close()

    output, while_written = asyncio.run(convert())
    assert while_written
    assert output.sha256 == hashlib.sha256((workspace.out_dir / NAME).read_bytes()).hexdigest()
    assert sorted(os.listdir(workspace.out_dir)) == [NAME]  # no other name was written


def test_a_file_past_the_cap_is_not_followed_on(tmp_path: Path) -> None:
    path = tmp_path / NAME
    path.write_bytes(b"x" * (2 * 1024 * 1024 + 1))

    async def follow() -> Followed | None:
        tail = OutputTail(os.open(path, os.O_RDONLY), cap=2 * 1024 * 1024)
        tail.start()
        try:
            return await tail.finish()
        finally:
            await tail.close()
            await tail.close()  # idempotent

    assert asyncio.run(follow()) is None


def _safetensors(path: Path, *, canonical: bool) -> bytes:
    """Two tensors; the header canonical, or the same JSON with its keys in another order."""
    tensors = {"b": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
               "a": {"dtype": "U8", "shape": [3], "data_offsets": [4, 7]}}
    header = canonical_header_bytes(tensors, None)
    if not canonical:
        body = json.dumps(tensors, separators=(",", ":")).encode()
        body += b" " * (-len(body) % 8)
        header = struct.pack("<Q", len(body)) + body
    path.write_bytes(header + b"bbbbaaa")
    return header


def _validated(path: Path) -> ValidatedOutput:
    info = validate_safetensors(path, OutputLimits(), digest=False)
    return ValidatedOutput(format=OutputFormat.SAFETENSORS, size=info.canonical_size,
                           sha256="", path=path, write_into=lambda fd: None, safetensors=info)


@pytest.mark.parametrize("canonical", [True, False])
def test_the_digest_taken_while_written_is_the_answers_only_for_a_canonical_file(
        tmp_path: Path, canonical: bool) -> None:
    """The answer is the canonical file: a file written another way is hashed again, in
    canonical form; so is another file than the one followed."""
    path = tmp_path / NAME
    header = _safetensors(path, canonical=canonical)
    canonical_bytes = canonical_header_bytes(
        json.loads(header[8:]), None) + path.read_bytes()[len(header):]

    async def digest(followed_path: Path) -> tuple[ValidatedOutput, bool]:
        output = _validated(path)
        tail = OutputTail(os.open(followed_path, os.O_RDONLY), cap=1024)
        tail.start()
        try:
            return await tail.digest_of(output, await tail.finish())
        finally:
            await tail.close()

    output, while_written = asyncio.run(digest(path))
    assert while_written is canonical
    assert output.sha256 == hashlib.sha256(canonical_bytes).hexdigest()
    other = tmp_path / "other"
    other.write_bytes(path.read_bytes())
    output, while_written = asyncio.run(digest(other))
    assert not while_written
    assert output.sha256 == hashlib.sha256(canonical_bytes).hexdigest()


def test_no_followed_digest_is_taken_for_a_file_that_changed_size(tmp_path: Path) -> None:
    path = tmp_path / NAME
    _safetensors(path, canonical=True)
    output = _validated(path)
    tail = OutputTail(os.open(path, os.O_RDONLY), cap=1024)
    st = path.stat()
    grown = Followed(st.st_size + 1, "0" * 64, st.st_dev, st.st_ino)

    async def digest() -> tuple[ValidatedOutput, bool]:
        try:
            return await tail.digest_of(output, grown)
        finally:
            await tail.close()

    output, while_written = asyncio.run(digest())
    assert not while_written and output.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_which_output_a_sandbox_left_is_decided_without_following_its_links(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link the sandbox left as ``model.onnx`` is an entry (then refused as not a regular
    file), never followed on the host as root: its target could be anywhere, or hang."""
    from airlock_broker.conversion.outputs import expected_format
    from airlock_sandbox.contract import Target

    (tmp_path / OUTPUT_NAMES[OutputFormat.ONNX]).symlink_to("/etc/shadow")
    real_stat = os.stat

    def stat(path: object, *args: object, follow_symlinks: bool = True, **kwargs: object
             ) -> os.stat_result:
        assert not (follow_symlinks and str(path).startswith(str(tmp_path))), path
        return real_stat(path, *args, follow_symlinks=follow_symlinks, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat)
    assert expected_format(tmp_path, Target.AUTO) is OutputFormat.ONNX


def test_a_tail_whose_thread_cannot_start_follows_nothing_and_closes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of threads, the tail's future was never settled: its job's cleanup waited on it
    for ever, holding the job's place and slot."""
    import threading

    path = tmp_path / NAME
    path.write_bytes(b"x")

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    async def follow() -> Followed | None:
        tail = OutputTail(os.open(path, os.O_RDONLY), cap=1024)
        monkeypatch.setattr(threading.Thread, "start", refuse)
        tail.start()
        monkeypatch.undo()
        try:
            return await asyncio.wait_for(tail.finish(), 30)
        finally:
            await asyncio.wait_for(tail.close(), 30)

    assert asyncio.run(follow()) is None

"""Per-job directories on the host: a private spool for the input, a tmpfs for the output.

Layout under the spool root (0700, owned by the broker)::

    <root>/uploads/<job_id>     0600, the artifact while it streams in (``new_upload``)
    <root>/results/<job_id>     0600, a validated output being answered or kept for retries
    <root>/slots/<slot_id>/     0700, one per container (``JobWorkspace``)
        in/                     0755, bind-mounted read-only at contract.IN_DIR
            artifact            0400, owned by the sandbox uid
            job.json            0444, written last, by rename
        out/                    a tmpfs: size-capped, noexec,nosuid,nodev, owned by the sandbox
                                uid, bind-mounted at contract.OUT_DIR

The output is a tmpfs mounted by the broker (not a Docker tmpfs) so that it survives the
container: the broker reads it after the container is dead, then unmounts it. A size cap on a
plain directory is not possible, and ``docker cp`` out of a sandbox is exactly what DESIGN
§1.2 forbids.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from airlock_sandbox.contract import ARTIFACT_NAME, JOB_SPEC_NAME, JobSpec

log = logging.getLogger(__name__)

_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class WorkspaceError(RuntimeError):
    """The host could not prepare a job directory (infrastructure, not the artifact)."""


@dataclass(frozen=True)
class JobWorkspace:
    """The host directories of one job. Owned by exactly one job; ``destroy`` removes it."""

    root: Path
    uid: int
    gid: int

    @property
    def in_dir(self) -> Path:
        return self.root / "in"

    @property
    def out_dir(self) -> Path:
        return self.root / "out"

    @property
    def artifact(self) -> Path:
        return self.in_dir / ARTIFACT_NAME

    @classmethod
    def create(cls, spool_root: Path, slot_id: str, *, uid: int, gid: int,
               output_bytes: int) -> JobWorkspace:
        """Make the directories and mount the output tmpfs. Cleans up after itself on failure."""
        root = _private_dir(spool_root, "slots") / slot_id
        root.mkdir(mode=0o700)
        ws = cls(root=root, uid=uid, gid=gid)
        try:
            ws.in_dir.mkdir(mode=0o755)
            ws.out_dir.mkdir(mode=0o700)
            _mount_tmpfs(ws.out_dir, output_bytes, uid, gid)
        except BaseException:
            ws.destroy()
            raise
        return ws

    def adopt_artifact(self, upload: Path) -> None:
        """Move a finished upload in (same filesystem: a rename) and hand it to the sandbox user."""
        os.rename(upload, self.artifact)
        if os.geteuid() == 0:
            os.chown(self.artifact, self.uid, self.gid, follow_symlinks=False)
            os.chmod(self.artifact, 0o400)
        else:  # a non-root broker cannot chown; world-readable inside a 0700 tree
            os.chmod(self.artifact, 0o444)

    def link_artifact(self, source: Path) -> None:
        """The same artifact for a second sandbox: a hard link (read-only mounts in both)."""
        os.link(source, self.artifact, follow_symlinks=False)

    def write_job_spec(self, spec: JobSpec) -> None:
        """Written last and atomically: a warm worker starts the moment it appears."""
        tmp = self.in_dir / f".{JOB_SPEC_NAME}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
        try:
            os.write(fd, spec.to_json())
        finally:
            os.close(fd)
        os.rename(tmp, self.in_dir / JOB_SPEC_NAME)

    def destroy(self) -> None:
        """Unmount and delete everything. Logs instead of raising: it runs in ``finally``."""
        if _is_mountpoint(self.out_dir):
            rc = _libc.umount2(os.fsencode(self.out_dir), _MNT_DETACH)
            if rc != 0:
                log.error("umount %s failed: %s", self.out_dir, os.strerror(ctypes.get_errno()))
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            log.error("could not remove job directory %s", self.root)


def new_upload(spool_root: Path, job_id: str) -> tuple[Path, int]:
    """A new, exclusive, private file for an incoming artifact: (path, fd opened for writing)."""
    path = _private_dir(spool_root, "uploads") / job_id
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return path, fd


def results_dir(spool_root: Path) -> Path:
    """Validated outputs: answers on their way (answers.py), then the idempotency store's."""
    return _private_dir(spool_root, "results")


def remove_quietly(path: Path) -> None:
    """``unlink`` for ``finally`` blocks: a file already moved or removed is fine."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def reap_stale(spool_root: Path) -> int:
    """Remove uploads, slots and kept results left by a broker that died (SIGKILL, power loss).

    Returns how many were removed.

    Only for a spool root that no live broker uses: call it at start-up, before serving.
    """
    count = 0
    for sub in ("uploads", "slots", "results"):
        base = spool_root / sub
        if not base.is_dir():
            continue
        for entry in base.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                JobWorkspace(root=entry, uid=-1, gid=-1).destroy()
            else:
                remove_quietly(entry)
            count += 1
    return count


def _private_dir(spool_root: Path, name: str) -> Path:
    path = spool_root / name
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(spool_root, 0o700)
    os.chmod(path, 0o700)
    return path


def _mount_tmpfs(target: Path, size: int, uid: int, gid: int) -> None:
    opts = f"size={size},nr_inodes=64,mode=0700,uid={uid},gid={gid}"
    rc = _libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs",
                     _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, opts.encode())
    if rc != 0:
        err = os.strerror(ctypes.get_errno())
        raise WorkspaceError(
            f"cannot mount the job's output tmpfs at {target}: {err} "
            "(the broker must run as root to give each sandbox a size-capped output)")


def _is_mountpoint(path: Path) -> bool:
    with contextlib.suppress(OSError):
        target = os.fsencode(path.resolve())
        with open("/proc/self/mountinfo", "rb") as fh:
            return any(line.split(b" ")[4] == target for line in fh)
    return False

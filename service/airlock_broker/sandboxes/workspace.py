"""Per-job directories on the host: a private spool for the input, a tmpfs for the output.

Layout under the state root (0700, owned by the broker, checked at start-up: state_dirs.py)::

    <root>/uploads/<job_id>     0600, the artifact while it streams in (``new_upload``)
    <root>/results/<job_id>     0600, a validated output being answered or kept for retries
    <root>/slots/<slot_id>/     0700, one per container (``JobWorkspace``)
        in/                     0755, bind-mounted read-only at contract.IN_DIR
            artifact            0400, owned by the sandbox uid
            sample.npy          0400, the caller's parity sample, when there is one
            job.json            0444, written last, by rename
            job.bell            0444, a FIFO (runc only): one byte once job.json is in place
        out/                    a tmpfs: size-capped, noexec,nosuid,nodev, owned by the sandbox
                                uid, bind-mounted at contract.OUT_DIR; or, for an output too
                                large for RAM, the same on disk (``images/`` below)
    <root>/images/<slot_id>.img 0600, a sparse ext4 image of the output's size, loop-mounted
                                at that slot's out/ (only for a disk-backed output); always
                                on the disk, wherever its slot is
    <root>/ram/                 0700, the RAM spool: a tmpfs of ``[spool] ram_bytes`` mounted
                                noexec,nosuid,nodev by the broker (``mount_ram_spool``)
        uploads/<job_id>        an input that fits the RAM spool (conversion/input_room.py)
        slots/<slot_id>/        warm containers' slots, and those of a job whose input is
                                here: the same layout as above (a rename and a hard link
                                need one filesystem). A job whose input is on disk gets
                                slots prepared under <root>/slots instead.

The output is a filesystem mounted by the broker (not a Docker tmpfs) so that it survives the
container: the broker reads it after the container is dead, then unmounts it. A size cap on a
plain directory is not possible, and ``docker cp`` out of a sandbox is exactly what DESIGN
§1.2 forbids. A tmpfs is RAM, charged to the sandbox's memory as the worker writes it; a
safetensors shard of many GiB gets a disk-backed filesystem instead (``on_disk``): the same
cap, flags and owner, its bytes in the spool's page cache and on its disk. The sandbox only
ever writes files through it; the image itself is never in any sandbox's reach, so the kernel
mounts nothing a sandbox wrote raw.

Nothing here follows a link the broker did not make (DESIGN §1.8): files are opened
``O_NOFOLLOW`` and changed through their descriptor, a mount point is recognised by ``lstat``
(its device differs from its directory's) and unmounted ``UMOUNT_NOFOLLOW`` through a
descriptor of the slot directory, never by a resolved path; ``reap_stale`` walks the slots
by descriptor and only unlinks an entry that is not a real directory.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from airlock_broker.security.state_dirs import (
    RAM_SPOOL,
    SAFE_OPEN,
    SPOOL_DIRS,
    check_dir,
    ensure_dir,
)
from airlock_sandbox.contract import (
    ARTIFACT_NAME,
    DONE_NAME,
    DOORBELL_NAME,
    JOB_SPEC_NAME,
    READY_NAME,
    SAMPLE_NAME,
    JobSpec,
)

log = logging.getLogger(__name__)

_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MNT_DETACH = 0x2
#: <linux/fs.h> on 64-bit Linux: the inode flags' ioctls (an int travels) and append-only.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_APPEND_FL = 0x20
_UMOUNT_NOFOLLOW = 0x8
_OUT = "out"
_IMAGE_SUFFIX = ".img"
#: The RAM spool holds a few dozen slots and uploads: each inode it could hold costs memory.
_RAM_INODES = 4096
#: Room in the RAM spool beyond its budget, never claimed (conversion/input_room.py): job
#: specs and parity samples (at most 1 MiB each), written after an upload's claim.
RAM_SLACK_BYTES = 64 * 1024 * 1024
#: Where the disk-backed output's tools are looked for (never the broker's own PATH).
_SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: How long mkfs or mount may take for a disk-backed output. A sparse image with 64 inodes and
#: no journal is made in well under a second; past this the disk or the loop driver is stuck.
TOOL_TIMEOUT_SECONDS = 60.0
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | SAFE_OPEN

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class WorkspaceError(RuntimeError):
    """The host could not prepare a job directory (infrastructure, not the artifact)."""


@dataclass(frozen=True)
class JobWorkspace:
    """The host directories of one job. Owned by exactly one job; ``destroy`` removes it."""

    root: Path
    uid: int
    gid: int
    #: The disk-backed output's image (``images/<slot_id>.img`` on the disk spool), if any.
    image: Path | None = None

    @property
    def in_dir(self) -> Path:
        return self.root / "in"

    @property
    def out_dir(self) -> Path:
        return self.root / "out"

    @property
    def artifact(self) -> Path:
        return self.in_dir / ARTIFACT_NAME

    @property
    def sample(self) -> Path:
        return self.in_dir / SAMPLE_NAME

    @classmethod
    def create(cls, spool_root: Path, slot_id: str, *, uid: int, gid: int,
               output_bytes: int, image_root: Path | None = None) -> JobWorkspace:
        """Make the directories under ``spool_root`` (the RAM spool's or the disk's) and mount
        the output filesystem: a tmpfs, or given ``image_root`` (the disk spool's root) an
        ext4 image in its ``images/``. Cleans up after itself on failure."""
        root = _spool_dir(spool_root, "slots") / slot_id
        image = None if image_root is None else _spool_dir(image_root, "images") / (
            slot_id + _IMAGE_SUFFIX)
        root.mkdir(mode=0o700)
        ws = cls(root=root, uid=uid, gid=gid, image=image)
        try:
            ws.in_dir.mkdir(mode=0o755)
            ws.out_dir.mkdir(mode=0o700)
            if image is not None:
                _mount_disk(image, ws.out_dir, output_bytes, uid, gid)
            else:
                _mount_tmpfs(ws.out_dir, output_bytes, uid, gid)
        except BaseException:
            ws.destroy()
            raise
        return ws

    def adopt_artifact(self, upload: Path) -> None:
        """Move a finished upload in (same filesystem: a rename) and hand it to the sandbox user."""
        os.rename(upload, self.artifact)
        fd = os.open(self.artifact, os.O_RDONLY | os.O_NONBLOCK | SAFE_OPEN)
        try:
            if os.geteuid() == 0:
                os.fchown(fd, self.uid, self.gid)
                os.fchmod(fd, 0o400)
            else:  # a non-root broker cannot chown; world-readable inside a 0700 tree
                os.fchmod(fd, 0o444)
        finally:
            os.close(fd)

    def link_artifact(self, source: Path) -> None:
        """The same artifact for a second sandbox: a hard link (read-only mounts in both)."""
        os.link(source, self.artifact, follow_symlinks=False)

    def write_sample(self, data: bytes) -> None:
        """The caller's parity sample (already capped: contract.check_sample), as a file the
        sandbox user may read and nobody may change; never parsed here."""
        fd = os.open(self.sample, os.O_WRONLY | os.O_CREAT | os.O_EXCL | SAFE_OPEN, 0o400)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if os.geteuid() == 0:
                os.fchown(fd, self.uid, self.gid)
            else:  # a non-root broker cannot chown; world-readable inside a 0700 tree
                os.fchmod(fd, 0o444)
        finally:
            os.close(fd)

    def share_sample(self, source: JobWorkspace) -> None:
        """The other slot's parity sample, if it has one, for a second sandbox of the job."""
        if os.path.lexists(source.sample):
            os.link(source.sample, self.sample, follow_symlinks=False)

    def write_job_spec(self, spec: JobSpec) -> None:
        """Written last and atomically: a warm worker starts the moment it appears (it is
        woken by its doorbell, if it has one)."""
        tmp = self.in_dir / f".{JOB_SPEC_NAME}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
        try:
            os.write(fd, spec.to_json())
        finally:
            os.close(fd)
        os.rename(tmp, self.in_dir / JOB_SPEC_NAME)
        self._ring()

    def make_doorbell(self) -> None:
        """The FIFO a waiting worker sleeps on (contract.DOORBELL_NAME): the broker's, 0444,
        in the input directory the sandbox sees read-only; nothing but ``_ring`` writes it."""
        bell = self.in_dir / DOORBELL_NAME
        os.mkfifo(bell, 0o400)
        fd = os.open(bell, os.O_RDONLY | os.O_NONBLOCK | SAFE_OPEN)  # no writer: no wait
        try:
            os.fchmod(fd, 0o444)  # whatever the umask
        finally:
            os.close(fd)

    def _ring(self) -> None:
        """One byte into the doorbell, if a worker has it open; never waits. Without a reader
        (none made, a cold container not started yet, a worker that polls) it is left: the
        worker finds the spec when it looks."""
        try:
            fd = os.open(self.in_dir / DOORBELL_NAME, os.O_WRONLY | os.O_NONBLOCK | SAFE_OPEN)
        except OSError:  # ENOENT: no bell; ENXIO: nobody listens
            return
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                # Full (rung already), or the worker closed its end since the open (its
                # fallback look found the spec): either way there is nothing left to wake.
                with contextlib.suppress(BlockingIOError, BrokenPipeError):
                    os.write(fd, b"\n")
        finally:
            os.close(fd)

    def append_only_output(self, name: str) -> int | None:
        """An empty file ``name`` in the output, which its sandbox may append to and do
        nothing else with (``FS_APPEND_FL``: the kernel refuses writing anywhere but at its
        end, truncating it, mapping it writable, renaming and removing it, to its owner too),
        and a read-only descriptor of it for the broker to follow it by (the caller closes
        it). Made before the job's spec. None, and no file, where it cannot be made so: the
        name is taken, the output's filesystem cannot mark a file, a non-root broker may not
        (``CAP_LINUX_IMMUTABLE``), or a descriptor opened for writing before the mark exists
        (the kernel checks the mark when a file is opened, not when it is written)."""
        dir_fd = os.open(self.out_dir, os.O_RDONLY | os.O_DIRECTORY | SAFE_OPEN)
        try:
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | SAFE_OPEN, 0o600,
                             dir_fd=dir_fd)
            except OSError as exc:
                log.debug("cannot make the output %s: %s", name, exc)
                return None
            try:
                if os.geteuid() == 0:
                    os.fchown(fd, self.uid, self.gid)
                marked = _set_append_only(fd, True)
                made = os.fstat(fd)
            finally:
                os.close(fd)
            reader = _only_reader(dir_fd, name, made) if marked else None
            if reader is None:
                _remove_output(dir_fd, name, marked)
            return reader
        finally:
            os.close(dir_fd)

    def worker_ready(self) -> bool:
        """Whether the worker has said it is warmed up (``READY_NAME`` exists in the out dir).

        The sandbox's own word, so a hint for pool status, sizing and a CPU weight (a speed)
        and nothing else: only that the name exists is read (``lstat``: a link is not
        followed, a file not opened)."""
        try:
            os.lstat(self.out_dir / READY_NAME)
        except OSError:
            return False
        return True

    def forget_ready(self) -> None:
        """Remove the worker's readiness mark: it is not an output."""
        self._forget(READY_NAME)

    def forget_marks(self) -> None:
        """Remove the worker's marks (readiness, success) once nothing in the sandbox runs:
        they are not outputs. A mark the sandbox made something else of (a directory) stays:
        it is the sandbox's word either way, and no output is taken from it."""
        for name in (READY_NAME, DONE_NAME):
            self._forget(name)

    def _forget(self, name: str) -> None:
        with contextlib.suppress(OSError):  # gone, or not a file: unlink never follows a link
            os.unlink(self.out_dir / name)

    def drop_input(self) -> None:
        """Remove the artifact and the sample once the job is done with them (its sandbox
        dead or being killed), before the slot itself is destroyed (deferred: pools.py): an
        input in the RAM spool gives its room back as soon as no sandbox holds it open."""
        for name in (ARTIFACT_NAME, SAMPLE_NAME):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.in_dir / name)  # unlink never follows a link

    def destroy(self) -> None:
        """Unmount and delete everything, the image last (the unmount releases its loop
        device). Logs instead of raising: it runs in ``finally``. A slot whose output could
        not be unmounted is left whole, its image too (the next start's reaper tries again):
        removing files through the mount would walk what the sandbox wrote."""
        if _destroy_slot(self.root) and self.image is not None:
            _remove_logged(self.image)  # unlink never follows a link


def slot_spool(spool_root: Path, *, on_disk: bool = False) -> Path:
    """The spool a new slot goes on: the RAM spool when it is mounted, unless the slot is for
    an input on disk (``on_disk``); else the disk spool."""
    ram = spool_root / RAM_SPOOL
    return spool_root if on_disk or not _is_mount(spool_root, RAM_SPOOL) else ram


def mount_ram_spool(spool_root: Path, budget: int) -> Path | None:
    """Mount the RAM spool at ``<spool_root>/ram`` (a tmpfs of ``budget`` plus
    ``RAM_SLACK_BYTES``, noexec,nosuid,nodev, 0700, the broker's) and return it; None
    when ``budget`` is 0 or the mount is refused (a broker that is not root: logged once, every
    input goes to disk). A RAM spool a dead broker left is unmounted first (its contents were
    reaped by ``reap_stale``), so the budget is always this configuration's."""
    unmount_ram_spool(spool_root)
    if budget <= 0:
        return None
    path = spool_root / RAM_SPOOL
    ensure_dir(path)
    fd = os.open(path, _DIR_OPEN)
    try:
        opts = (f"size={budget + RAM_SLACK_BYTES},nr_inodes={_RAM_INODES},mode=0700,"
                f"uid={os.geteuid()},gid={os.getegid()}")
        if _libc.mount(b"tmpfs", os.fsencode(f"/proc/self/fd/{fd}"), b"tmpfs",
                       _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, opts.encode()) != 0:
            log.warning("the RAM spool is off: cannot mount a tmpfs at %s (%s); every input "
                        "is spooled on disk ([spool] ram_bytes = 0 says so without this line)",
                        path, os.strerror(ctypes.get_errno()))
            return None
    finally:
        os.close(fd)
    check_dir(path)  # the tmpfs's root now: the broker's, 0700
    return path


def unmount_ram_spool(spool_root: Path) -> None:
    """Unmount the RAM spool if one is mounted (``reap_stale`` first: nothing in it is
    kept). Never follows a link: a link named ``ram`` is no mount point."""
    try:
        fd = os.open(spool_root, _DIR_OPEN)
    except OSError as exc:
        log.error("cannot open %s to unmount its RAM spool: %s", spool_root, exc)
        return
    try:
        _unmount_at(fd, RAM_SPOOL, spool_root)
    finally:
        os.close(fd)


def new_upload(spool_root: Path, job_id: str) -> tuple[Path, int]:
    """A new, exclusive, private file for an incoming artifact: (path, fd opened for writing,
    and reading: the fast path hashes what it spooled, input_digest.py)."""
    path = _spool_dir(spool_root, "uploads") / job_id
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return path, fd


def results_dir(spool_root: Path) -> Path:
    """Validated outputs: answers on their way (answers.py), then the idempotency store's."""
    return _spool_dir(spool_root, "results")


def remove_quietly(path: Path) -> None:
    """``unlink`` for ``finally`` blocks: a file already moved or removed is fine."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def remove_soon(path: Path) -> asyncio.Future[None] | None:
    """``remove_quietly`` on a worker thread when called on the event loop (its future, for
    whoever must know it is done), else at once: unlinking a large file frees its blocks
    first (ext4 here: 83 ms for 400 MiB, 0.8 s for 4 GiB), and the loop serves every other
    call meanwhile. Errors are logged, never raised."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop: already on a thread of its own, or shutting down
        _remove_logged(path)
        return None
    return loop.run_in_executor(None, _remove_logged, path)


def _remove_logged(path: Path) -> None:
    try:
        remove_quietly(path)
    except OSError as exc:
        log.error("could not remove %s: %s", path, exc)


def reap_stale(spool_root: Path) -> int:
    """Remove uploads, slots and kept results left by a broker that died (SIGKILL, power loss)
    or by a job that was cut short; unmount their output tmpfs. Returns how many were removed.

    Only for a spool root that no live broker uses: call it at start-up, before serving, and
    at shutdown, after everything else is closed. An entry that is a link is unlinked, never
    followed: nothing outside the spool is unmounted or removed.
    """
    count = 0
    ram = [spool_root / RAM_SPOOL] if _is_mount(spool_root, RAM_SPOOL) else []
    for root in (spool_root, *ram):
        for sub in SPOOL_DIRS:
            try:
                base = os.open(root / sub, _DIR_OPEN)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:  # ELOOP: a link; the start-up check refuses it
                log.error("not reaping %s: %s", root / sub, exc)
                continue
            try:
                for name in os.listdir(base):
                    _remove_entry(base, name, root / sub / name)
                    count += 1
            finally:
                os.close(base)
    return count


def _remove_entry(base: int, name: str, shown: Path) -> bool:
    """Remove ``name`` (a slot) from the directory open as ``base``; False if its output is
    still mounted (then nothing is removed: logged) or it could not be opened."""
    try:
        st = os.lstat(name, dir_fd=base)
    except FileNotFoundError:
        return True
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=base)
        return True
    try:
        fd = os.open(name, _DIR_OPEN, dir_fd=base)
    except OSError as exc:
        log.error("cannot open job directory %s: %s", shown, exc)
        return False
    try:
        if not _unmount_at(fd, _OUT, shown):
            log.error("job directory %s left in place: its output is still mounted", shown)
            return False
    finally:
        os.close(fd)
    shutil.rmtree(name, dir_fd=base, ignore_errors=True)
    if os.path.lexists(shown):
        log.error("could not remove job directory %s", shown)
    return True


def _destroy_slot(root: Path) -> bool:
    """Remove the slot ``root``; False if it is left in place (logged)."""
    try:
        base = os.open(root.parent, _DIR_OPEN)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.error("cannot open %s to remove job directory %s: %s", root.parent, root.name, exc)
        return False
    try:
        return _remove_entry(base, root.name, root)
    finally:
        os.close(base)


def _unmount_at(dir_fd: int, name: str, shown: Path) -> bool:
    """Unmount ``name`` in the directory open as ``dir_fd`` (a slot's ``out``, the state
    root's ``ram``) if something is mounted there; False if that failed (logged). A link is
    not a mount point (lstat: same device as its directory) and is never followed (the path
    goes through the descriptor; UMOUNT_NOFOLLOW for the last part)."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    if not stat.S_ISDIR(st.st_mode) or st.st_dev == os.fstat(dir_fd).st_dev:
        return True
    target = os.fsencode(f"/proc/self/fd/{dir_fd}/{name}")
    if _libc.umount2(target, _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
        log.error("umount %s failed: %s", shown / name, os.strerror(ctypes.get_errno()))
        return False
    return True


def _is_mount(parent: Path, name: str) -> bool:
    """Whether a filesystem is mounted at the directory ``parent/name`` (never a link)."""
    try:
        st = os.lstat(parent / name)
        return stat.S_ISDIR(st.st_mode) and st.st_dev != os.lstat(parent).st_dev
    except OSError:
        return False


def _set_append_only(fd: int, on: bool) -> bool:
    """Set or clear ``FS_APPEND_FL`` on ``fd``'s file; False where the filesystem or the
    broker's capabilities refuse it."""
    flags = array.array("i", [0])
    try:
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        flags[0] = flags[0] | _FS_APPEND_FL if on else flags[0] & ~_FS_APPEND_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags)
    except OSError as exc:
        log.debug("cannot %s an output append-only: %s", "make" if on else "unmake", exc)
        return False
    return True


def _only_reader(dir_fd: int, name: str, made: os.stat_result) -> int | None:
    """A read-only descriptor of the marked file ``name``, if it is the file made (it can no
    longer be renamed or removed) and no descriptor of it is open for writing: a read lease,
    which the kernel grants only then."""
    reader = os.open(name, os.O_RDONLY | SAFE_OPEN, dir_fd=dir_fd)
    seen = os.fstat(reader)
    try:
        if (seen.st_dev, seen.st_ino) != (made.st_dev, made.st_ino):
            raise OSError(f"{name} is another file than the one made")
        fcntl.fcntl(reader, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(reader, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError as exc:
        log.warning("the output %s cannot be followed (%s): it is hashed once written", name,
                    exc)
        os.close(reader)
        return None
    return reader


def _remove_output(dir_fd: int, name: str, marked: bool) -> None:
    """Take a made output away again (its mark first), so that the job writes its own."""
    if marked:
        fd = os.open(name, os.O_RDONLY | SAFE_OPEN, dir_fd=dir_fd)
        try:
            _set_append_only(fd, False)
        finally:
            os.close(fd)
    os.unlink(name, dir_fd=dir_fd)


def _spool_dir(spool_root: Path, name: str) -> Path:
    """One of the spool's directories: made 0700 if missing, else checked (state_dirs)."""
    path = spool_root / name
    ensure_dir(path)
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


def _mount_disk(image: Path, target: Path, size: int, uid: int, gid: int) -> None:
    """A sparse ext4 image of ``size`` bytes at ``image``, loop-mounted noexec,nosuid,nodev at
    ``target``, its root owned by ``uid``:``gid`` and 0700 like the tmpfs's.

    No journal and no reserved blocks (the filesystem lives as long as one job), few inodes
    (an output is a handful of files; inodes on disk cost no host memory). ``mount -o loop``
    marks the loop device autoclear: unmounting it (``_unmount_out``) releases it.
    """
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | SAFE_OPEN, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    _run_tool("mkfs.ext4", "-q", "-F", "-m", "0", "-N", "64", "-O", "^has_journal",
              "-E", f"lazy_itable_init=1,lazy_journal_init=1,root_owner={uid}:{gid}",
              str(image))
    _run_tool("mount", "-t", "ext4", "-o", "loop,noexec,nosuid,nodev", str(image), str(target))
    try:
        os.rmdir(target / "lost+found")
        os.chmod(target, 0o700)
    except OSError as exc:
        raise WorkspaceError(f"cannot prepare the job's disk-backed output at {target}: "
                             f"{exc}") from exc


def disk_outputs_missing() -> str | None:
    """What this host lacks for disk-backed outputs (a sentence), or None: checked at start-up,
    so that an operator hears it before the first large shard fails."""
    missing = [name for name in ("mkfs.ext4", "mount")
               if shutil.which(name, path=_SYSTEM_PATH) is None]
    if not os.path.exists("/dev/loop-control"):
        missing.append("loop devices (/dev/loop-control)")
    return ", ".join(missing) + " missing" if missing else None


def _run_tool(name: str, *args: str) -> None:
    """Run a system tool for the disk-backed output, or say what is missing."""
    tool = shutil.which(name, path=_SYSTEM_PATH)
    if tool is None:
        raise WorkspaceError(f"{name} is not installed: a disk-backed output needs e2fsprogs "
                             "and util-linux's mount")
    try:
        done = subprocess.run([tool, *args], capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT_SECONDS, check=False,
                              env={"PATH": _SYSTEM_PATH, "LC_ALL": "C"})
    except subprocess.TimeoutExpired as exc:  # killed by subprocess.run
        raise WorkspaceError(f"{name} did not finish within {exc.timeout:g} s for the job's "
                             "disk-backed output (killed; the disk or the loop driver is "
                             "stuck)") from exc
    except subprocess.SubprocessError as exc:
        raise WorkspaceError(f"{name} could not be run for the job's disk-backed output: "
                             f"{exc}") from exc
    if done.returncode != 0:
        raise WorkspaceError(f"{name} failed for the job's disk-backed output "
                             f"(exit {done.returncode}): {done.stderr.strip()[-300:]} (the "
                             "broker must run as root, with loop devices, to give a sandbox "
                             "an output larger than RAM)")

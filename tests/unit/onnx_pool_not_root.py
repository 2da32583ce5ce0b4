"""A broker that is not root, playing the misbehaving validators of ``onnx_pool_fakes``:
``python -m tests.unit.onnx_pool_not_root UID`` prints, as JSON, what one validator could do.

The tests run as root, and a root broker's validators take a uid of their own; a broker that is
not root (a developer's run) forks them as itself, so its uid's other tasks count against their
``RLIMIT_NPROC`` and only the seccomp filter stands between them and ``fork``. This process
starts as root and becomes ``UID`` for good (groups, gid, uid: no capability is left) before it
starts the pool. The venv's interpreter lives under /root (mode 0700), which ``UID`` could not
reach to start the validators' template, so first, in a mount namespace of this process's own,
every directory on the interpreter's and the import path's way that others may not search is
covered by an empty tmpfs (0755) through which only that way is bound back. Nothing changes on
the host. Run as someone else than root, it plays that user as it is. Given a capability, it
keeps that one (and only that one) as an ambient capability: a service that is not root but was
given one.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import sys
import tempfile
from pathlib import Path

from airlock_broker.errors import AirlockError
from airlock_broker.validation.confinement import (
    _LINUX_CAPABILITY_VERSION_3,
    _MNT_DETACH,
    _MS_PRIVATE,
    _MS_REC,
    _PR_CAP_AMBIENT,
    _CapData,
    _CapHeader,
)
from airlock_broker.validation.limits import OutputLimits
from airlock_broker.validation.onnx_pool import OnnxValidatorPool, ValidatorSettings
from tests.unit import onnx_pool_fakes as fakes

_CLONE_NEWNS = 0x00020000
_MS_BIND = 0x1000
_PR_SET_KEEPCAPS = 8
_PR_CAP_AMBIENT_RAISE = 2
# The rest of the kernel's capability and mount ABI is the validators' confinement's.


def _mount(source: str | None, target: str, kind: str | None, flags: int,
           data: str | None = None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    encoded = [None if s is None else s.encode() for s in (source, target, kind, data)]
    if libc.mount(encoded[0], encoded[1], encoded[2], flags, encoded[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _closed_ways() -> dict[Path, set[str]]:
    """Each directory others may not search on the way to the interpreter or an import path
    entry, with the names below it that lie on those ways."""
    ways = {Path(os.path.realpath(sys.executable)), *(Path(p).resolve() for p in sys.path if p)}
    closed: dict[Path, set[str]] = {}
    for way in ways:
        for below in [way, *way.parents][:-1]:  # not "/"
            parent = below.parent
            if parent != below and not os.stat(parent).st_mode & 0o001:
                closed.setdefault(parent, set()).add(below.name)
    return closed


def open_the_way() -> None:
    """In a mount namespace of our own: the interpreter and import path reachable by anyone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    stage = Path(tempfile.mkdtemp(prefix="airlock-not-root-"))
    for number, (closed, names) in enumerate(sorted(_closed_ways().items())):  # outermost first
        staged = {}
        for name in sorted(names):
            staged[name] = stage / f"{number}-{name}"
            staged[name].mkdir()
            _mount(str(closed / name), str(staged[name]), None, _MS_BIND | _MS_REC)
        _mount("tmpfs", str(closed), "tmpfs", 0, "mode=0755")
        for name, held in staged.items():
            (closed / name).mkdir()
            _mount(str(held), str(closed / name), None, _MS_BIND | _MS_REC)
            if libc.umount2(str(held).encode(), _MNT_DETACH) != 0:
                raise OSError(ctypes.get_errno(), f"umount {held}")
            held.rmdir()
    stage.rmdir()  # it is the host's /tmp's


def become(uid: int, ambient: int | None) -> None:
    """``uid`` for good, holding no capability, or only ``ambient`` (a number) as an ambient
    capability: what a service manager gives a service (systemd's ``AmbientCapabilities=``),
    which every program it starts inherits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if ambient is not None and libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if ambient is None:
        return
    bit = 1 << ambient  # below 32: the first half of the sets
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    held = (_CapData * 2)(_CapData(bit, bit, bit), _CapData(0, 0, 0))
    if libc.capset(ctypes.byref(header), ctypes.byref(held)) != 0 or \
            libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, ambient, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"keeping capability {ambient}")


async def probe() -> dict[str, object]:
    pool = OnnxValidatorPool(OutputLimits(), ValidatorSettings(processes=1),
                             worker_module=fakes.__name__)
    pool.start()
    found: dict[str, object] = {"uid": os.getuid(), "full": pool.confinement.full}
    try:
        with tempfile.TemporaryDirectory() as directory:
            for name in (fakes.THREADS, fakes.SYSCALLS):
                source = Path(directory, name.decode())
                source.write_bytes(name)
                try:
                    await asyncio.wait_for(pool.validate(source), 60)
                    found[name.decode()] = "passed"
                except AirlockError as exc:
                    found[name.decode()] = exc.message
        while not pool.pids():
            await asyncio.sleep(0.02)
        [spare] = pool.pids()
        status = Path(f"/proc/{spare}/status").read_text()
        while "Seccomp:\t2" not in status:  # the spare has confined itself
            await asyncio.sleep(0.02)
            status = Path(f"/proc/{spare}/status").read_text()
        found["status"] = dict(line.split(":\t", 1) for line in status.splitlines())
        found["limits"] = Path(f"/proc/{spare}/limits").read_text()
    finally:
        await pool.close()
    return found


def main(argv: list[str]) -> int:
    """``argv``: ``[program, UID]`` or ``[program, UID, CAPABILITY]`` (a number)."""
    if os.geteuid() == 0:
        open_the_way()
        become(int(argv[1]), int(argv[2]) if len(argv) > 2 else None)
    print(json.dumps(asyncio.run(probe())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

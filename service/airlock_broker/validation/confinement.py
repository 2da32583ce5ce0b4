"""Taking a validator's privileges and view of the host away before it reads a hostile model.

The broker runs as root (it drives the Docker engine). A validator parses attacker protobuf in
onnx's C++; if a parser bug subverts it, it should hold nothing worth having. The validator
template (``onnx_worker``), which never reads a model, prepares what every validator inherits:

1. first thing, before it imports onnx, it enters fresh network, mount and IPC namespaces
   (``unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC)``, all mounts made private): only a
   loopback interface, and that one down, so it can reach no host, no Docker daemon over TCP,
   not even 127.0.0.1; and no System V or POSIX IPC object of the host's. An IPC object
   outlives the process that made it (a shared memory segment does while
   ``kernel.shm_rmid_forced`` is 0, the default), but not its namespace: none can pin host
   memory beyond the template's life (the seccomp filter refuses validators the IPC calls
   anyway);
2. after its imports and a warm-up validation of a model it built itself, it replaces its root
   with an empty, read-only tmpfs (``pivot_root`` and a detached unmount of the old root): no
   spool, no keys, no results, no /proc, no sockets remain visible to it or its children;
3. it drops to the validators' own uid/gid (``[onnx_validator] uid/gid``; supplementary groups
   cleared first, then gid, then uid, real, effective and saved), checks that it cannot get
   root back, empties every capability set (below), and becomes non-dumpable (no process of
   the same uid may trace it or read its memory);
4. it sets ``PR_SET_NO_NEW_PRIVS``, so no exec can ever give it privileges again.

Each validator it forks then adds a seccomp filter (``syscall_filter``) before it reads the
model. Why the root and uid change come after the imports: the interpreter and its standard
library may live where only root can read (``/root/.pyenv`` on the CI machine, mode 0700), and
nothing remains to read after step 2. Nothing hostile has been read at that point: import-time
code is the same the broker runs.

The file a validator checks is handed to it as an open, read-only descriptor by the broker, so
it needs no path at all. Steps 1-3 need root; a broker that is not root (a developer's unit
test run) gets step 4, the seccomp filter and no capabilities only, and says so
(:attr:`Confinement.full`). Its validators keep its uid, so their ``RLIMIT_NPROC`` counts its
tasks too, and binds all the same: the kernel lifts it only for uid 0 and for a holder of
``CAP_SYS_RESOURCE`` or ``CAP_SYS_ADMIN``. Such a broker may hold capabilities (ambient ones, from
a service manager), which a uid change would have emptied and nothing else does: so the
capability sets are emptied whoever the broker is, and checked empty (eleventh review). A
root broker whose validators cannot confine themselves gets no validators: the template exits
before it says ready, and validations fail with INTERNAL.

``os.unshare`` exists only from Python 3.12 and ``pivot_root`` has no libc wrapper, so this
calls libc through ctypes.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWIPC = 0x08000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_DUMPABLE = 4
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18
_MNT_DETACH = 2
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
#: Where the empty root is mounted before it becomes "/" (any directory of the old root).
_STAGING = b"/tmp"


@dataclass(frozen=True)
class Confinement:
    """What a validator process managed to give up."""

    uid: int
    gid: int
    own_network: bool
    empty_root: bool
    no_new_privs: bool

    @property
    def full(self) -> bool:
        return (self.uid != 0 and self.gid != 0 and self.own_network and self.empty_root
                and self.no_new_privs)

    def describe(self) -> str:
        network = ("own empty network and IPC namespaces" if self.own_network
                   else "the broker's network and IPC")
        root = "empty read-only root" if self.empty_root else "the broker's filesystem"
        return (f"uid {self.uid}, gid {self.gid}, no capabilities, {network}, {root}, "
                f"no_new_privs {'on' if self.no_new_privs else 'off'}, seccomp filter on")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter_namespaces() -> bool:
    """Step 1, as root: fresh network, mount and IPC namespaces for the calling process,
    every mount private to it; ``OSError`` if that fails. Returns False, doing nothing, when
    not root. Call it while the process has one thread: ``unshare`` moves only the calling
    thread, and refuses a new mount namespace to a threaded process."""
    if os.geteuid() != 0:
        return False
    libc = _libc()
    _check(libc.unshare(_CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWIPC),
           "unshare(CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWIPC)")
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount(/, MS_PRIVATE)")
    return True


def enter_empty_root() -> None:
    """Step 2, in the namespaces of step 1: make an empty, read-only tmpfs the root."""
    libc = _libc()
    flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    _check(libc.mount(b"tmpfs", _STAGING, b"tmpfs", flags, b"size=4k,nr_inodes=2,mode=0555"),
           "mount(tmpfs)")
    os.chdir(_STAGING)
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(f"pivot_root: unknown architecture {platform.machine()}")
    # pivot_root(".", "."): the old root ends up stacked on the new one, then is detached.
    _check(libc.syscall(number, b".", b"."), "pivot_root")
    _check(libc.umount2(b".", _MNT_DETACH), "umount2(old root)")
    os.chdir("/")
    if os.listdir("/"):
        raise OSError("the validator's new root is not empty")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    """One of the two 32-bit halves of the capability sets (``_LINUX_CAPABILITY_VERSION_3``)."""

    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Empty the ambient, effective, permitted and inheritable capability sets of the calling
    process; ``OSError`` if any is left. Giving capabilities up needs none."""
    libc = _libc()
    _check(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
           "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(libc.capset(ctypes.byref(header), ctypes.byref((_CapData * 2)())), "capset")
    held = (_CapData * 2)()
    _check(libc.capget(ctypes.byref(header), ctypes.byref(held)), "capget")
    if any(half.effective or half.permitted or half.inheritable for half in held):
        raise OSError("a validator kept capabilities it gave up")


def drop_privileges(own_network: bool, empty_root: bool, uid: int, gid: int) -> Confinement:
    """Step 3 (the ids as root; the capabilities whoever the broker is) and step 4;
    ``OSError`` if root or a capability cannot be given up for good."""
    libc = _libc()
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        try:
            os.setresuid(0, 0, 0)
        except PermissionError:
            pass
        else:
            raise OSError("a validator that dropped root could take it back")
    drop_capabilities()
    _check(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    return Confinement(uid=os.geteuid(), gid=os.getegid(), own_network=own_network,
                       empty_root=empty_root, no_new_privs=True)


def expected_confinement(uid: int, gid: int) -> Confinement:
    """What a validator started by this process will end up with (the pool logs it)."""
    root = os.geteuid() == 0
    return Confinement(uid=uid if root else os.geteuid(), gid=gid if root else os.getegid(),
                       own_network=root, empty_root=root, no_new_privs=True)

"""A seccomp filter for an ONNX validator process: the system calls a parser exploit would want.

A validator only reads a descriptor it was given, computes, and writes to a socket it already
holds. A subverted one should not be able to make a process, run a program, open a socket,
signal or trace another process, change its credentials or limits, make an IPC object that
would outlive it (System V shared memory, message queues, semaphores; POSIX message queues),
or reach the kernel's rarely used attack surface (BPF, io_uring, keyrings, user faults, mount
API). Each of those
calls fails with ``EPERM`` (``clone3`` with ``ENOSYS``, so that libc falls back to ``clone``,
which is then refused unless it makes a thread); a signal is allowed to the process itself
only (``abort`` and the tests' "crash" send one); any other architecture or ABI (x32) kills.

It is a deny list, not an allow list, on purpose: the calls CPython, protobuf and onnx's C++
make while parsing vary with versions and inputs, and a refused call in the middle of a valid
model would be a false rejection. What is denied is what a validator never needs.

No seccomp binding is in the broker's dependencies (libseccomp's Python module is not on PyPI
under its own name), so the BPF program is built here: about a hundred instructions, x86-64
only. A validator on another architecture cannot install it and exits before it says ready.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
from collections.abc import Iterable

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_CLONE_THREAD = 0x00010000

_RET_KILL_PROCESS = 0x80000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
#: Offsets in ``struct seccomp_data``: nr, arch, then the arguments (low 32 bits first).
_NR, _ARCH, _ARG0 = 0, 4, 16

#: x86-64 numbers of the calls refused with EPERM, grouped by what they would give an attacker.
DENIED: dict[str, int] = {
    # new processes and programs (threads are allowed, see clone below)
    "fork": 57, "vfork": 58, "execve": 59, "execveat": 322,
    # sockets: the answer goes over the socket the validator was born with
    "socket": 41, "connect": 42, "accept": 43, "bind": 49, "listen": 50, "socketpair": 53,
    "accept4": 288,
    # other processes
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "pidfd_open": 434, "pidfd_getfd": 438, "pidfd_send_signal": 424, "process_madvise": 440,
    "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    # credentials, limits, namespaces and mounts
    "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114, "setgroups": 116,
    "setresuid": 117, "setresgid": 119, "setfsuid": 122, "setfsgid": 123, "capset": 126,
    "prctl": 157, "setrlimit": 160, "prlimit64": 302, "personality": 135,
    "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155,
    "chroot": 161, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "mknod": 133, "mknodat": 259, "name_to_handle_at": 303, "open_by_handle_at": 304,
    # System V and POSIX IPC: an object outlives its maker (a shared memory segment does while
    # kernel.shm_rmid_forced is 0, the default), so it could pin memory after the validator
    # is killed; the template's own IPC namespace (confinement) keeps them off the host too
    "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67,
    "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71,
    "semget": 64, "semop": 65, "semctl": 66, "semtimedop": 220,
    "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243,
    "mq_notify": 244, "mq_getsetattr": 245,
    # kernel attack surface a parser never touches
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "keyctl": 250, "add_key": 248,
    "request_key": 249, "init_module": 175, "finit_module": 313, "delete_module": 176,
    "kexec_load": 246, "kexec_file_load": 320, "reboot": 169, "swapon": 167, "swapoff": 168,
    "acct": 163, "settimeofday": 164, "clock_settime": 227, "adjtimex": 159,
    "quotactl": 179, "lookup_dcookie": 212, "syslog": 103, "vhangup": 153,
}  # fmt: skip
#: Calls allowed only when their first argument is the validator's own pid.
SIGNALS: dict[str, int] = {"kill": 62, "tkill": 200, "tgkill": 234}
_CLONE = 56
_CLONE3 = 435


class _Program:
    """A tiny BPF assembler: instructions with forward jumps to named labels."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def add(self, code: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        self.code.append((code, jt, jf, k))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, jt, jf, k) in enumerate(self.code):
            out += struct.pack("<HBBI", code, self._offset(pc, jt), self._offset(pc, jf), k)
        return bytes(out)

    def _offset(self, pc: int, target: int | str) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[target] - pc - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"jump to {target} out of range")
        return offset


def build(own_pid: int, denied: Iterable[int] = DENIED.values()) -> bytes:
    """The filter program for a validator whose pid is ``own_pid``."""
    prog = _Program()
    prog.add(_LD_W_ABS, _ARCH)
    prog.add(_JEQ_K, _AUDIT_ARCH_X86_64, 0, "kill")
    prog.add(_LD_W_ABS, _NR)
    prog.add(_JGE_K, _X32_SYSCALL_BIT, "kill", 0)
    for nr in sorted(set(denied)):
        prog.add(_JEQ_K, nr, "eperm", 0)
    for nr in SIGNALS.values():
        prog.add(_JEQ_K, nr, "signal", 0)
    prog.add(_JEQ_K, _CLONE, "clone", 0)
    prog.add(_JEQ_K, _CLONE3, "enosys", 0)
    prog.add(_RET_K, _RET_ALLOW)  # everything else
    prog.label("signal")  # kill(pid, ...), tkill(tid, ...), tgkill(tgid, ...): ourselves only
    prog.add(_LD_W_ABS, _ARG0)
    prog.add(_JEQ_K, own_pid, "allow", "eperm")
    prog.label("clone")  # a thread, not a process
    prog.add(_LD_W_ABS, _ARG0)
    prog.add(_JSET_K, _CLONE_THREAD, "allow", "eperm")
    prog.label("allow")
    prog.add(_RET_K, _RET_ALLOW)
    prog.label("eperm")
    prog.add(_RET_K, _RET_ERRNO | errno.EPERM)
    prog.label("enosys")
    prog.add(_RET_K, _RET_ERRNO | errno.ENOSYS)
    prog.label("kill")
    prog.add(_RET_K, _RET_KILL_PROCESS)
    return prog.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(own_pid: int) -> None:
    """Install the filter on the calling (only) thread; ``OSError`` if it cannot be.
    ``PR_SET_NO_NEW_PRIVS`` must be set already (the kernel demands it of a non-root caller)."""
    if platform.machine() != "x86_64":
        raise OSError(errno.ENOTSUP, f"no validator seccomp filter for {platform.machine()}")
    program = build(own_pid)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {errno.errorcode.get(err, err)}")

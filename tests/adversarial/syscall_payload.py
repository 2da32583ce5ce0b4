"""Generator of the privilege-escalation-syscall payload (security.md §5 B7): a pickle whose
reduce payload, running as the artifact's code inside the sandbox, makes each syscall the
seccomp profile must refuse and reports what happened.

The report travels the only way out the broker allows: the payload writes a valid safetensors
"conversion" whose tensor names carry the results (``<syscall>.<ERRNO or OK>``) and exits 0. The
broker validates that file like any other output; the host test reads only the tensor names.
Nothing here is loaded on the host: the function writes bytes.
"""

from __future__ import annotations

import pickle
from pathlib import Path

#: syscall -> (x86_64 number, aarch64 number, arguments that succeed when nothing filters them
#: or would at least not fail with EPERM; "buf" is a zeroed 120-byte buffer).
SYSCALLS: dict[str, tuple[int, int, tuple[object, ...]]] = {
    "unshare": (272, 97, (0x10000000,)),  # CLONE_NEWUSER: works unprivileged on most kernels
    "mount": (165, 40, (b"none", b"/tmp", b"tmpfs", 0, None)),
    "ptrace": (101, 117, (0, 0, None, None)),  # PTRACE_TRACEME
    "bpf": (321, 280, (0, "buf", 72)),  # BPF_MAP_CREATE with a zeroed attr
    "io_uring_setup": (425, 425, (1, "buf")),
    "keyctl": (250, 219, (0, -3, 0)),  # KEYCTL_GET_KEYRING_ID of the session keyring
    "userfaultfd": (323, 282, (1,)),  # UFFD_USER_MODE_ONLY
}


def syscall_probe_source() -> str:
    return f"""
import ctypes, errno, json, os, platform, struct
SYSCALLS = {SYSCALLS!r}
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
arm = platform.machine() == "aarch64"
names = []
for name, (x86, a64, args) in SYSCALLS.items():
    call = [ctypes.create_string_buffer(120) if a == "buf" else a for a in args]
    pid = os.fork()  # a call that succeeds (an unshare, a TRACEME) must not change the reporter
    if pid == 0:
        ctypes.set_errno(0)
        ret = libc.syscall(ctypes.c_long(a64 if arm else x86), *call)
        os._exit(0 if ret != -1 else min(ctypes.get_errno(), 250) or 251)
    status = os.waitpid(pid, 0)[1]
    code = os.waitstatus_to_exitcode(status)
    names.append(name + "." + ("OK" if code == 0 else errno.errorcode.get(code, str(code))))
header = {{n: {{"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]}}
          for i, n in enumerate(names)}}
raw = json.dumps(header).encode()
raw += b" " * (-len(raw) % 8)
with open("/airlock/out/model.safetensors", "wb") as fh:
    fh.write(struct.pack("<Q", len(raw)) + raw + bytes(len(names)))
os._exit(0)
"""


class _ExecModule:
    """Pickles to ``exec(source, {})``: one namespace, so the payload's imports are visible
    inside its comprehensions (with exec's default split globals/locals they are not)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple[object, tuple[str, dict[str, object]]]:
        return (exec, (self.source, {}))


def syscall_probe_pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps(_ExecModule(syscall_probe_source()), protocol=4))
    return path

"""The isolation probe: run inside a sandbox exactly like a job's, it checks its own
confinement and writes a checklist to ``OUT_DIR/selftest.json``.

It opens no artifact. The broker pairs these observations with its own reading of the
container's configuration (``docker inspect``) before it reports SERVING.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import socket
import stat
import subprocess
from collections.abc import Callable

from airlock_sandbox import versions
from airlock_sandbox.contract import IN_DIR, OUT_DIR

SELFTEST_NAME = "selftest.json"
_SECRETS = re.compile(r"PROXY|TOKEN|SECRET|PASSW|CREDENTIAL|API_?KEY|AWS_|DOCKER_", re.I)


def _status_field(name: str) -> str:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return ""


def _write_fails(path: str) -> tuple[bool, str]:
    try:
        with open(path, "w") as fh:
            fh.write("x")
    except OSError as exc:
        return True, exc.strerror or str(exc)
    os.unlink(path)
    return False, f"wrote {path}"


def check_user() -> tuple[bool, str]:
    return os.getuid() != 0 and os.geteuid() != 0, f"uid={os.getuid()} euid={os.geteuid()}"


def check_capabilities() -> tuple[bool, str]:
    eff, bnd = _status_field("CapEff"), _status_field("CapBnd")
    return int(eff or "1", 16) == 0 and int(bnd or "1", 16) == 0, f"CapEff={eff} CapBnd={bnd}"


def check_no_new_privileges() -> tuple[bool, str]:
    value = _status_field("NoNewPrivs")
    return value == "1", f"NoNewPrivs={value or '?'}"


def check_read_only_root() -> tuple[bool, str]:
    return _write_fails("/.airlock-selftest")


def check_read_only_input() -> tuple[bool, str]:
    return _write_fails(os.path.join(IN_DIR, ".airlock-selftest"))


def check_no_network() -> tuple[bool, str]:
    interfaces = sorted(set(_interfaces()) - {"lo"})
    if interfaces:
        return False, f"interfaces besides lo: {interfaces}"
    for family, addr in ((socket.AF_INET, ("192.0.2.1", 9)), (socket.AF_INET6, ("2001:db8::1", 9))):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(addr)
            return False, f"connected to {addr[0]}"
        except OSError:
            pass
    return True, "only loopback; outbound connects fail"


def _interfaces() -> list[str]:
    try:
        return os.listdir("/sys/class/net")
    except OSError:
        with open("/proc/net/dev") as fh:
            return [line.split(":")[0].strip() for line in fh.readlines()[2:]]


def check_no_docker_socket() -> tuple[bool, str]:
    found = [p for p in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd")
             if os.path.exists(p)]
    return not found, f"found {found}" if found else "absent"


def _exec_refused(directory: str) -> tuple[bool, str]:
    """Write a tiny executable into ``directory`` and try to run it: noexec must refuse."""
    path = os.path.join(directory, ".airlock-selftest-exec")
    with open(path, "w") as fh:
        fh.write("#!/bin/sh\nexit 0\n")
    os.chmod(path, stat.S_IRWXU)
    try:
        done = subprocess.run([path], check=False, timeout=5)
    except OSError as exc:
        return True, exc.strerror or str(exc)
    finally:
        os.unlink(path)
    return done.returncode != 0, f"exec from {directory} exited {done.returncode}"


def check_tmp_noexec() -> tuple[bool, str]:
    return _exec_refused("/tmp")


def check_output_noexec() -> tuple[bool, str]:
    return _exec_refused(OUT_DIR)


def check_environment() -> tuple[bool, str]:
    leaked = sorted(k for k in os.environ if _SECRETS.search(k))
    return not leaked, f"suspicious variables: {leaked}" if leaked else "clean"


def check_pids_limited() -> tuple[bool, str]:
    for path in ("/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/pids.max"):
        try:
            with open(path) as fh:
                value = fh.read().strip()
        except OSError:
            continue
        return value != "max", f"{path}={value}"
    return True, "not visible inside (checked by the broker from the configuration)"


def check_memory_limited() -> tuple[bool, str]:
    for path in ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"):
        try:
            with open(path) as fh:
                value = fh.read().strip()
        except OSError:
            continue
        limited = value != "max" and int(value) < 2**60
        return limited, f"{path}={value}"
    return True, "not visible inside (checked by the broker from the configuration)"


def check_seccomp_mode() -> tuple[bool, str]:
    value = _status_field("Seccomp")
    return value == "2", f"Seccomp={value or '?'} (2: a filter is installed)"


#: Syscall numbers per architecture. The seccomp profile must refuse each with EPERM; the
#: arguments are ones that succeed (or fail differently) when nothing filters them, so the
#: probe tells the filter apart from a missing capability or an unimplemented call.
_NR = {
    "x86_64": {"unshare": 272, "mount": 165, "ptrace": 101, "bpf": 321, "io_uring_setup": 425,
               "keyctl": 250, "userfaultfd": 323, "memfd_create": 319, "clone3": 435},
    "aarch64": {"unshare": 97, "mount": 40, "ptrace": 117, "bpf": 280, "io_uring_setup": 425,
                "keyctl": 219, "userfaultfd": 282, "memfd_create": 279, "clone3": 435},
}
CLONE_NEWUSER = 0x10000000
KEY_SPEC_SESSION_KEYRING = -3
UFFD_USER_MODE_ONLY = 1
#: name -> (arguments, the errno the sandbox must answer). clone3 is refused with ENOSYS (so
#: glibc falls back to clone(), whose flags the filter checks).
SECCOMP_PROBES: dict[str, tuple[tuple[object, ...], int]] = {
    "unshare": ((CLONE_NEWUSER,), errno.EPERM),
    "mount": ((b"none", b"/tmp", b"tmpfs", 0, None), errno.EPERM),
    "ptrace": ((0, 0, None, None), errno.EPERM),  # PTRACE_TRACEME
    "bpf": ((0, None, 0), errno.EPERM),  # BPF_MAP_CREATE
    "io_uring_setup": ((1, "params"), errno.EPERM),
    "keyctl": ((0, KEY_SPEC_SESSION_KEYRING, 0), errno.EPERM),  # KEYCTL_GET_KEYRING_ID
    "userfaultfd": ((UFFD_USER_MODE_ONLY,), errno.EPERM),
    "memfd_create": ((b"airlock-selftest", 0), errno.EPERM),
    "clone3": ((None, 0), errno.ENOSYS),
}


def _try_syscalls() -> dict[str, tuple[int, int]]:
    """Make each probe syscall in a forked child (a call that unexpectedly succeeds, e.g. an
    unshare, must not change the probe itself); returns name -> (result, errno)."""
    numbers = _NR.get(platform.machine())
    if numbers is None:
        raise RuntimeError(f"no syscall numbers for {platform.machine()}")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no Python-level cleanup, just report and leave
        try:
            os.close(read_fd)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            results = {}
            for name, (args, _) in SECCOMP_PROBES.items():
                call = [ctypes.create_string_buffer(120) if a == "params" else a for a in args]
                ctypes.set_errno(0)
                ret = libc.syscall(ctypes.c_long(numbers[name]), *call)
                results[name] = (int(ret), ctypes.get_errno())
            os.write(write_fd, json.dumps(results).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        raw = fh.read(64 * 1024)
    os.waitpid(pid, 0)
    return {k: (int(v[0]), int(v[1])) for k, v in json.loads(raw).items()}


def seccomp_checks() -> dict[str, tuple[bool, str]]:
    """One check per probe syscall: ``seccomp_<name>``."""
    try:
        got = _try_syscalls()
    except Exception as exc:
        return {f"seccomp_{n}": (False, f"probe failed: {exc}") for n in SECCOMP_PROBES}
    checks = {}
    for name, (_, want) in SECCOMP_PROBES.items():
        ret, err = got.get(name, (0, 0))
        ok = ret == -1 and err == want
        checks[f"seccomp_{name}"] = (
            ok, f"{name}: " + (f"refused ({errno.errorcode.get(err, err)})" if ret == -1
                               else f"returned {ret}") + ("" if ok else
                                                          f", want {errno.errorcode[want]}"))
    return checks


CHECKS: dict[str, Callable[[], tuple[bool, str]]] = {
    "non_root_user": check_user,
    "no_capabilities": check_capabilities,
    "no_new_privileges": check_no_new_privileges,
    "read_only_root": check_read_only_root,
    "read_only_input": check_read_only_input,
    "no_network": check_no_network,
    "no_docker_socket": check_no_docker_socket,
    "tmp_noexec": check_tmp_noexec,
    "output_noexec": check_output_noexec,
    "no_secrets_in_env": check_environment,
    "pids_limited": check_pids_limited,
    "memory_limited": check_memory_limited,
    "seccomp_mode": check_seccomp_mode,
}


def run(out_dir: str = OUT_DIR) -> int:
    results = []
    for name, check in CHECKS.items():
        try:
            passed, detail = check()
        except Exception as exc:  # a probe that breaks is a failed check, not a crash
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        results.append({"name": name, "passed": bool(passed), "detail": str(detail)[:200]})
    for name, (passed, detail) in seccomp_checks().items():
        results.append({"name": name, "passed": passed, "detail": detail[:200]})
    try:
        found = versions.collect()
    except Exception as exc:  # the broker's version gates then fail for want of data
        found = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    with open(os.path.join(out_dir, SELFTEST_NAME), "w") as fh:
        json.dump({"checks": results, "versions": found}, fh)
    return 0

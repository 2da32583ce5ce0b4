#!/usr/bin/env python3
"""Generate the sandbox's seccomp profile (Docker / OCI JSON) from the allowlist below.

    scripts/gen-seccomp-profile.py            write airlock-worker.json and its gVisor variant
                                              airlock-worker-runsc.json (sandbox/airlock_sandbox/
                                              seccomp/)
    scripts/gen-seccomp-profile.py --log OUT  the measuring variant: same allowlist, but any other
                                              syscall is *allowed and logged* (SCMP_ACT_LOG) instead
                                              of refused; see "Measuring" below
    scripts/gen-seccomp-profile.py --check    exit 1 if the committed JSON is stale (make check)

Deny by default: a syscall not listed here fails with EPERM. The list is what the worker needs in
every profile (light, sklearn, torch; the self-test probe; the integrity extractor), CPython 3.11
with glibc 2.36, numpy / OpenBLAS / OpenMP threads, onnxruntime and torch (threads, mmap, futex).

Measuring (how the list was fitted, and how to refit it after adding a library): generate the
``--log`` variant, run a broker with ``[sandbox] seccomp = "<that file>"`` and the integration
conversions against it, then read the kernel log::

    dmesg | grep 'type=1326' | grep -o 'syscall=[0-9]*' | sort | uniq -c

Every line there is a syscall the worker made that this list does not allow (x86_64 numbers:
``ausyscall`` or /usr/include/x86_64-linux-gnu/asm/unistd_64.h). Add it below with the reason it
is needed, or leave it refused and say why in DENIED_NOTES.

Pure stdlib, deterministic output (the JSON is committed and diffed by ``make check``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "sandbox" / "airlock_sandbox" / "seccomp"
#: runtime family -> file. runsc applies the profile inside gVisor (runsc --oci-seccomp).
OUTPUTS = {"runc": "airlock-worker.json", "runsc": "airlock-worker-runsc.json"}

EPERM = 1
ENOSYS = 38

#: Allowed unconditionally, grouped by why the worker needs them.
ALLOW: dict[str, tuple[str, ...]] = {
    "files: read the artifact and job spec, write the one output, import modules": (
        "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
        "preadv2", "pwritev2", "open", "openat", "close", "close_range", "lseek",
        "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs",
        "access", "faccessat", "faccessat2", "readlink", "readlinkat",
        "getdents", "getdents64", "getcwd", "chdir", "fchdir",
        "rename", "renameat", "renameat2", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat",
        "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat",
        "truncate", "ftruncate", "fallocate", "fsync", "fdatasync", "flock", "fcntl",
        "dup", "dup2", "dup3", "pipe", "pipe2", "ioctl", "utimensat", "umask",
        "sendfile", "copy_file_range", "fadvise64", "readahead",
    ),
    "memory: allocators, mmap'd weights (torch.load mmap, numpy memmap), JIT-free runtimes": (
        "mmap", "munmap", "mprotect", "mremap", "madvise", "brk", "msync", "mincore",
        "membarrier", "get_mempolicy",
    ),
    "threads and synchronisation: OpenMP / OpenBLAS / onnxruntime / torch intra-op pools": (
        "futex", "set_robust_list", "set_tid_address", "rseq", "sched_yield",
        "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_getscheduler",
        "sched_get_priority_max", "sched_get_priority_min", "getcpu", "getpriority",
        "setpriority",
    ),
    "events and waiting: the warm container's poll for the job spec, selectors, timers": (
        "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl",
        "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2",
        "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday", "time",
        "alarm", "setitimer", "getitimer", "timer_create", "timer_settime", "timer_gettime",
        "timer_getoverrun", "timer_delete", "timerfd_create", "timerfd_settime",
        "timerfd_gettime",
    ),
    "signals": (
        "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
        "rt_sigpending", "sigaltstack", "pause", "kill", "tkill", "tgkill", "restart_syscall",
        "signalfd", "signalfd4",
    ),
    "process: identity, limits, the self-test's exec probe (subprocess), exit": (
        "exit", "exit_group", "getpid", "getppid", "gettid", "getuid", "geteuid", "getgid",
        "getegid", "getgroups", "getresuid", "getresgid", "getpgrp", "getpgid", "getsid",
        "setsid", "setpgid", "uname", "sysinfo", "getrlimit", "setrlimit", "prlimit64",
        "getrusage", "times", "getrandom", "arch_prctl", "prctl", "capget",
        "fork", "vfork", "execve", "wait4", "waitid",
    ),
    "identity changes: runc installs the filter *before* it switches to the sandbox user when "
    "no-new-privileges is off (a visible config choice), so it needs these; with no "
    "capabilities they can only drop privileges, never gain them": (
        "setuid", "setgid", "setgroups", "setresuid", "setresgid", "setreuid", "setregid",
        "setfsuid", "setfsgid", "capset",
    ),
    "sockets: socketpair / AF_UNIX only (socket() is restricted to AF_UNIX below); the "
    "container has no network, and nothing in the worker talks to one": (
        "socketpair", "connect", "sendto", "recvfrom", "sendmsg", "recvmsg", "shutdown",
        "getsockname", "getpeername", "setsockopt", "getsockopt", "bind", "listen", "accept",
        "accept4",
    ),
}

#: Namespace flags a clone() may not carry (CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|
#: NEWNET): threads and fork() pass, a clone into new namespaces does not.
CLONE_NAMESPACE_FLAGS = 0x7E020000
AF_UNIX = 1

#: Syscalls that are refused on purpose although a library might probe for them, with why.
DENIED_NOTES: dict[str, str] = {
    "clone3": "refused with ENOSYS, not EPERM: its flags live in a struct seccomp cannot "
              "inspect, and glibc falls back to clone() (whose flags are checked) on ENOSYS. "
              "runsc variant: gVisor (Debian 0.0~20221219) ignores errnoRet (a refused clone3 "
              "would return EPERM and glibc would not fall back: no thread could start) and does "
              "not implement clone3 itself, so the filter passes it and the Sentry answers ENOSYS; "
              "the self-test checks that answer",
    "mbind, set_mempolicy": "NUMA placement; measured: an allocator calls mbind and carries on "
                            "when refused (it is refused under Docker's default profile too)",
    "unshare, setns, mount, umount2, pivot_root, chroot": "namespace and mount escapes",
    "ptrace, process_vm_readv, process_vm_writev, kcmp": "inspecting or steering other "
                                                        "processes",
    "bpf, perf_event_open, userfaultfd, io_uring_setup, io_uring_enter, io_uring_register":
        "the kernel attack surface behind most recent container escapes",
    "keyctl, add_key, request_key": "the kernel keyring is not namespaced",
    "memfd_create, execveat": "executing code from memory around the noexec mounts",
    "init_module, finit_module, delete_module, kexec_load, reboot, swapon, acct, quotactl":
        "host administration (also needs capabilities the sandbox does not have)",
    "socket (other than AF_UNIX)": "no network family is needed; refusing it also closes "
                                   "netlink / packet / vsock kernel surface",
    "splice, vmsplice, tee": "not needed; Dirty-Pipe-class page-cache bugs went through them",
    "personality": "disabling ASLR or changing the execution domain",
}


def _rules(runtime: str) -> list[dict[str, object]]:
    rules: list[dict[str, object]] = []
    for why, names in ALLOW.items():
        rules.append({"names": sorted(names), "action": "SCMP_ACT_ALLOW", "comment": why})
    rules.append({
        "names": ["clone"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0,
                  "op": "SCMP_CMP_MASKED_EQ"}],
        "comment": "threads and fork, never into new namespaces",
    })
    rules.append({
        "names": ["socket"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": AF_UNIX, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
        "comment": "AF_UNIX only",
    })
    if runtime == "runsc":
        rules.append({"names": ["clone3"], "action": "SCMP_ACT_ALLOW",
                      "comment": DENIED_NOTES["clone3"]})
    else:
        rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS,
                      "comment": DENIED_NOTES["clone3"]})
    return rules


def profile(runtime: str = "runc", *, log: bool = False) -> dict[str, object]:
    """The profile document for a runtime family. ``log``: allow-and-log everything unlisted
    (measuring only)."""
    doc: dict[str, object] = {
        "comment": "Airlock worker sandbox: deny by default (EPERM). Generated by "
                   "scripts/gen-seccomp-profile.py; do not edit by hand.",
        "defaultAction": "SCMP_ACT_LOG" if log else "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": []},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": []},
        ],
        "syscalls": _rules(runtime),
    }
    if log:
        del doc["defaultErrnoRet"]
    return doc


def render(doc: dict[str, object]) -> str:
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", metavar="OUT", help="write the allow-and-log variant to OUT")
    parser.add_argument("--runtime", choices=sorted(OUTPUTS), default="runc",
                        help="runtime family of the --log variant")
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is stale")
    args = parser.parse_args(argv)
    if args.log:
        Path(args.log).write_text(render(profile(args.runtime, log=True)))
        return 0
    stale = []
    for runtime, name in OUTPUTS.items():
        path, text = OUT_DIR / name, render(profile(runtime))
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
            continue
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print(f"stale: {' '.join(stale)}: run scripts/gen-seccomp-profile.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

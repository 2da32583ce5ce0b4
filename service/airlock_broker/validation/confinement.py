"""Taking a validator process's privileges away before it reads a hostile model.

The broker runs as root (it drives the Docker engine). A validator process parses attacker
protobuf in onnx's C++; if a parser bug subverts it, it should hold nothing worth having. So
each validator:

1. first thing, before it imports onnx, enters a fresh network namespace
   (``unshare(CLONE_NEWNET)``): only a loopback interface, and that one down, so it can reach
   no host, no Docker daemon over TCP, not even 127.0.0.1;
2. after its imports and a warm-up validation of a model it built itself, but before it says
   ready, drops to an unprivileged uid/gid (supplementary groups cleared first, then gid, then
   uid, real, effective and saved), which also empties its capability sets, and checks that it
   cannot get root back;
3. sets ``PR_SET_NO_NEW_PRIVS``, so no exec can ever give it privileges again.

Why the uid drop comes after the imports: the interpreter and its standard library may live
where only root can read (``/root/.pyenv`` on the CI machine, mode 0700), so an unprivileged
process could not import onnx, nor the modules onnx imports lazily on its first validation.
Nothing hostile has been read at that point: import-time code is the same the broker runs.

The file it validates is handed to it as an open, read-only descriptor by the broker, so it
needs no permission on the broker's workspace. Steps 1 and 2 need root; a broker that is not
root (a developer's unit test run) gets step 3 only, and says so (:attr:`Confinement.full`).
A root broker whose validators cannot confine themselves gets no validators: the process exits
before it says ready, and validations fail with INTERNAL.

``os.unshare`` exists only from Python 3.12, so this calls libc through ctypes.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

#: ``nobody``/``nogroup`` on Debian; owns no file the broker cares about.
UNPRIVILEGED_ID = 65534
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class Confinement:
    """What a validator process managed to give up."""

    uid: int
    gid: int
    own_network: bool
    no_new_privs: bool

    @property
    def full(self) -> bool:
        return self.uid != 0 and self.gid != 0 and self.own_network and self.no_new_privs

    def describe(self) -> str:
        network = "own empty network namespace" if self.own_network else "the broker's network"
        return (f"uid {self.uid}, gid {self.gid}, {network}, "
                f"no_new_privs {'on' if self.no_new_privs else 'off'}")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter_empty_network() -> bool:
    """Step 1, as root: a fresh network namespace for the calling process; ``OSError`` if that
    fails. Returns False, doing nothing, when not root. Call it while the process has one
    thread: ``unshare`` moves only the calling thread."""
    if os.geteuid() != 0:
        return False
    _check(_libc().unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    return True


def drop_privileges(own_network: bool, uid: int = UNPRIVILEGED_ID,
                    gid: int = UNPRIVILEGED_ID) -> Confinement:
    """Steps 2 (as root) and 3; ``OSError`` if root cannot be given up for good."""
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
    _check(_libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    return Confinement(uid=os.geteuid(), gid=os.getegid(), own_network=own_network,
                       no_new_privs=True)


def expected_confinement() -> Confinement:
    """What a validator started by this process will end up with (the pool logs it)."""
    root = os.geteuid() == 0
    return Confinement(uid=UNPRIVILEGED_ID if root else os.geteuid(),
                       gid=UNPRIVILEGED_ID if root else os.getegid(),
                       own_network=root, no_new_privs=True)

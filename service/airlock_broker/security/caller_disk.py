"""Writing into a caller's file with the caller's claim on its disk, not root's.

The same-host fast path writes the output into a file the caller opened (fastpath/). The
kernel decides whether a write may take a new block by who writes, not by who owns the file:
a root broker would fill the blocks a filesystem keeps for root (ext4 reserves 5 % by default,
granted to fsuid 0 and to ``CAP_SYS_RESOURCE``) and pass over the caller's disk quota (also
``CAP_SYS_RESOURCE``). A local user could then fill a disk, through the broker, past the point
where the system itself can still write.

``writing_as`` gives the calling thread, for one block of code, the caller's filesystem ids
(when the broker is the host's root) and no ``CAP_SYS_RESOURCE``. Both are per thread on
Linux (``setfsuid``, ``capset`` with pid 0), so nothing else in the broker is touched, and
both are restored at the end. A write through an open descriptor checks no permission, only
space; a file of the broker's own that such a block opens (the output it copies from, in a
0700 directory) is opened under ``as_broker``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
from collections.abc import Iterator

#: linux/capability.h
_CAPABILITY_VERSION_3 = 0x20080522
CAP_SYS_RESOURCE = 24


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
# uid_t and gid_t are unsigned: an id of 2**31 or more is not a negative int.
for _call in (_libc.setfsuid, _libc.setfsgid):
    _call.argtypes = [ctypes.c_uint32]
    _call.restype = ctypes.c_uint32
_CapData = _Data * 2  # version 3: 64 capabilities in two words
#: setfs*id(-1) changes nothing and answers the id set.
_ASK = 0xFFFFFFFF
#: /proc/self/uid_map of a process in the initial user namespace: every id maps to itself.
_INITIAL_UID_MAP = ["0", "0", "4294967295"]


@functools.cache
def _host_root() -> bool:
    """Root of the host, not of a user namespace (rootless engines, ``unshare -U``): there,
    root's fsuid is not the host's 0 and ``CAP_SYS_RESOURCE`` is not the host's, so neither
    gets a filesystem's reserve or passes over a quota, and a peer's id may not even be
    mapped."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map", encoding="ascii") as fh:
            return fh.read().split() == _INITIAL_UID_MAP
    except OSError:
        return False


def _capget() -> ctypes.Array[_Data]:
    header, data = _Header(_CAPABILITY_VERSION_3, 0), _CapData()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise _os_error("capget")
    return data


def _capset(data: ctypes.Array[_Data]) -> None:
    header = _Header(_CAPABILITY_VERSION_3, 0)  # pid 0: the calling thread only
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise _os_error("capset")


def _os_error(call: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}")


def _effective(data: ctypes.Array[_Data], capability: int) -> bool:
    return bool(data[capability // 32].effective & (1 << (capability % 32)))


def _without(data: ctypes.Array[_Data], capability: int) -> ctypes.Array[_Data]:
    lowered = _CapData()
    ctypes.memmove(lowered, data, ctypes.sizeof(data))
    lowered[capability // 32].effective &= ~(1 << (capability % 32)) & 0xFFFFFFFF
    return lowered


def _set_fs_ids(uid: int, gid: int) -> tuple[int, int]:
    """This thread's filesystem uid and gid set; the previous ones. (``setfs*id`` says no
    error: asking with -1 changes nothing and answers what is set.)"""
    old_gid = _libc.setfsgid(gid)
    old_uid = _libc.setfsuid(uid)
    now_uid, now_gid = _libc.setfsuid(_ASK), _libc.setfsgid(_ASK)
    if (now_uid, now_gid) != (uid, gid):
        _libc.setfsuid(old_uid)
        _libc.setfsgid(old_gid)
        raise OSError(errno.EPERM, f"could not write as uid {uid}, gid {gid} (the broker's "
                                   f"thread stayed {now_uid}:{now_gid})")
    return old_uid, old_gid


@contextlib.contextmanager
def writing_as(uid: int, gid: int) -> Iterator[None]:
    """Within the block, this thread takes disk space as ``uid``/``gid`` would: their quota,
    no block a filesystem keeps for root (unless they are root). ``CAP_SYS_RESOURCE`` is left
    out whoever the broker is; the filesystem ids change only for the host's root (a broker
    of another uid, or root of a user namespace, gets no reserve by its ids)."""
    caps = _capget()
    lowered = _effective(caps, CAP_SYS_RESOURCE)
    if lowered:
        _capset(_without(caps, CAP_SYS_RESOURCE))
    try:
        if not _host_root():
            yield
            return
        old_uid, old_gid = _set_fs_ids(uid, gid)
        try:
            yield
        finally:
            _set_fs_ids(old_uid, old_gid)  # back to 0 also gives back the file capabilities
    finally:
        if lowered:
            _capset(caps)


@contextlib.contextmanager
def as_broker() -> Iterator[None]:
    """Within ``writing_as``, the broker's own filesystem ids for the block (to open one of
    its own files); elsewhere, nothing changes."""
    ids = _libc.setfsuid(_ASK), _libc.setfsgid(_ASK)
    own = os.geteuid(), os.getegid()
    if ids == own:
        yield
        return
    _set_fs_ids(*own)
    try:
        yield
    finally:
        _set_fs_ids(*ids)

"""Which filesystem a descriptor is on, from the kernel's tables (never asking the filesystem)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from airlock_broker.fastpath.filesystems import (
    DEFAULT_ALLOWED,
    MAX_TABLE_BYTES,
    filesystem_of,
    mount_id,
    mount_types,
)

MOUNTINFO = (
    "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "35 22 0:31 / /proc rw,nosuid - proc proc rw\n"
    # optional fields, and a mount point with an escaped space and " - " look-alike
    r"61 22 0:52 / /mnt/my\040-\040disk rw shared:30 master:2 - fuse.sshfs host:/x rw" "\n"
    "70 22 0:60 / /var/lib/docker/overlay2/abc/merged rw - overlay overlay rw,lowerdir=/a\n"
    "garbage line\n"
)


def test_mountinfo_types_by_mount_id() -> None:
    assert mount_types(MOUNTINFO) == {22: "ext4", 35: "proc", 61: "fuse.sshfs", 70: "overlay"}


def _fake_proc(root: Path, fd: int, mnt: int, own: str, peer: str | None) -> Path:
    (root / "self" / "fdinfo").mkdir(parents=True)
    (root / "self" / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t02\nmnt_id:\t{mnt}\n")
    (root / "self" / "mountinfo").write_text(own)
    if peer is not None:
        (root / "4242").mkdir()
        (root / "4242" / "mountinfo").write_text(peer)
    return root


def test_a_mount_of_another_namespace_is_found_in_the_peers_table(tmp_path: Path) -> None:
    theirs = "900 1 0:99 / /data rw - xfs /dev/sdb rw\n"
    proc = _fake_proc(tmp_path, 7, 900, MOUNTINFO, theirs)
    assert filesystem_of(7, None, proc) is None  # not in the broker's own namespace
    assert filesystem_of(7, 4242, proc) == "xfs"
    assert filesystem_of(7, 4343, proc) is None  # the peer is gone: unknown, refused


def test_real_descriptors(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with open(tmp_path / "f", "rb") as local, open("/proc/self/status", "rb") as proc:
        assert mount_id(local.fileno()) > 0
        here = filesystem_of(local.fileno())
        # The same answer as the kernel's own view of the directory's mount.
        table = mount_types(Path("/proc/self/mountinfo").read_text())
        assert here == table[mount_id(local.fileno())]
        assert filesystem_of(proc.fileno()) == "proc"
    r, w = os.pipe()
    try:
        assert filesystem_of(r) is None  # pipefs is mounted nowhere: refused
    finally:
        os.close(r)
        os.close(w)
    memfd = os.memfd_create("x")
    try:
        assert filesystem_of(memfd) is None
    finally:
        os.close(memfd)


def test_a_child_in_its_own_mount_namespace_is_seen_through_its_table(tmp_path: Path) -> None:
    """A client in a container: its mount is not in the broker's table, but in its own."""
    if os.geteuid() != 0:
        pytest.fail("needs root (the broker runs as root; so do the tests)")
    script = ("import os,sys,time; os.makedirs(sys.argv[1], exist_ok=True); "
              "os.system(f'mount -t tmpfs -o size=1m none {sys.argv[1]}'); "
              "open(sys.argv[1] + '/f', 'w').write('x'); fd = os.open(sys.argv[1] + '/f', 0); "
              "print(fd, flush=True); time.sleep(30)")
    child = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "python3", "-c",
                              script, str(tmp_path / "m")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        fd_in_child = int(child.stdout.readline())
        fd = os.open(f"/proc/{child.pid}/fd/{fd_in_child}", os.O_RDONLY)
        try:
            assert filesystem_of(fd) is None
            assert filesystem_of(fd, child.pid) == "tmpfs"
        finally:
            os.close(fd)
    finally:
        child.kill()
        child.wait()


def test_the_default_allowlist_is_local_filesystems_only() -> None:
    assert {"ext4", "xfs", "btrfs", "tmpfs", "overlay"} <= DEFAULT_ALLOWED
    assert not {t for t in DEFAULT_ALLOWED if t.startswith("fuse") or t in {"nfs", "nfs4",
                                                                             "cifs", "9p"}}


def test_a_mount_table_is_read_up_to_the_mount_and_no_further(tmp_path: Path) -> None:
    """A user namespace can stack thousands of long-named mounts: a 408 MB table, read whole
    twice per hand-over, took the broker to 941 MiB (found in review). Now a table is read
    line by line up to the mount, at most MAX_TABLE_BYTES: one whose mount lies past that is
    refused (on the code before, 'ext4' was found after reading all of it)."""
    filler = "".join(f"{1000 + i} 1 0:{i} / /n/{'x' * 200} rw - tmpfs tmpfs rw\n"
                     for i in range(MAX_TABLE_BYTES // 200 + 1))
    found = "99 1 253:1 / /data rw - ext4 /dev/vda1 rw\n"
    first = _fake_proc(tmp_path / "first", 5, 99, found + filler, None)
    last = _fake_proc(tmp_path / "last", 5, 99, filler + found, None)
    assert filesystem_of(5, proc=first) == "ext4"
    assert filesystem_of(5, proc=last) is None


def test_a_line_longer_than_any_mount_makes_the_table_unreadable(tmp_path: Path) -> None:
    """Not split: a piece cut from a long line could read as another mount's."""
    table = "98 1 0:1 / /" + "y" * 70_000 + " rw - fuse.x x rw\n99 1 0:2 / / rw - ext4 x rw\n"
    assert filesystem_of(5, proc=_fake_proc(tmp_path, 5, 99, table, None)) is None

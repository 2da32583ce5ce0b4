"""The RAM spool (issue 13): a tmpfs the broker mounts in its state root for inputs whose
declared size fits ``[spool] ram_bytes`` (conversion/input_room.py, sandboxes/workspace.py).

The mount as root: its flags, owner, mode, size and inodes; a dead broker's is reaped and
remounted; a link or someone else's directory in its place is refused; a broker that may not
mount falls back to disk. The claim rules on a fake tmpfs. Then a real gRPC broker on a fake
sandbox: where each job's input and slots went, and what its audit record says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.input_room import RamSpool, SpoolSettings, default_ram_bytes
from airlock_broker.conversion.upload_limits import GiB, MiB, UploadLimits
from airlock_broker.sandboxes import workspace
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.sandboxes.workspace import (
    RAM_SLACK_BYTES,
    JobWorkspace,
    mount_ram_spool,
    new_upload,
    reap_stale,
    slot_spool,
    unmount_ram_spool,
)
from airlock_broker.security import state_dirs
from airlock_broker.security.state_dirs import Problem, StateDirError
from airlock_client import Client, ConversionError
from airlock_sandbox.contract import OUTPUT_NAMES, JobSpec, OutputFormat
from tests.unit.fakes import FakeSandbox, running_broker
from tests.unit.test_broker import PICKLE
from tests.unit.test_spool_space import Disk, SpoolDisk, on_fake_disk

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root (CI runs as root)")


def _mount_of(path: Path) -> tuple[set[str], str, dict[str, str]] | None:
    """(per-mount flags, fstype, superblock options) of what is mounted at ``path``."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            dash = fields.index("-")
            options = dict(o.partition("=")[::2] for o in fields[dash + 3].split(","))
            return set(fields[5].split(",")), fields[dash + 1], options
    return None


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    state_dirs.prepare_root(state)
    yield state
    reap_stale(state)
    unmount_ram_spool(state)


# -- the mount --------------------------------------------------------------------------------


def test_the_ram_spool_is_a_capped_noexec_tmpfs_of_the_brokers_alone(root: Path) -> None:
    ram = mount_ram_spool(root, 32 * MiB)
    assert ram == root / "ram"
    mount = _mount_of(ram)
    assert mount is not None
    flags, fstype, options = mount
    assert fstype == "tmpfs" and {"noexec", "nosuid", "nodev"} <= flags
    assert options["nr_inodes"] == "4096" and options["mode"] == "700"
    st = os.lstat(ram)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (os.geteuid(), os.getegid(), 0o700)
    vfs = os.statvfs(ram)
    assert vfs.f_blocks * vfs.f_frsize == 32 * MiB + RAM_SLACK_BYTES
    # uploads and slots on it, checked like every state dir
    path, fd = new_upload(ram, "job")
    os.close(fd)
    assert os.stat(path).st_dev == st.st_dev
    assert os.stat(ram / "uploads").st_mode & 0o777 == 0o700
    assert slot_spool(root) == ram and slot_spool(root, on_disk=True) == root
    unmount_ram_spool(root)
    assert _mount_of(ram) is None
    assert slot_spool(root) == root  # no RAM spool: every slot on disk


def test_a_ram_spool_left_by_a_dead_broker_is_reaped_and_mounted_again_at_the_new_budget(
        root: Path) -> None:
    ram = mount_ram_spool(root, 16 * MiB)
    assert ram is not None
    _, fd = new_upload(ram, "left-behind")
    os.write(fd, b"x" * MiB)
    os.close(fd)
    slot = JobWorkspace.create(ram, uuid.uuid4().hex, uid=10001, gid=10001,
                               output_bytes=MiB)
    assert _mount_of(slot.out_dir) is not None
    # the broker died here; the next one starts on the same root
    state_dirs.prepare_root(root)
    assert reap_stale(root) == 2
    assert _mount_of(slot.out_dir) is None and not slot.root.exists()
    assert mount_ram_spool(root, 48 * MiB) == ram
    assert [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == str(ram)].__len__() == 1  # not stacked
    vfs = os.statvfs(ram)
    assert vfs.f_blocks * vfs.f_frsize == 48 * MiB + RAM_SLACK_BYTES
    assert os.listdir(ram) == []
    # turned off: unmounted at the next start
    assert mount_ram_spool(root, 0) is None
    assert _mount_of(ram) is None


def test_a_link_in_place_of_the_ram_spool_is_refused_and_never_mounted_over(
        root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (root / "ram").symlink_to(elsewhere)
    with pytest.raises(StateDirError) as refused:
        state_dirs.prepare_root(root)
    assert refused.value.problem is Problem.SYMLINK
    with pytest.raises(StateDirError):
        mount_ram_spool(root, 16 * MiB)
    assert _mount_of(elsewhere) is None
    reap_stale(root)  # nothing behind the link is touched
    assert elsewhere.is_dir()


def test_someone_elses_directory_in_place_of_the_ram_spool_is_refused(root: Path) -> None:
    (root / "ram").mkdir(mode=0o700)
    os.chown(root / "ram", 12345, 12345)
    with pytest.raises(StateDirError) as refused:
        state_dirs.prepare_root(root)
    assert refused.value.problem is Problem.WRONG_OWNER
    with pytest.raises(StateDirError):
        mount_ram_spool(root, 16 * MiB)
    assert _mount_of(root / "ram") is None


def test_a_broker_that_may_not_mount_spools_on_disk_and_says_so_once(
        root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    class NoMount:
        def mount(self, *args: object) -> int:
            return -1

        def umount2(self, *args: object) -> int:
            return 0

    monkeypatch.setattr(workspace, "_libc", NoMount())
    with caplog.at_level(logging.WARNING):
        assert mount_ram_spool(root, 16 * MiB) is None
    lines = [r.getMessage() for r in caplog.records if "RAM spool is off" in r.getMessage()]
    assert len(lines) == 1 and "every input is spooled on disk" in lines[0]
    assert slot_spool(root) == root


# -- the claims -------------------------------------------------------------------------------


def _ram(budget: int, free: int | None = None) -> RamSpool:
    tmpfs = Disk(budget + RAM_SLACK_BYTES, (budget if free is None else free) + RAM_SLACK_BYTES)
    return RamSpool(Path("/state"), Path("/state/ram"), budget, statvfs=tmpfs)


def test_an_input_that_fits_goes_to_ram_and_others_to_disk_with_the_reason() -> None:
    ram = _ram(100 * MiB)
    fits = ram.room(60 * MiB)
    assert (fits.ram, fits.root, fits.disk_slots) == (True, Path("/state/ram"), False)
    assert fits.record() == {"ram": True, "bytes": 60 * MiB}
    over = ram.room(101 * MiB)
    assert (over.ram, over.root, over.disk_slots) == (False, Path("/state"), True)
    assert over.record() == {"ram": False, "bytes": 101 * MiB, "why": "over_budget"}
    assert ram.room(0).why == "undeclared"
    fits.release()


def test_concurrent_claims_never_count_on_the_same_free_bytes() -> None:
    ram = _ram(100 * MiB)
    first = ram.room(60 * MiB)
    second = ram.room(60 * MiB)
    assert first.ram and (second.ram, second.why) == (False, "full")
    third = ram.room(40 * MiB)
    assert third.ram  # exactly the rest
    assert ram.status() == {"budget": 100 * MiB, "used": 0, "claimed": 100 * MiB}
    first.release()
    first.release()  # idempotent
    assert ram.room(60 * MiB).ram


def test_what_finished_uploads_and_live_slots_hold_is_not_free() -> None:
    ram = _ram(100 * MiB, free=30 * MiB)  # 70 MiB held by slots of running jobs
    assert ram.room(31 * MiB).why == "full"
    assert ram.room(30 * MiB).ram


def test_a_budget_of_zero_or_no_mount_puts_every_input_on_disk_with_warm_slots() -> None:
    for ram in (RamSpool(Path("/state"), Path("/state/ram"), 0),
                RamSpool(Path("/state"), None, GiB)):
        room = ram.room(MiB)
        assert (room.ram, room.root, room.why, room.disk_slots) == (False, Path("/state"),
                                                                    "off", False)


def test_the_default_budget_is_a_quarter_of_memory_at_most_8_gib(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree: 1 kB\n")
    assert default_ram_bytes(meminfo) == 24576000 * 1024 // 4
    meminfo.write_text("MemTotal:       65536000 kB\n")
    assert default_ram_bytes(meminfo) == 8 * GiB
    assert default_ram_bytes(tmp_path / "missing") == 0
    assert SpoolSettings().ram_bytes == default_ram_bytes()
    with pytest.raises(ValueError, match="ram_bytes"):
        SpoolSettings(ram_bytes=-1)


def test_the_budget_is_read_from_the_spool_section(tmp_path: Path) -> None:
    path = tmp_path / "airlock.toml"
    path.write_text("[spool]\nram_bytes = 0\n")
    assert BrokerConfig.load(path, state_root=tmp_path, unix_socket=None).spool.ram_bytes == 0
    path.write_text("[spool]\nram_gib = 1\n")
    with pytest.raises(ValueError, match=r"unknown keys in \[spool\]"):
        BrokerConfig.load(path, state_root=tmp_path, unix_socket=None)


# -- a broker ---------------------------------------------------------------------------------

INPUT = PICKLE + b"\x01" * (4 * MiB - len(PICKLE))
OUTPUT = save({"w": np.arange(MiB, dtype=np.float32)})
RESERVE = 100 * MiB


def _writes_output(spec: JobSpec, data: bytes, out: Path) -> int:
    (out / OUTPUT_NAMES[OutputFormat.SAFETENSORS]).write_bytes(OUTPUT)
    return 0


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SpoolDisk:
    return on_fake_disk(monkeypatch, tmp_path / "spool")


@contextlib.contextmanager
def _broker(tmp_path: Path, ram_bytes: int) -> Iterator[tuple[str, FakeSandbox, Path]]:
    spool = tmp_path / "spool"
    config: dict[str, Any] = {
        "pools": PoolSettings(min_warm=1, profiles=("torch", "light")),
        "spool": SpoolSettings(ram_bytes=ram_bytes),
        "upload": UploadLimits(spool_min_free_bytes=RESERVE)}
    settings = BrokerConfig(listen="127.0.0.1:0", state_root=spool, selftest_on_start=False,
                            provenance_key=tmp_path / "provenance-key.pem", **config)
    backend = FakeSandbox(spool, _writes_output)
    with running_broker(settings, backend) as running:
        yield f"127.0.0.1:{running.port}", backend, spool
    assert _mount_of(spool / "ram") is None  # unmounted at shutdown


def _audit(spool: Path) -> dict[str, Any]:
    doc = json.loads((spool / "audit.jsonl").read_text().splitlines()[-1])
    assert isinstance(doc, dict)
    return doc


def _convert(address: str, src: Path, tmp_path: Path, local: bool) -> None:
    with Client(address, retry_attempts=1, local_transfer=local) as client:
        result = client.convert(src, tmp_path / "out.safetensors", target="safetensors")
    assert result.assurance == "integrity_verified"


@pytest.mark.parametrize("local_transfer", [False, True])
def test_an_input_under_the_budget_is_spooled_in_ram_with_warm_slots_beside_it(
        tmp_path: Path, disk: SpoolDisk, local_transfer: bool) -> None:
    import torch

    src = tmp_path / "shard.pt"
    torch.save({"w": torch.arange(MiB, dtype=torch.float32)}, src)
    with _broker(tmp_path, ram_bytes=16 * MiB) as (address, backend, spool):
        _convert(address, src, tmp_path, local_transfer)
        record = _audit(spool)
        assert record["input_room"] == {"ram": True, "bytes": src.stat().st_size}
        assert record["warm_container"] is True
        # every slot, warm ones included, on the RAM spool: the upload was renamed there
        assert set(backend.slot_spools) == {spool / "ram"}
        assert os.listdir(spool / "uploads") == [] and os.listdir(spool / "ram" / "uploads") == []


@pytest.mark.parametrize("local_transfer", [False, True])
def test_an_input_over_the_budget_is_spooled_on_disk_and_its_slots_prepared_there(
        tmp_path: Path, disk: SpoolDisk, local_transfer: bool) -> None:
    import torch

    src = tmp_path / "shard.pt"
    torch.save({"w": torch.arange(MiB, dtype=torch.float32)}, src)
    with _broker(tmp_path, ram_bytes=2 * MiB) as (address, backend, spool):
        warm = len(backend.slot_spools)
        _convert(address, src, tmp_path, local_transfer)
        record = _audit(spool)
        assert record["input_room"] == {"ram": False, "bytes": src.stat().st_size,
                                        "why": "over_budget"}
        assert record["warm_container"] is False  # cold: warm slots are in RAM
        # the integrity reading's slot (it converts the checkpoint alone), on the disk's spool
        assert backend.slot_spools[warm:].count(spool) == 1


def test_a_ram_upload_is_not_charged_to_the_disks_reserve(
        tmp_path: Path, disk: SpoolDisk) -> None:
    """Room on the disk for the answer, not for the upload and then the answer: a RAM
    upload runs, a disk one is refused (on the code before the RAM spool, both were)."""
    src = tmp_path / "shard.bin"
    src.write_bytes(INPUT)
    disk.free = RESERVE + 5 * MiB
    for ram_bytes, refused in ((16 * MiB, False), (0, True)):
        disk.spool = tmp_path / str(ram_bytes) / "spool"
        with _broker(tmp_path / str(ram_bytes), ram_bytes=ram_bytes) as (address, _, spool), \
                Client(address, retry_attempts=1, local_transfer=False) as client:
            if refused:
                with pytest.raises(ConversionError) as full:
                    client.convert(src, tmp_path / "out.safetensors", target="safetensors")
                assert full.value.reason == "SPOOL_FULL"
                assert "this job's output" in str(full.value)
                assert _audit(spool)["input_room"] == {"ram": False, "bytes": len(INPUT),
                                                       "why": "off"}
            else:
                client.convert(src, tmp_path / "out.safetensors", target="safetensors")
                assert _audit(spool)["input_room"]["ram"] is True

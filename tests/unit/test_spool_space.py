"""The spool's free-space reserve, and spool files that cost what their data occupies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airlock_broker.conversion.spool_space import SpoolSpace, SpoolWriter, is_zero
from airlock_broker.conversion.upload_limits import MiB, UploadLimits
from airlock_broker.errors import AirlockError, Reason


class Disk:
    """A fake filesystem of ``size`` bytes, ``free`` of them available."""

    def __init__(self, size: int, free: int) -> None:
        self.size = size
        self.free = free

    def __call__(self, _path: Path) -> os.statvfs_result:
        block = 4096
        return os.statvfs_result((block, block, self.size // block, self.free // block,
                                  self.free // block, 1000, 1000, 1000, 0, 255))


class SpoolDisk(Disk):
    """The spool's disk: ``free`` bytes available before what the spool's files on it
    occupy. A RAM spool under it (input_room.py) is another filesystem: its files are not
    counted; nor are a fake sandbox's outputs (``slots/<id>/out``), which a real sandbox
    writes on a tmpfs of its own."""

    def __init__(self, spool: Path, free: int = 1000 * MiB) -> None:
        super().__init__(1000 * MiB, free)
        self.spool = spool

    def __call__(self, path: Path) -> os.statvfs_result:
        device = os.stat(self.spool).st_dev
        used = 0
        for d, _, files in os.walk(self.spool):
            if Path(d).name == "out" and Path(d).parent.parent.name == "slots":
                continue
            for f in files:
                st = os.lstat(os.path.join(d, f))
                used += st.st_blocks * 512 if st.st_dev == device else 0
        free, self.free = self.free, self.free - used
        try:
            return super().__call__(path)
        finally:
            self.free = free


def on_fake_disk(monkeypatch: pytest.MonkeyPatch, spool: Path) -> SpoolDisk:
    """Put the broker's spool on a fake disk (``SpoolSpace``: its only seam to it)."""
    from airlock_broker.api import server

    fake = SpoolDisk(spool)

    def space(root: Path, limits: UploadLimits) -> SpoolSpace:
        return SpoolSpace(root, limits, statvfs=fake)

    monkeypatch.setattr(server, "SpoolSpace", space)
    return fake


def _space(disk: Disk, reserve: int = 100 * MiB, ratio: float = 0.0) -> SpoolSpace:
    return SpoolSpace(Path("/spool"), UploadLimits(spool_min_free_bytes=reserve,
                                                   spool_min_free_ratio=ratio), statvfs=disk)


def test_an_answer_claimed_at_its_size_is_refused_and_promises_no_more_than_before() -> None:
    space = _space(Disk(1000 * MiB, 300 * MiB))
    answer = space.claim(10 * MiB, "this job's output")
    answer.expect(150 * MiB)  # its real size, once known: fits
    with pytest.raises(AirlockError) as full:
        answer.expect(250 * MiB)
    assert full.value.reason is Reason.SPOOL_FULL and "needs 250.0 MiB" in full.value.message
    space.claim(50 * MiB).release()  # the refused 250 MiB are not promised: 150 + 50 fit
    with pytest.raises(AirlockError):
        space.claim(51 * MiB)
    answer.release()


def test_an_upload_that_would_cross_the_reserve_is_refused_before_it_writes() -> None:
    space = _space(Disk(1000 * MiB, 300 * MiB))
    space.claim(200 * MiB).release()  # exactly down to the reserve: fine
    with pytest.raises(AirlockError) as full:
        space.claim(201 * MiB)
    assert full.value.reason is Reason.SPOOL_FULL
    message = full.value.message
    assert "300.0 MiB free" in message and "needs 201.0 MiB" in message
    assert "keeps 100.0 MiB free" in message and "spool_min_free_bytes" in message


def test_the_reserve_is_the_larger_of_bytes_and_ratio() -> None:
    space = _space(Disk(1000 * MiB, 300 * MiB), reserve=10 * MiB, ratio=0.25)
    with pytest.raises(AirlockError, match=r"keeps 250.0 MiB free"):
        space.claim(60 * MiB)


def test_uploads_in_progress_count_for_what_they_may_still_write() -> None:
    disk = Disk(1000 * MiB, 300 * MiB)
    space = _space(disk)
    first = space.claim(150 * MiB)
    with pytest.raises(AirlockError, match=r"150.0 MiB of it promised"):
        space.claim(100 * MiB)
    first.wrote(100 * MiB)
    disk.free -= 100 * MiB  # what it wrote is on the disk now, no longer promised
    with pytest.raises(AirlockError, match=r"50.0 MiB of it promised"):
        space.claim(100 * MiB)
    first.release()
    space.claim(100 * MiB).release()


def test_an_upload_that_outgrows_its_claim_is_stopped_at_the_reserve() -> None:
    disk = Disk(1000 * MiB, 300 * MiB)
    claim = _space(disk).claim(0)  # undeclared size: accounted as it grows
    for _ in range(50):  # 200 MiB: the disk is at the reserve, no room for the next block
        claim.wrote(4 * MiB)
        disk.free -= 4 * MiB
    with pytest.raises(AirlockError) as full:
        claim.wrote(4 * MiB)
    assert full.value.reason is Reason.SPOOL_FULL


def test_the_disk_filling_up_under_a_running_upload_stops_it() -> None:
    disk = Disk(1000 * MiB, 300 * MiB)
    claim = _space(disk).claim(100 * MiB)
    claim.wrote(MiB)  # within the claim, and not 4 MiB since the last look: not asked
    disk.free = 150 * MiB  # someone else wrote 150 MiB
    with pytest.raises(AirlockError, match="SPOOL_FULL"):
        claim.wrote(4 * MiB)


def test_all_zero_blocks_stay_holes_and_are_not_counted(tmp_path: Path) -> None:
    claim = _space(Disk(10**12, 10**11)).claim(0)
    fd = os.open(tmp_path / "spool", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        writer = SpoolWriter(fd, claim)
        block = bytearray(4 * MiB)
        for i in range(16):  # 64 MiB of zeros, one byte of data
            writer.write(block, i * len(block))
        writer.write(b"\x80", 64 * MiB)
        writer.finish(64 * MiB + 1 + 4096)
    finally:
        os.close(fd)
    st = os.stat(tmp_path / "spool")
    assert st.st_size == 64 * MiB + 1 + 4096
    assert st.st_blocks * 512 <= 64 * 1024  # one block of data, not 64 MiB
    assert claim.written == 1 and writer.data_bytes == 1
    with open(tmp_path / "spool", "rb") as fh:
        fh.seek(64 * MiB)
        assert fh.read(2) == b"\x80\x00"


@pytest.mark.parametrize(("data", "zero"), [
    (b"", False), (b"\0", True), (bytes(10 * MiB), True), (bytearray(4 * MiB), True),
    (bytearray(100), True), (b"\0" * 50 + b"\1" + b"\0" * 50, False), (b"\1" + bytes(9), False),
    (bytes(9) + b"\1", False),
])
def test_is_zero(data: bytes, zero: bool) -> None:
    assert is_zero(data) is zero


def test_without_holes_zero_blocks_are_written_and_still_not_data(tmp_path: Path) -> None:
    """The RAM spool's writer: zeros written (no hole for a sandbox to fault in), but the
    input's data, which its answer is estimated from, is what was not zero."""
    fd = os.open(tmp_path / "spool", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        writer = SpoolWriter(fd, None, holes=False)
        writer.write(bytearray(4 * MiB), 0)
        writer.write(b"\x80", 4 * MiB)
        writer.finish(4 * MiB + 1)
    finally:
        os.close(fd)
    assert os.stat(tmp_path / "spool").st_blocks * 512 >= 4 * MiB
    assert writer.data_bytes == 1


def test_one_callers_uploads_hold_at_most_their_share_of_the_room() -> None:
    """Found in review: uploads are promised their declared size before a byte arrives, and
    one caller's few 16 GiB uploads of zeros (holes: the disk stays empty), sent at the
    minimum rate, had every other caller's refused SPOOL_FULL for hours."""
    disk = Disk(1000 * MiB, 500 * MiB)  # 400 MiB above the 100 MiB reserve: 200 a caller
    space = _space(disk)
    alice = space.claim(150 * MiB, owner="alice")
    with pytest.raises(AirlockError) as refused:
        space.claim(100 * MiB, owner="alice")
    assert refused.value.reason is Reason.SPOOL_FULL
    message = refused.value.message
    assert "your uploads in progress may still write 150.0 MiB" in message
    assert "at most 200.0 MiB, 50% of its 400.0 MiB free above the reserve" in message
    assert "spool_share_per_caller" in message
    bob = space.claim(200 * MiB, owner="bob")  # another caller's share is whole
    answer = space.claim(40 * MiB, "this job's output")  # answers count for no caller
    bob.release()
    answer.release()
    alice.wrote(100 * MiB)  # what arrived is on the disk, no longer a promise
    disk.free -= 100 * MiB
    space.claim(100 * MiB, owner="alice").release()  # 50 + 100 of 300 MiB's half: fits
    with pytest.raises(AirlockError, match=r"at most 150\.0 MiB"):
        space.claim(101 * MiB, owner="alice")
    alice.release()


def test_with_no_share_one_caller_may_promise_the_whole_room() -> None:
    space = SpoolSpace(Path("/spool"), UploadLimits(spool_min_free_bytes=100 * MiB,
                                                    spool_share_per_caller=1.0),
                       statvfs=Disk(1000 * MiB, 500 * MiB))
    claims = [space.claim(200 * MiB, owner="alice"), space.claim(200 * MiB, owner="alice")]
    for claim in claims:
        claim.release()
    with pytest.raises(ValueError, match="spool_share_per_caller"):
        UploadLimits(spool_share_per_caller=0)


def test_an_upload_promised_once_is_not_stopped_for_its_share_as_others_write() -> None:
    """Found in the review of the share: it was checked again as an upload grew, against a
    room that shrank as another caller wrote what it had been promised, and an upload
    already accepted was stopped half way."""
    disk = Disk(1000 * MiB, 500 * MiB)  # 400 MiB above the reserve: 200 a caller
    space = _space(disk)
    alice = [space.claim(100 * MiB, owner="alice"), space.claim(100 * MiB, owner="alice")]
    bob = space.claim(100 * MiB, owner="bob")
    bob.wrote(40 * MiB)
    disk.free -= 40 * MiB  # bob's data: the room above the reserve is 360 MiB now
    alice[0].wrote(8 * MiB)  # checked again (4 MiB since the last look): still fits
    disk.free -= 8 * MiB
    for claim in (*alice, bob):
        claim.release()

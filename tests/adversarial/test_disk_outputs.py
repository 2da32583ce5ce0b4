"""Outputs too large for RAM (issue #13): a job whose output may not fit the sandbox's output
tmpfs writes it to a disk-backed filesystem the broker mounts for it (sandboxes/workspace.py),
sized from the input (conversion/output_room.py). Real engine and image, on each runtime.

The broker here has a 16 MiB output tmpfs, so every safetensors job takes the disk-backed
path (its room is the input's data, a quarter more and 64 MiB). A benign checkpoint converts
through it, integrity-verified, byte for byte, its input in the RAM spool and the images on
the disk; a payload that fills it stops at its room, and what it wrote leaves nothing behind
on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock_broker.conversion.output_room import HEADROOM_BYTES
from airlock_client import Client
from tests.adversarial import payloads
from tests.adversarial.oracles import (
    Observers,
    assert_contained,
    findings,
    observers,  # noqa: F401  (fixture)
    run_case,
)
from tests.adversarial.sabotage import make_sabotaged_checkpoint
from tests.conftest import IMAGE, BrokerProcess, run_cli, start_broker

pytestmark = pytest.mark.adversarial

MiB = 1024**2
TMPFS_OUTPUT_BYTES = 16 * MiB


@pytest.fixture(scope="module", params=["runc", "runsc"])
def broker(request, docker_client, tmp_path_factory) -> Iterator[BrokerProcess]:  # type: ignore[no-untyped-def]
    """Cold containers only: a disk-backed job never takes a warm one (its output is fixed
    when its container is made)."""
    home = tmp_path_factory.mktemp(f"disk-broker-{request.param}")
    config = home / "airlock.toml"
    config.write_text(f"[sandbox]\nimage = {IMAGE!r}\noutput_bytes = {TMPFS_OUTPUT_BYTES}\n\n"
                      "[pools]\nmin_warm = 0\n")
    proc = start_broker(home, "--runtime", request.param, "--config", str(config))
    proc.runtime = request.param  # type: ignore[attr-defined]
    yield proc
    code = proc.stop()
    assert code == 0, f"broker exited {code}:\n{proc.log.read_text()[-3000:]}"


def _mounts_under(root: Path) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(root))]


def _loops_backed_under(root: Path, deadline: float = 60.0) -> list[str]:
    """Loop devices whose backing file is (or was, "(deleted)") under ``root``: an image the
    unmount did not release keeps its blocks. Polled until none or the deadline."""
    ends = time.monotonic() + deadline
    while True:
        left = []
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            with contextlib.suppress(OSError):  # a device detached meanwhile
                name = backing.read_text().strip().removesuffix(" (deleted)")
                if Path(name).is_relative_to(root.resolve()) or Path(name).is_relative_to(root):
                    left.append(f"{backing.parent.parent.name}: {name}")
        if not left or time.monotonic() > ends:
            return left
        time.sleep(0.1)


def _slots_cleared(broker: BrokerProcess, deadline: float = 60.0) -> list[str]:
    """What is left of the job's slots once the broker has destroyed them (in the background,
    after the answer): mounts and images; polled until none or the deadline."""
    ends = time.monotonic() + deadline
    while True:
        left = [m for m in _mounts_under(broker.state)
                if m != str(broker.state / "ram")] + [  # the RAM spool lives with the broker
            str(p) for p in (broker.state / "images").iterdir()]
        if not left or time.monotonic() > ends:
            return left
        time.sleep(0.1)


def _last_audit(broker: BrokerProcess) -> dict[str, object]:
    doc = json.loads(broker.audit.read_text().splitlines()[-1])
    assert isinstance(doc, dict)
    return doc


def test_a_checkpoint_too_large_for_the_tmpfs_converts_through_a_disk_backed_output(
        broker: BrokerProcess, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    # 48 MiB of random weights: three times the tmpfs, and dense (holes would not count).
    weights = {f"layer.{i}.weight": torch.randn(1024, 4096) for i in range(3)}
    artifact = tmp_path / "shard.pt"
    torch.save(weights, artifact)
    output = tmp_path / "shard.safetensors"
    with Client(broker.address) as client:
        result = client.convert(artifact, output, target="safetensors")
    assert result.assurance == "integrity_verified", result.integrity_note
    assert result.size > TMPFS_OUTPUT_BYTES
    got = load_file(str(output))
    assert sorted(got) == sorted(weights)
    assert all(torch.equal(got[name], weights[name]) for name in weights)
    size = artifact.stat().st_size
    record = _last_audit(broker)
    room = record["output_room"]
    assert room == {"bytes": size + size // 4 + HEADROOM_BYTES, "on_disk": True}, room
    # Its input fits the RAM spool (default budget: a quarter of the host's memory): it was
    # spooled there, not written to the disk the images are on.
    assert record["input_room"] == {"ram": True, "bytes": size}, record["input_room"]
    # Its reading reported the digest of its data instead of writing a second copy.
    assert record["integrity_compared"] == "data_digest", record
    # Both sandboxes' filesystems and images are gone with them.
    assert _slots_cleared(broker) == []


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_silent_sabotage_is_rejected_when_the_reading_reports_a_digest(
        broker: BrokerProcess, tmp_path: Path, layout: str) -> None:
    """The payload tampers with the converter (test_integrity.py); here the output is on
    disk, so the reading that executes nothing reports its data's sha256 instead of writing
    it, and that digest must catch the tampering as the byte comparison does."""
    artifact, _truth = make_sabotaged_checkpoint(tmp_path / "sabotaged.pt",
                                                 legacy=layout == "legacy")
    output = tmp_path / "out.safetensors"
    done = run_cli("convert", str(artifact), "-o", str(output), "--json",
                   server=broker.address)
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert (doc["status"], doc["reason"]) == ("rejected", "INTEGRITY_MISMATCH"), doc
    assert "data differs" in doc["message"], doc
    record = _last_audit(broker)
    assert record["integrity_compared"] == "data_digest", record
    assert record["output_room"]["on_disk"] is True  # type: ignore[index]
    assert not output.exists()
    assert _slots_cleared(broker) == []


def test_a_payload_filling_its_disk_backed_output_stops_at_the_room_it_was_given(
        broker: BrokerProcess, docker_client, observers: Observers,  # noqa: F811
        tmp_path: Path) -> None:
    artifact = payloads.write_carrier(
        tmp_path / "C6d.npy", "npy",
        payloads.probe_source("C6d", payloads.DISK_FILL, byte_bound=1024 * MiB,
                              inode_bound=100_000))
    occupied = os.stat(artifact).st_blocks * 512
    room = min(occupied, artifact.stat().st_size)
    room += room // 4 + HEADROOM_BYTES
    case = run_case(broker, artifact, "--timeout", "90")
    found = findings(case, "C6d")
    assert found["out.bytes_error"] in {"ENOSPC", "EFBIG"}, found
    # More than the tmpfs would have held; never more than the room (ext4's own metadata
    # takes a few MiB of it).
    assert TMPFS_OUTPUT_BYTES < int(found["out.bytes"]) <= room, (room, found)
    assert found["out.inodes_error"] == "ENOSPC" and int(found["out.inodes"]) < 1024, found
    assert _last_audit(broker)["output_room"] == {"bytes": room, "on_disk": True}
    # What it wrote went with its image: no mount, no image file, and no loop device still
    # holding a deleted image (its blocks would stay taken). Asked of the kernel rather than
    # of the disk's free space, which every other writer on a busy machine moves.
    assert _slots_cleared(broker) == []
    assert _loops_backed_under(broker.state) == []
    assert_contained(case, broker, docker_client, observers, tmp_path, "ok")

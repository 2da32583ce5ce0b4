"""One caller's uploads in progress hold at most its share of the RAM spool
(``[upload] spool_share_per_caller``; input_room.py). Found in review: a caller with the
convert role declared one upload as large as the RAM spool's budget and sent it at the
minimum rate (or, with its grace, not at all): every other caller's input went to the disk
spool (``why: full``) and so every job of theirs to the cold path (a container started for
it), for as long as the upload lasted (a declared 4 GiB at 1 MiB/s: 68 minutes)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.input_room import RamSpool, SpoolSettings
from airlock_broker.conversion.upload_limits import MiB, UploadLimits
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_broker.sandboxes.workspace import RAM_SLACK_BYTES
from airlock_broker.security.auth_config import (
    AuthConfig,
    Role,
    TokenEntry,
    mint_token,
    token_digest,
)
from airlock_client import Client
from tests.unit.fakes import FakeSandbox, running_broker
from tests.unit.test_ram_spool import INPUT, RESERVE, _writes_output
from tests.unit.test_spool_space import Disk, SpoolDisk, on_fake_disk

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root (CI runs as root)")


def _ram(budget: int, share: float = 0.5) -> RamSpool:
    tmpfs = Disk(budget + RAM_SLACK_BYTES, budget + RAM_SLACK_BYTES)
    return RamSpool(Path("/state"), Path("/state/ram"), budget, statvfs=tmpfs, share=share)


def test_one_callers_uploads_hold_at_most_their_share_of_the_ram_spool() -> None:
    ram = _ram(100 * MiB)
    greedy = ram.room(100 * MiB, owner="mallory")  # the whole budget: over its share
    assert (greedy.ram, greedy.why, greedy.disk_slots) == (False, "share", True)
    first = ram.room(50 * MiB, owner="mallory")
    assert first.ram
    second = ram.room(MiB, owner="mallory")  # its share is taken: on disk
    assert (second.ram, second.why) == (False, "share")
    other = ram.room(50 * MiB, owner="alice")  # another caller's still fits
    assert other.ram
    first.release()
    assert ram.room(50 * MiB, owner="mallory").ram
    # Written, an input is the tmpfs's own (its statvfs says so), but its caller's until its
    # job is done: the caller's next input goes to disk, another caller's fits.
    tmpfs = Disk(100 * MiB + RAM_SLACK_BYTES, 100 * MiB + RAM_SLACK_BYTES)
    ram = RamSpool(Path("/state"), Path("/state/ram"), 100 * MiB, statvfs=tmpfs, share=0.5)
    held = ram.room(50 * MiB, owner="mallory")
    held.written()
    tmpfs.free -= 50 * MiB
    assert ram.room(50 * MiB, owner="mallory").why == "share"
    assert ram.room(50 * MiB, owner="alice").ram
    held.release()  # its job is done
    tmpfs.free += 50 * MiB
    assert ram.room(50 * MiB, owner="mallory").ram
    # No owner (nobody to count it against), or a share of 1: the budget alone.
    assert _ram(100 * MiB).room(100 * MiB).ram
    assert _ram(100 * MiB, share=1.0).room(100 * MiB, owner="mallory").ram


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SpoolDisk:
    return on_fake_disk(monkeypatch, tmp_path / "spool")


def _last_audit(spool: Path, principal: str) -> dict[str, Any]:
    for line in reversed((spool / "audit.jsonl").read_text().splitlines()):
        doc = json.loads(line)
        if doc.get("principal") == principal and doc.get("outcome") == "ok":
            assert isinstance(doc, dict)
            return doc
    raise AssertionError(f"no job of {principal} in the audit log")


def test_a_callers_stalled_upload_cannot_send_everyone_elses_jobs_down_the_cold_path(
        tmp_path: Path, disk: SpoolDisk) -> None:
    mallory, bob, auth = _two_callers()
    spool = tmp_path / "spool"
    budget = 16 * MiB
    settings = BrokerConfig(
        listen="127.0.0.1:0", state_root=spool, selftest_on_start=False,
        provenance_key=tmp_path / "provenance-key.pem", verify_integrity=False, auth=auth,
        pools=PoolSettings(min_warm=1, profiles=("sklearn",)),
        spool=SpoolSettings(ram_bytes=budget),
        # The stalled upload is not cut off while the test runs (the pace is not the subject).
        upload=UploadLimits(spool_min_free_bytes=RESERVE, grace_seconds=600,
                            min_bytes_per_second=0))
    backend = FakeSandbox(spool, _writes_output)
    hold = threading.Event()

    def stalled() -> Iterator[pb.ConvertRequest]:
        yield pb.ConvertRequest(metadata=pb.ConvertMetadata(size_bytes=budget))
        hold.wait(120)

    with running_broker(settings, backend) as running:
        address = f"127.0.0.1:{running.port}"
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.ConversionServiceStub(channel)
        call = stub.Convert(stalled(), metadata=(("authorization", f"Bearer {mallory}"),),
                            timeout=120)

        def drain() -> None:
            with contextlib.suppress(grpc.RpcError):
                list(call)

        waiter = threading.Thread(target=drain)
        try:
            waiter.start()
            _wait_for_upload(spool)
            _bob_converts_from_ram_on_a_warm_container(address, bob, tmp_path, spool)
        finally:
            hold.set()
            call.cancel()
            waiter.join(60)
            channel.close()


def _two_callers() -> tuple[str, str, AuthConfig]:
    """Tokens of mallory and bob, each with the convert role, and the broker's auth for them."""
    mallory, bob = mint_token(), mint_token()
    return mallory, bob, AuthConfig(tokens=(
        TokenEntry("mallory", frozenset({Role.CONVERT}), token_digest(mallory)),
        TokenEntry("bob", frozenset({Role.CONVERT}), token_digest(bob))))


def _bob_converts_from_ram_on_a_warm_container(address: str, bob: str, tmp_path: Path,
                                               spool: Path) -> None:
    """Another caller's conversion, while mallory holds what she can: its input was kept in
    the RAM spool and its job took a warm container (its audit record says both)."""
    src = tmp_path / "bob.bin"
    src.write_bytes(INPUT)
    with Client(address, token=bob, retry_attempts=1, local_transfer=False) as client:
        client.convert(src, tmp_path / "bob.safetensors", target="safetensors")
    record = _last_audit(spool, "bob")
    assert record["input_room"] == {"ram": True, "bytes": len(INPUT)}
    assert record["warm_container"] is True


def _wait_for_upload(spool: Path) -> None:
    """Until mallory's upload is under way (its spool file exists, in RAM or on disk)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for uploads in (spool / "ram" / "uploads", spool / "uploads"):
            with contextlib.suppress(OSError):
                if os.listdir(uploads):
                    return
        time.sleep(0.02)
    raise AssertionError("mallory's upload never began")


def test_inputs_sent_whole_count_in_their_callers_share_until_their_jobs_end(
        tmp_path: Path, disk: SpoolDisk) -> None:
    """The same caller sends two inputs of half the budget each, whole, whose jobs sleep
    until their deadline (or wait for a run slot): every other caller's input went to disk
    for as long, as with one stalled upload."""
    from tests.unit.test_broker import PICKLE

    mallory, bob, auth = _two_callers()
    spool = tmp_path / "spool"
    budget = 16 * MiB
    sleeper = PICKLE + b"\x02" * (budget // 2 - 64 * 1024 - len(PICKLE))  # two fit

    def behaviour(spec: Any, data: bytes, out: Path) -> int | None:
        return None if data == sleeper else _writes_output(spec, data, out)  # None: sleeps

    settings = BrokerConfig(
        listen="127.0.0.1:0", state_root=spool, selftest_on_start=False,
        provenance_key=tmp_path / "provenance-key.pem", verify_integrity=False, auth=auth,
        max_concurrent_jobs=3, pools=PoolSettings(min_warm=1, profiles=("sklearn",)),
        spool=SpoolSettings(ram_bytes=budget),
        upload=UploadLimits(spool_min_free_bytes=RESERVE))
    backend = FakeSandbox(spool, behaviour)
    src = tmp_path / "sleeper.pkl"
    src.write_bytes(sleeper)
    threads: list[threading.Thread] = []

    def as_mallory(address: str, n: int) -> None:
        with contextlib.suppress(Exception), \
                Client(address, token=mallory, retry_attempts=1, local_transfer=False) as c:
            c.convert(src, tmp_path / f"m{n}.safetensors", target="safetensors",
                      job_timeout=60)

    with running_broker(settings, backend) as running:
        address = f"127.0.0.1:{running.port}"
        for n in range(2):
            threads.append(threading.Thread(target=as_mallory, args=(address, n)))
            threads[-1].start()
            deadline = time.monotonic() + 30
            while len(backend.specs) < n + 1:  # its job runs (and sleeps)
                assert time.monotonic() < deadline, "mallory's job never ran"
                time.sleep(0.02)
        _bob_converts_from_ram_on_a_warm_container(address, bob, tmp_path, spool)
    for thread in threads:  # the broker's stop cancelled mallory's jobs
        thread.join(60)

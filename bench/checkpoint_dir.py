"""S7: a sharded Hugging Face-style PyTorch checkpoint to a safetensors directory, against the
unsafe in-process equivalent of Hugging Face's ``convert_multi``.

The checkpoint is built here, in the benchmark's temporary directory, with torch: ``shards``
``pytorch_model-0000N-of-0000M.bin`` files (``torch.save`` of a state dict of 64 MiB float32
layers filled with ``arange`` data: no all-zero block, so no spool file is a hole) named by a
``pytorch_model.bin.index.json``, beside a ``config.json`` and a ``tokenizer.json``. Building
it is setup, timed apart and kept off the measured time; the whole directory is deleted with
the work directory.

The baseline (UNSAFE, see ``bench.baseline``) is what ``convert_multi`` does: for each shard
``torch.load(weights_only=True)`` and ``safetensors.torch.save_file``, then the index, in the
benchmark's process. Airlock's figure is ``Client.convert_directory`` over the broker's
same-host path (each shard its own sandbox, integrity-verified by a second one, the output
renamed into place). While it runs the broker's RSS is sampled, and so are the bytes the
broker holds under its state root: on the spool's disk (uploads, answers) and in output
tmpfs (RAM), each peak reported.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from airlock_client import Client
from bench import baseline, host
from bench.broker import BenchError, Broker, RssSampler, proc_status
from bench.sampling import ThreadedSampler

MiB = 1024 * 1024
GiB = 1024 * MiB
#: One layer: 4096 x 4096 float32.
LAYER_ELEMENTS = 16 * MiB
#: Shards converted at once: each takes two sandboxes (conversion and integrity reading) and
#: two output tmpfs of a shard's size (RAM), so 2 keeps an 8 GiB run within 8 GiB of them.
JOBS = 2


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    shards: list[Path]
    total_bytes: int
    setup_s: float


def build(root: Path, total_bytes: int, shards: int = 4) -> Checkpoint:
    """A sharded checkpoint of about ``total_bytes`` of float32 under ``root``."""
    import torch

    began = time.perf_counter()
    root.mkdir(parents=True)
    layers = max(total_bytes // (LAYER_ELEMENTS * 4), shards)
    per_shard = -(-layers // shards)
    weight_map: dict[str, str] = {}
    paths: list[Path] = []
    total = 0
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        state: dict[str, Any] = {}
        for i in range(s * per_shard, min((s + 1) * per_shard, layers)):
            key = f"model.layers.{i}.weight"
            state[key] = torch.arange(LAYER_ELEMENTS, dtype=torch.float32).add_(i + 1)
            weight_map[key] = name
            total += LAYER_ELEMENTS * 4
        torch.save(state, root / name)
        del state
        paths.append(root / name)
    (root / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(json.dumps(
        {"architectures": ["BenchModel"], "model_type": "bench", "num_hidden_layers": layers}))
    (root / "tokenizer.json").write_text(json.dumps(
        {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}}))
    return Checkpoint(root, paths, total, time.perf_counter() - began)


def convert_multi(checkpoint: Checkpoint, out: Path) -> int:
    """UNSAFE: Hugging Face's ``convert_multi`` in process (each shard ``torch.load`` with
    ``weights_only=True``, then ``save_file``; the index; the data files copied). Returns the
    bytes written."""
    out.mkdir()
    weight_map: dict[str, str] = {}
    written = 0
    n = len(checkpoint.shards)
    for i, shard in enumerate(checkpoint.shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        written += baseline.state_dict_to_safetensors(shard, out / name)
        weight_map.update(dict.fromkeys(_keys_of(checkpoint, shard), name))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": checkpoint.total_bytes}, "weight_map": weight_map}))
    for extra in ("config.json", "tokenizer.json"):
        shutil.copyfile(checkpoint.root / extra, out / extra)
    return written


def _keys_of(checkpoint: Checkpoint, shard: Path) -> list[str]:
    index = json.loads((checkpoint.root / "pytorch_model.bin.index.json").read_text())
    return [k for k, v in index["weight_map"].items() if v == shard.name]


def held_under(root: Path) -> tuple[int, int, int]:
    """Bytes the broker holds under its state root now: on the spool's own disk (allocated
    blocks of uploads, answers, slot inputs), in the RAM spool (``ram/``: inputs that fit its
    budget) and on the other filesystems mounted in it (the output tmpfs: RAM; a disk-backed
    output's ext4 image: what is written in it, whose blocks the image file also holds on
    the disk). A file hard-linked twice (the input, into the integrity reading's slot) counts
    once."""
    device = os.stat(root).st_dev
    ram = root / "ram"
    ram_device = os.stat(ram).st_dev if ram.is_dir() else device
    disk = tmpfs = spool_ram = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue  # gone meanwhile
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if st.st_dev == device:
                disk += st.st_blocks * 512
            elif st.st_dev == ram_device:
                spool_ram += st.st_blocks * 512
            else:
                tmpfs += st.st_blocks * 512
    return disk, tmpfs, spool_ram


@dataclass
class SpoolSampler(ThreadedSampler):
    """Peaks of ``held_under(root)`` over what it held when sampling began (``before``): what
    the jobs under way add. The broker may still hold earlier jobs' files: the results it keeps
    for a retried call's replay (``[idempotency]``, up to 1 GiB for 10 minutes by default;
    after S3 in a full run, 0.9-1.5 GB of its 400 MiB results), which are not this job's."""

    root: Path
    interval: float = 0.2
    before: tuple[int, int, int] = (0, 0, 0)
    peak_disk: int = 0
    peak_tmpfs: int = 0
    peak_ram_spool: int = 0

    def __enter__(self) -> Self:
        self.before = held_under(self.root)
        return super().__enter__()

    def _run(self) -> None:
        while not self._stop.is_set():
            disk, tmpfs, spool_ram = (max(0, now - was) for now, was
                                      in zip(held_under(self.root), self.before, strict=True))
            self.peak_disk = max(self.peak_disk, disk)
            self.peak_tmpfs = max(self.peak_tmpfs, tmpfs)
            self.peak_ram_spool = max(self.peak_ram_spool, spool_ram)
            self._stop.wait(self.interval)


def scenario(broker: Broker, total_bytes: int, work: Path, shards: int = 4) -> dict[str, Any]:
    """S7 on the warm broker: build the checkpoint (untimed), convert it in process, then
    through Airlock (same-host path), outputs deleted after each. S7d is the same with one
    shard too large for the output tmpfs: its two sandboxes write disk-backed outputs."""
    checkpoint = build(work / "s7-checkpoint", total_bytes, shards)
    size = sum(p.stat().st_size for p in checkpoint.root.iterdir())
    base_out = work / "s7-baseline"
    broker.wait_ready()
    # Each side starts with no dirty page to write back (the build's 8 GiB, the other side's).
    host.settle_disk()
    began = time.perf_counter()
    with RssSampler(os.getpid()) as own:
        convert_multi(checkpoint, base_out)
    base_s = time.perf_counter() - began
    shutil.rmtree(base_out)
    broker.wait_ready()
    host.settle_disk()
    out = work / "s7-airlock"
    idle_rss = proc_status(broker.pid).get("VmRSS", 0)
    with Client(f"unix:{broker.socket}", timeout=3600, retry_attempts=1) as client, \
            RssSampler(broker.pid) as rss, SpoolSampler(broker.spool) as spool:
        began = time.perf_counter()
        result = client.convert_directory(checkpoint.root, out, jobs=JOBS, job_timeout=600)
        air_s = time.perf_counter() - began
        transfer = client.last_transfer
    out_bytes = sum(p.stat().st_size for p in out.iterdir())
    if len(result.shards) != len(checkpoint.shards) or result.total_size != checkpoint.total_bytes:
        raise BenchError(f"unexpected result: {result}")
    shutil.rmtree(out)
    shutil.rmtree(checkpoint.root)
    return {
        "input_bytes": size, "tensor_bytes": checkpoint.total_bytes,
        "shards": len(checkpoint.shards), "output_bytes": out_bytes, "jobs": JOBS,
        "transfer": transfer, "assurance": str(result.assurance),
        "carried": list(result.carried),
        "airlock_s": round(air_s, 2), "baseline_s": round(base_s, 2),
        "ratio": round(air_s / base_s, 2),
        "airlock_gib_per_s": round(checkpoint.total_bytes / GiB / air_s, 3),
        "broker_peak_rss_mib": round(rss.peak / MiB, 1),
        "broker_idle_rss_mib": round(idle_rss / MiB, 1),
        "baseline_peak_rss_mib": round(own.peak / MiB, 1),
        "temp_disk_peak_bytes": spool.peak_disk,
        "temp_disk_peak_over_input": round(spool.peak_disk / size, 2),
        "output_tmpfs_peak_bytes": spool.peak_tmpfs,
        "ram_spool_peak_bytes": spool.peak_ram_spool,
        "setup_s": round(checkpoint.setup_s, 1),
        "held_before_bytes": sum(spool.before),
    }

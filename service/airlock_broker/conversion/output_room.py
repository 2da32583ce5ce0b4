"""Where a job's sandboxes write their output, and how much each may write: decided once.

Every container has an output filesystem the broker mounted (sandboxes/workspace.py). A warm
container's is a tmpfs of ``[sandbox] output_bytes``: RAM, charged to the sandbox's memory as
the worker writes it, which is right for ONNX graphs and for checkpoints of a few GiB. A
safetensors shard of many GiB would need that much RAM twice (the conversion's sandbox and
the integrity reading's), so a job whose output may not fit the tmpfs gets a disk-backed
filesystem on the spool instead, sized from its input and prepared for it (``Pools.acquire``),
up to ``[sandbox] disk_output_bytes``: its bytes go through the page cache to the spool's
disk, and the sandbox's memory holds only what the worker itself holds.

The size comes from what the host knows before the conversion: what the spooled input
occupies. A checkpoint's weights come back as about the same bytes; a quarter more and
``HEADROOM_BYTES`` leave room for a safetensors header and for tensors stored more loosely
than they were pickled, never less than the tmpfs would give. An output larger than that is
refused (``OUTPUT_TOO_LARGE``, with both numbers), as a tmpfs's would be.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from airlock_broker.validation.limits import MiB, OutputLimits
from airlock_broker.validation.onnx_canonical import Room
from airlock_sandbox.contract import Target

#: Beyond the input's bytes and a quarter: a header, alignment, a small checkpoint's slack.
HEADROOM_BYTES = 64 * MiB


@dataclass(frozen=True)
class OutputRoom:
    """One job's output room: the caps its outputs are held to, and where they are written."""

    #: ``max_output_bytes`` is this job's cap: what the worker is told and what validation
    #: checks (ONNX keeps its own, lower ``max_onnx_bytes``).
    limits: OutputLimits
    #: The size of each sandbox's disk-backed output filesystem; 0: the warm tmpfs.
    disk_bytes: int = 0
    #: The job's claim on the spool for its ONNX outputs' canonical copies, made before any
    #: sandbox starts (pipeline.py); None: not accounted, or no ONNX output expected.
    canonical: Room | None = None


@dataclass(frozen=True)
class OutputRooms:
    """The configured caps ([output], [sandbox]) from which each job's room is decided."""

    limits: OutputLimits
    #: ``[sandbox] output_bytes``: the tmpfs every container has.
    tmpfs_bytes: int
    #: ``[sandbox] disk_output_bytes``: the largest disk-backed output; 0: none.
    disk_max_bytes: int

    @property
    def tmpfs(self) -> OutputRoom:
        """The room of a job whose output fits the tmpfs."""
        return OutputRoom(replace(self.limits, max_output_bytes=min(
            self.limits.max_output_bytes, self.tmpfs_bytes)))

    def for_job(self, target: Target, occupied: int) -> OutputRoom:
        """The room of a job whose spooled input occupies ``occupied`` bytes."""
        tmpfs = self.tmpfs
        need = occupied + occupied // 4 + HEADROOM_BYTES
        if target is Target.ONNX or not self.disk_max_bytes or need <= self.tmpfs_bytes:
            return tmpfs
        size = min(need, self.limits.max_output_bytes, self.disk_max_bytes)
        if size <= tmpfs.limits.max_output_bytes:
            return tmpfs
        return OutputRoom(replace(self.limits, max_output_bytes=size), disk_bytes=size)

"""Per-container CPU accounting from the host's cgroups, for one broker's sandboxes only.

A container's cgroup (v1 ``cpuacct``) vanishes when the container is removed, so a thread
samples every ``interval`` seconds and keeps the last value seen for each container. A
container is the broker's if it carries the broker's ``airlock.broker`` label. The last
``interval`` of a container's life is not seen: the figures are a slight underestimate.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from bench import host
from bench.host import CPUACCT, TICK
from bench.sampling import ThreadedSampler

_DOCKER_STATE = Path("/var/lib/docker/containers")
_labels_cache: dict[str, dict[str, str]] = {}


def labels(container_id: str) -> dict[str, str] | None:
    """A container's labels, read from the engine's own state file (cheap: no API call that
    would itself cost the engine CPU); None if unknown."""
    if container_id in _labels_cache:
        return _labels_cache[container_id]
    try:
        doc = json.loads((_DOCKER_STATE / container_id / "config.v2.json").read_text())
    except (OSError, ValueError):
        return None
    found = {str(k): str(v) for k, v in ((doc.get("Config") or {}).get("Labels") or {}).items()}
    _labels_cache[container_id] = found
    return found


def owner(container_id: str) -> str | None:
    """The ``airlock.broker`` label of a container ("" if none); None if unknown."""
    found = labels(container_id)
    return None if found is None else found.get("airlock.broker", "")


def profile_of(container_id: str) -> str:
    return (labels(container_id) or {}).get("airlock.profile", "?")


def running_containers(identity: str) -> list[str]:
    """Ids of the running containers (those with a cgroup) that the broker ``identity`` owns."""
    with contextlib.suppress(OSError):
        return [e.name for e in CPUACCT.iterdir() if e.is_dir() and owner(e.name) == identity]
    return []


def _usage(container_dir: Path) -> float | None:
    try:
        return int((container_dir / "cpuacct.usage").read_text()) / 1e9
    except (OSError, ValueError):
        return None


def all_containers_cpu() -> float:
    """CPU-seconds charged to every container since the engine started (hierarchical: the
    parent cgroup keeps the charges of removed children)."""
    return int((CPUACCT / "cpuacct.usage").read_text()) / 1e9


def shim_pids() -> dict[str, int]:
    """container id -> pid of its ``containerd-shim-runc-v2`` (the shim waits for the ``runc``
    invocations it makes, so its cumulative CPU includes theirs)."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() != "containerd-shim":
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if b"-id" in args:
                found[args[args.index(b"-id") + 1].decode()] = int(entry.name)
    return found


@dataclass
class ContainerCpuTracker(ThreadedSampler):
    """CPU of one broker's containers and of their shims while the ``with`` block runs."""

    identity: str
    interval: float = 0.02
    #: container id -> CPU-seconds at the start (0 for containers created later)
    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    #: container id -> (own, waited-for children) CPU-seconds of its shim
    shim_first: dict[str, tuple[float, float]] = field(default_factory=dict)
    shim_last: dict[str, tuple[float, float]] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    shims: dict[str, int] = field(default_factory=dict)
    others: set[str] = field(default_factory=set)

    def __enter__(self) -> Self:
        self._scan(initial=True)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._scan(initial=False)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._scan(initial=False)

    def _scan(self, initial: bool) -> None:
        new: list[str] = []
        present: set[str] = set()
        with contextlib.suppress(OSError):
            for entry in CPUACCT.iterdir():
                present.add(entry.name)
                cid = entry.name
                if not entry.is_dir() or cid in self.others:
                    continue
                if cid not in self.last:
                    label = owner(cid)
                    if label is None:
                        continue
                    if label != self.identity:
                        self.others.add(cid)
                        continue
                usage = _usage(entry)
                if usage is None:
                    continue
                if cid not in self.last:
                    self.first[cid] = usage if initial else 0.0
                    new.append(cid)
                self.last[cid] = usage
        self.gone.update(c for c in self.last if c not in present)
        if new:
            self.shims.update({c: p for c, p in shim_pids().items() if c in new})
        for cid, pid in self.shims.items():
            cpu = _pid_cpu(pid)
            if cpu is None:
                continue
            if cid not in self.shim_last:
                self.shim_first[cid] = cpu if cid in new and initial else (0.0, 0.0)
            self.shim_last[cid] = cpu

    @property
    def containers(self) -> int:
        return len(self.last)

    @property
    def cpu_seconds(self) -> float:
        return sum(self.last[c] - self.first.get(c, 0.0) for c in self.last)

    @property
    def shim_cpu_seconds(self) -> float:
        """The shims' own CPU plus that of the ``runc`` calls they waited for. A shim also
        reaps its container's process, whose CPU the cgroup already counted: that is taken
        out again for every container that died while watched."""
        total = 0.0
        for cid, (own, children) in self.shim_last.items():
            own0, children0 = self.shim_first.get(cid, (0.0, 0.0))
            runc = children - children0
            if cid in self.gone:
                runc -= self.last[cid] - self.first.get(cid, 0.0)
            total += (own - own0) + max(0.0, runc)
        return total


def _pid_cpu(pid: int) -> tuple[float, float] | None:
    """(utime + stime, cutime + cstime) of a process, in seconds."""
    fields = host.stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK, (int(fields[13]) + int(fields[14])) / TICK

"""What the benchmark reads from the host: CPU counters, cgroups, the machine's description."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")
CPUACCT = Path("/sys/fs/cgroup/cpuacct/docker")


def host_cpu() -> tuple[float, float]:
    """(busy, total) CPU-seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest* are already inside user/nice)
    total = sum(fields[:8])
    idle = fields[3] + fields[4]
    return (total - idle) / TICK, total / TICK


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def pid_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime of one process, in seconds (0 if it is gone)."""
    fields = stat_fields(pid)
    return 0.0 if fields is None else sum(int(x) for x in fields[11:15]) / TICK


def self_cpu() -> float:
    """This process's CPU-seconds (all threads)."""
    return time.process_time()


def pids_named(*names: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            comm = (entry / "comm").read_text().strip()
            if comm in names and comm not in found:
                found[comm] = int(entry.name)
    return found


def container_cpu(container_id: str) -> float | None:
    """CPU-seconds used so far by a running container (cgroup v1 cpuacct), None if gone."""
    try:
        return int((CPUACCT / container_id / "cpuacct.usage").read_text()) / 1e9
    except (OSError, ValueError):
        return None


def _run(*cmd: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                              check=False).stdout.strip()
    return ""


def meminfo_bytes(key: str = "MemTotal") -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def busy_fraction(seconds: float = 2.0) -> float:
    """Share of the machine's CPU busy over ``seconds`` (0..1), e.g. to see if it is quiet."""
    b0, t0 = host_cpu()
    time.sleep(seconds)
    b1, t1 = host_cpu()
    return (b1 - b0) / max(t1 - t0, 1e-9)


def machine(image: str, runtime: str) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in ("numpy", "sklearn", "skl2onnx", "onnx", "onnxruntime", "torch", "safetensors",
                 "grpc"):
        mod = sys.modules.get(name)
        if mod is not None and isinstance(getattr(mod, "__version__", None), str):
            versions[name] = mod.__version__
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_bytes": meminfo_bytes(),
        "kernel": platform.release(),
        "os": _run("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"),
        "docker_version": _run("docker", "version", "--format", "{{.Server.Version}}"),
        "docker_default_runtime": _run("docker", "info", "--format", "{{.DefaultRuntime}}"),
        "cgroup": _run("docker", "info", "--format", "{{.CgroupDriver}} v{{.CgroupVersion}}"),
        "runtime": runtime,
        "runc_version": _run("runc", "--version").splitlines()[0] if _run("runc", "--version")
        else "",
        "image": image,
        "image_id": _run("docker", "image", "inspect", "--format", "{{.Id}}", image),
        "git_commit": _run("git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse",
                           "HEAD"),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "versions": versions,
    }


def settle_disk() -> float:
    """Write every dirty page out (``sync``) before a timed sample that writes hundreds of MB,
    so that it does not pay for the previous sample's writeback (or leave its own to the next
    one): the kernel flushes dirty pages 30 s after they were written, in whatever runs then.
    Returns how long the flush took."""
    began = time.monotonic()
    os.sync()
    return time.monotonic() - began

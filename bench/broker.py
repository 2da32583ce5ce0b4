"""The broker under test: ``airlock-broker serve`` started as a subprocess, as an operator
would."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airlock_broker.sandboxes.owners import broker_identity
from airlock_client import Client
from bench import host
from bench.containers import profile_of, running_containers
from bench.sampling import ThreadedSampler

ROOT = Path(__file__).resolve().parents[1]
AIRLOCK = ROOT / ".venv" / "bin" / "airlock"
#: ``airlock-broker``: what its console script runs.
BROKER = [str(ROOT / ".venv" / "bin" / "python"), "-m", "airlock_broker"]
LABEL = "airlock.managed=true"
#: Before a timed sample, wait up to QUIET_BUDGET s for the machine to be under QUIET_SHARE busy.
QUIET_SHARE = 0.25
QUIET_BUDGET = 3.0


class BenchError(RuntimeError):
    """The benchmark could not run (not a measurement)."""


def free_port() -> int:
    """A port free on 127.0.0.1 and on [::1]: a broker on loopback holds both families."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            try:
                with socket.socket(socket.AF_INET6) as s6:
                    s6.bind(("::1", port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue  # a host without IPv6 loopback has nothing to hold there
            return port


def toml(config: dict[str, dict[str, Any]]) -> str:
    """A tiny TOML writer for flat sections of ints, floats, strings, bools and lists."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines = []
    for section, body in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {value(v)}" for k, v in body.items())
        lines.append("")
    return "\n".join(lines)


@dataclass
class RssSampler(ThreadedSampler):
    """Samples VmRSS of a process every ``interval`` seconds in a thread; peak in bytes."""

    pid: int
    interval: float = 0.02
    samples: list[tuple[float, int]] = field(default_factory=list)

    def _run(self) -> None:
        began = time.monotonic()
        while not self._stop.is_set():
            rss = proc_status(self.pid).get("VmRSS")
            if rss is not None:
                self.samples.append((round(time.monotonic() - began, 3), rss))
            self._stop.wait(self.interval)

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


def proc_status(pid: int) -> dict[str, int]:
    """The ``kB`` fields of /proc/<pid>/status, in bytes."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


class Broker:
    """``airlock-broker serve`` on a free loopback port with its own spool directory and config."""

    def __init__(self, workdir: Path, name: str, config: dict[str, dict[str, Any]],
                 log_level: str = "INFO") -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        self.config = config
        self.config_path = self.dir / "airlock.toml"
        self.config_path.write_text(toml(config))
        self.spool = self.dir / "spool"
        self.log = self.dir / "broker.log"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        #: its own Unix socket (not the machine's), where the bench, as root, reads pool status
        self.socket = self.dir / "run" / "broker.sock"
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None
        self.client: Client | None = None
        self._identity = ""
        #: share of the machine busy in the last window of ``wait_ready``
        self.machine_busy = 0.0
        #: container id -> (profile, CPU-seconds when first seen idle and warm)
        self.warm_cpu: dict[str, tuple[str, float]] = {}

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 120.0) -> None:
        env = {**os.environ, "AIRLOCK_STATE_DIR": str(self.spool), "ORT_DISABLE_TELEMETRY": "1",
               "AIRLOCK_SOCKET": str(self.socket)}
        with self.log.open("wb") as fh:
            self.process = subprocess.Popen(
                [*BROKER, "serve", "--listen", self.address, "--config",
                 str(self.config_path), "--log-level", self.log_level],
                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=self.dir)
        self._wait_serving(timeout)
        self.client = Client(f"unix:{self.socket}", retry_attempts=1)  # pool status: admin

    def _wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise BenchError(f"airlock-broker serve exited with "
                                     f"{self.process.returncode}:\n"
                                     f"{self.log.read_text()[-3000:]}")
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""),  # type: ignore[attr-defined]
                                       timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise BenchError(f"airlock-broker serve did not become SERVING:\n"
                         f"{self.log.read_text()[-3000:]}")

    def wait_pools_full(self, timeout: float = 300.0) -> float:
        """Wait until every pool holds ``min_warm`` warm containers and none is starting or
        busy. Returns the seconds waited."""
        assert self.client is not None
        min_warm = int(self.config.get("pools", {}).get("min_warm", 1))
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            pools = self.client.pool_status()
            if all(p.warm >= min_warm and p.starting == 0 and p.busy == 0 for p in pools):
                return time.monotonic() - began
            if self.process is not None and self.process.poll() is not None:
                raise BenchError(f"the broker died:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise BenchError(f"pools not full after {timeout:g} s: {self.client.pool_status()}")

    @property
    def identity(self) -> str:
        if not self._identity:
            self._identity = broker_identity(self.pid)
        return self._identity

    def containers(self) -> list[str]:
        """Ids of the running containers this broker started."""
        return running_containers(self.identity)

    def wait_ready(self, timeout: float = 300.0, quiet_cpu: float = 0.02,
                   window: float = 0.3) -> float:
        """Pools full (broker's view) *and* every warm container done importing: the broker
        counts a container warm once it is started, while its worker still imports its
        libraries for seconds. Done = its cgroup used < ``quiet_cpu`` CPU-s in ``window`` s.

        Then, on a shared machine, give the next sample a fair start: wait (at most
        ``QUIET_BUDGET`` s) for the whole machine to be below ``QUIET_SHARE`` busy; the share
        seen last is kept in ``machine_busy``. Returns the seconds waited."""
        began = time.monotonic()
        self.wait_pools_full(timeout)
        idle_since: float | None = None
        while time.monotonic() - began < timeout:
            ids = self.containers()
            before = {c: host.container_cpu(c) for c in ids}
            busy0, total0 = host.host_cpu()
            time.sleep(window)
            busy1, total1 = host.host_cpu()
            self.machine_busy = (busy1 - busy0) / max(total1 - total0, 1e-9)
            busy = [c for c in ids if (after := host.container_cpu(c)) is not None
                    and (was := before[c]) is not None and after - was >= quiet_cpu]
            if busy:
                idle_since = None
                continue
            idle_since = idle_since or time.monotonic()
            if (self.machine_busy < QUIET_SHARE
                    or time.monotonic() - idle_since > QUIET_BUDGET):
                self.wait_pools_full(timeout)
                # What each idle warm container cost to get there: start + imports (the
                # first reading only: idle polling adds ~1% of a CPU afterwards).
                for c in ids:
                    if c not in self.warm_cpu and (cpu := host.container_cpu(c)) is not None:
                        self.warm_cpu[c] = (profile_of(c), cpu)
                return time.monotonic() - began
        raise BenchError(f"warm containers still busy after {timeout:g} s")

    def warm_cpu_by_profile(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for profile, cpu in self.warm_cpu.values():
            out.setdefault(profile, []).append(round(cpu, 3))
        return out

    def pool_counters(self) -> dict[str, dict[str, int]]:
        assert self.client is not None
        return {p.profile: {"warm": p.warm, "busy": p.busy, "starting": p.starting,
                            "failed_starts": p.failed_starts, "served_warm": p.served_warm,
                            "served_cold": p.served_cold}
                for p in self.client.pool_status()}

    def stop(self) -> int | None:
        """SIGTERM, wait, and report the exit code (None if it had to be killed)."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return None


def leftover_containers() -> list[str]:
    """Containers labelled as Airlock's that exist now (any broker's)."""
    out = subprocess.run(["docker", "ps", "-a", "--filter", f"label={LABEL}", "--format",
                          "{{.ID}} {{.Status}} {{.Label \"airlock.broker\"}}"],
                         capture_output=True, text=True, check=False, timeout=60)
    return [line for line in out.stdout.splitlines() if line.strip()]

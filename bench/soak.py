"""``make soak``: a bounded soak of mixed benign and hostile jobs against one broker.

    .venv/bin/python -m bench.soak                  # 30 minutes
    .venv/bin/python -m bench.soak --minutes 5      # or SOAK_MINUTES=5 make soak

One ``airlock-broker serve`` (own spool, warm pools) takes jobs from ``--clients`` threads for the
given time, each job drawn from a fixed weighted mix: small benign models (sklearn pickle,
numpy, safetensors, a PyTorch state dict) and hostile artifacts from tests/adversarial/
payloads.py (escape attempts, sleepers past their deadline, memory and process bombs, an
artifact that exits with SIGKILL's exit code to pass for killed, code refused by the
safe_only policy, garbage bytes, declared-format lies). Every job must end with its
expected outcome; anything else is counted as unexpected.

It reports throughput, outcomes and error counts by reason, and the broker's RSS, open file
descriptors, containers, spool files and output mounts at the start (pools full, before
the first job) and at the end (after the last job, once the broker has settled), with a leak
verdict. Results go to stdout and ``bench-results/soak-latest.json``. Not part of ``make
test``: a soak is for an operator's machine, not for CI.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airlock_client import AirlockError, Client
from bench import host
from bench.broker import ROOT, Broker, proc_status
from tests.adversarial import payloads
from tests.fixtures import models

RESULTS = ROOT / "bench-results"
#: Growth tolerated between the end of the warm-up and the end before the verdict says
#: "leak?". The broker's thread pool and its Docker connection pool grow on demand up to
#: fixed sizes during the first minutes, so fds and RSS are judged from the warm-up on.
FD_SLACK = 8
RSS_SLACK = 64 * 1024 * 1024
WARMUP_SECONDS = 60.0


@dataclass(frozen=True)
class Kind:
    """One kind of job: how to make its file, how to send it, what must come back."""

    name: str
    weight: int
    make: Callable[[Path], Path]
    expect: frozenset[str]  # "ok" or reason codes
    options: dict[str, Any] = field(default_factory=dict)


def _source(source: str) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / "payload.pkl"
        path.write_bytes(payloads.reduce_pickle(source))
        return path
    return make


def _model(factory: Callable[[Path], tuple[Path, Any]]) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        return factory(directory)[0]
    return make


def _garbage(directory: Path) -> Path:
    path = directory / "garbage.bin"
    path.write_bytes(os.urandom(4096))
    return path


_OK = frozenset({"ok"})
KINDS: tuple[Kind, ...] = (
    Kind("benign-sklearn-pickle", 6, _model(models.make_sklearn_pickle), _OK,
         {"target": "onnx"}),
    Kind("benign-npy", 4, _model(models.make_npy), _OK),
    Kind("benign-safetensors", 3, _model(models.make_safetensors), _OK),
    Kind("benign-state-dict", 2, _model(models.make_state_dict), _OK),
    Kind("hostile-escape-attempt", 3, _source(payloads.escape_attempt_source(
        Path("/tmp/airlock-soak-canary"), [22, 80, 2375, 50051], ["127.0.0.1", "172.17.0.1"])),
        frozenset({"UNSUPPORTED_MODEL", "CONVERSION_FAILED"})),
    Kind("hostile-fake-converter", 2, _source(payloads.fake_success_source()), _OK),
    Kind("hostile-sleeper", 1, _source("import time\ntime.sleep(3600)"),
         frozenset({"SANDBOX_TIMEOUT"}), {"job_timeout": 3}),
    Kind("hostile-memory-bomb", 1, _source("x = []\nwhile True:\n    x.append(bytearray(2**26))"),
         frozenset({"SANDBOX_OOM", "CONVERSION_FAILED"})),
    Kind("hostile-fork-bomb", 1, _source(
        "import os\nfor _ in range(10000):\n    try:\n        os.fork()\n    except OSError:\n"
        "        break\nimport time\ntime.sleep(2)\nos._exit(1)"),
         frozenset({"CONVERSION_FAILED", "SANDBOX_TIMEOUT"}), {"job_timeout": 20}),
    # Exits with SIGKILL's code without a kill: the engine recorded none, so it is the
    # artifact's own failure (CONVERSION_FAILED), never SANDBOX_KILLED.
    Kind("hostile-fake-kill-exit", 1, _source("import os\nos._exit(137)"),
         frozenset({"CONVERSION_FAILED"})),
    Kind("hostile-safe-only", 2, _source("print('never runs')"),
         frozenset({"POLICY_VIOLATION"}), {"loading_policy": "safe_only"}),
    Kind("hostile-garbage", 2, _garbage, frozenset({"UNSUPPORTED_FORMAT"})),
    Kind("hostile-declared-lie", 1, _model(models.make_npy), frozenset({"FORMAT_MISMATCH"}),
         {"declared_format": "pickle"}),
)


@dataclass
class Snapshot:
    """What the broker holds at one moment."""

    rss_bytes: int
    open_fds: int
    threads: int
    containers: int
    containers_by_state: dict[str, int]
    spool_files: dict[str, int]
    mounts: int

    @classmethod
    def take(cls, broker: Broker) -> Snapshot:
        status = proc_status(broker.pid)
        states: collections.Counter[str] = collections.Counter()
        for line in _docker_ps(broker.identity):
            states[line] += 1
        spool = broker.spool
        # the disk spool's and the RAM spool's (ram/: warm slots, inputs that fit its budget)
        files = {sub: _count_files(spool / sub) + _count_files(spool / "ram" / sub)
                 for sub in ("uploads", "slots", "results")}
        with open("/proc/self/mountinfo") as fh:
            mounts = sum(1 for line in fh if line.split()[4].startswith(f"{spool}/"))
        with open(f"/proc/{broker.pid}/status") as fh:
            threads = next(int(line.split()[1]) for line in fh if line.startswith("Threads:"))
        return cls(rss_bytes=status.get("VmRSS", 0),
                   open_fds=len(os.listdir(f"/proc/{broker.pid}/fd")), threads=threads,
                   containers=sum(states.values()), containers_by_state=dict(states),
                   spool_files=files, mounts=mounts)


def _docker_ps(identity: str) -> list[str]:
    import subprocess

    out = subprocess.run(["docker", "ps", "-a", "--filter", f"label=airlock.broker={identity}",
                          "--format", "{{.State}}"], capture_output=True, text=True,
                         check=False, timeout=60)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _commit() -> str:
    import subprocess

    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False, cwd=ROOT)
    return out.stdout.strip()


def _count_files(path: Path) -> int:
    if not path.is_dir():
        return 0
    count = 0
    for _root, _dirs, names in os.walk(path):
        count += len(names)
    return count


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    by_kind: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    unexpected: list[dict[str, str]] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))

    def add(self, kind: Kind, outcome: str, seconds: float, message: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            self.by_kind[kind.name][outcome] += 1
            self.latencies[kind.name].append(seconds)
            if outcome not in kind.expect and len(self.unexpected) < 50:
                self.unexpected.append({"kind": kind.name, "outcome": outcome,
                                        "message": message[:300]})

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    @property
    def unexpected_count(self) -> int:
        return sum(n for name, c in self.by_kind.items() for outcome, n in c.items()
                   if outcome not in _kind(name).expect)


def _kind(name: str) -> Kind:
    return next(k for k in KINDS if k.name == name)


def client_loop(address: str, files: dict[str, Path], out_dir: Path, stop_at: float,
                tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    weights = [k.weight for k in KINDS]
    with Client(address, retry_attempts=3, timeout=300) as client:
        n = 0
        while time.monotonic() < stop_at:
            kind = rng.choices(KINDS, weights)[0]
            n += 1
            began = time.monotonic()
            try:
                client.convert(files[kind.name], out_dir / f"{seed}-{n}.out", **kind.options)
                outcome, message = "ok", ""
            except AirlockError as exc:
                outcome = getattr(exc, "reason", type(exc).__name__)
                message = str(exc)
            tally.add(kind, outcome, time.monotonic() - began, message)
            (out_dir / f"{seed}-{n}.out").unlink(missing_ok=True)


def settle(broker: Broker, timeout: float = 120.0) -> float:
    """After the last job: pools full and idle, background removals done."""
    began = time.monotonic()
    broker.wait_pools_full(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = Snapshot.take(broker)
        if snap.spool_files["uploads"] == 0 and snap.containers == _warm(broker):
            break
        time.sleep(0.5)
    return time.monotonic() - began


def _warm(broker: Broker) -> int:
    assert broker.client is not None
    return sum(p.warm for p in broker.client.pool_status())


def verdict(start: dict[str, int], end: Snapshot, warm: int, max_results: int) -> list[str]:
    """Reasons to suspect a leak (empty: none seen)."""
    problems = []
    if end.containers > warm:
        problems.append(f"{end.containers} containers for {warm} warm ones")
    if end.spool_files["uploads"]:
        problems.append(f"{end.spool_files['uploads']} uploads left")
    if end.mounts > warm:
        problems.append(f"{end.mounts} output mounts for {warm} warm containers")
    if end.spool_files["results"] > max_results:
        problems.append(f"{end.spool_files['results']} kept results over the bound")
    if end.open_fds - start["fds"] > FD_SLACK:
        problems.append(f"open fds grew {start['fds']} -> {end.open_fds} after the warm-up")
    if end.rss_bytes - start["rss"] > RSS_SLACK:
        problems.append(f"RSS grew {start['rss'] >> 20} -> {end.rss_bytes >> 20} MiB "
                        "after the warm-up")
    return problems


def run(minutes: float, clients: int, workdir: Path) -> dict[str, Any]:
    files_dir = workdir / "files"
    files: dict[str, Path] = {}
    for kind in KINDS:
        d = files_dir / kind.name
        d.mkdir(parents=True)
        files[kind.name] = kind.make(d)
    out_dir = workdir / "out"
    out_dir.mkdir()
    ttl, max_entries = 120, 256
    broker = Broker(workdir, "broker", {
        "broker": {"max_concurrent_jobs": 2, "max_queued_jobs": 8},
        "pools": {"min_warm": 1, "max_starting": 1},
        "idempotency": {"ttl_seconds": ttl, "max_entries": max_entries},
    })
    broker.start()
    try:
        broker.wait_ready()
        start = Snapshot.take(broker)
        cpu0 = host.host_cpu()
        tally = Tally()
        rss_peak = start.rss_bytes
        began = time.monotonic()
        stop_at = began + minutes * 60
        threads = [threading.Thread(target=client_loop, daemon=True,
                                    args=(broker.address, files, out_dir, stop_at, tally, i))
                   for i in range(clients)]
        for t in threads:
            t.start()
        samples: list[dict[str, int]] = []
        warmup = min(WARMUP_SECONDS, minutes * 60 / 5)
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            rss = proc_status(broker.pid).get("VmRSS", 0)
            rss_peak = max(rss_peak, rss)
            samples.append({"t": round(time.monotonic() - began), "rss": rss,
                            "fds": len(os.listdir(f"/proc/{broker.pid}/fd")),
                            "jobs": tally.total})
            if broker.process is not None and broker.process.poll() is not None:
                raise RuntimeError("the broker died during the soak")
        for t in threads:
            t.join()
        elapsed = time.monotonic() - began
        cpu1 = host.host_cpu()
        settle_seconds = settle(broker)
        end = Snapshot.take(broker)
        warm = _warm(broker)
        warmed = next((x for x in samples if x["t"] >= warmup),
                      {"rss": start.rss_bytes, "fds": start.open_fds, "t": 0, "jobs": 0})
        problems = verdict(warmed, end, warm, max_entries)
    finally:
        code = broker.stop()
    leftovers = _docker_ps(broker.identity)
    busy = (cpu1[0] - cpu0[0]) / max(cpu1[1] - cpu0[1], 1e-9)
    return {
        "minutes": minutes, "clients": clients, "elapsed_seconds": round(elapsed, 1),
        "jobs": tally.total, "jobs_per_minute": round(tally.total / elapsed * 60, 1),
        "machine_busy_share": round(busy, 3),
        "outcomes": dict(tally.outcomes.most_common()),
        "by_kind": {k: dict(v) for k, v in sorted(tally.by_kind.items())},
        "p50_seconds_by_kind": {k: round(sorted(v)[len(v) // 2], 3)
                                for k, v in sorted(tally.latencies.items())},
        "unexpected": tally.unexpected_count, "unexpected_examples": tally.unexpected[:10],
        "start": start.__dict__, "after_warmup": warmed, "end": end.__dict__,
        "rss_peak_bytes": rss_peak,
        "settle_seconds": round(settle_seconds, 1), "warm_at_end": warm,
        "leak_suspicions": problems, "broker_exit_code": code,
        "containers_left_after_stop": leftovers, "samples": samples,
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def render(doc: dict[str, Any]) -> str:
    s, w, e = doc["start"], doc["after_warmup"], doc["end"]
    lines = [
        f"soak {doc['date']}: {doc['elapsed_seconds'] / 60:.1f} min, {doc['clients']} clients, "
        f"{doc['jobs']} jobs ({doc['jobs_per_minute']}/min); "
        f"machine {doc['machine_busy_share']:.0%} busy",
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in doc["outcomes"].items()),
        f"unexpected outcomes: {doc['unexpected']}",
        "",
        f"{'':<22}{'start':>12}{'end':>12}   (after the {w['t']} s warm-up)",
        f"{'broker RSS (MiB)':<22}{s['rss_bytes'] / 2**20:>12.1f}{e['rss_bytes'] / 2**20:>12.1f}"
        f"   ({w['rss'] / 2**20:.1f}; peak {doc['rss_peak_bytes'] / 2**20:.1f})",
        f"{'open fds':<22}{s['open_fds']:>12}{e['open_fds']:>12}   ({w['fds']})",
        f"{'threads':<22}{s['threads']:>12}{e['threads']:>12}",
        f"{'containers':<22}{s['containers']:>12}{e['containers']:>12}"
        f"   (warm at end {doc['warm_at_end']})",
        f"{'spool uploads':<22}{s['spool_files']['uploads']:>12}{e['spool_files']['uploads']:>12}",
        f"{'spool slot files':<22}{s['spool_files']['slots']:>12}{e['spool_files']['slots']:>12}",
        f"{'spool kept results':<22}{s['spool_files']['results']:>12}"
        f"{e['spool_files']['results']:>12}",
        f"{'output mounts':<22}{s['mounts']:>12}{e['mounts']:>12}",
        "",
        "leak verdict: " + ("none seen" if not doc["leak_suspicions"]
                            else "SUSPECT: " + "; ".join(doc["leak_suspicions"])),
        f"broker exit code {doc['broker_exit_code']}; containers left after stop: "
        f"{len(doc['containers_left_after_stop'])}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float,
                        default=float(os.environ.get("SOAK_MINUTES", "30")))
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="airlock-soak-") as tmp:
        doc = run(args.minutes, args.clients, Path(tmp))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak-latest.json").write_text(json.dumps(doc, indent=2, default=str))
    print(render(doc))
    ok = (not doc["leak_suspicions"] and doc["unexpected"] == 0
          and doc["broker_exit_code"] == 0 and not doc["containers_left_after_stop"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

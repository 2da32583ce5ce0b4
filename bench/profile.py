"""``python -m bench.profile [--out bench-results/profile.json]``: where Airlock's time goes.

Not part of ``make bench``: a tool for explaining its figures. It

1. runs the ordinary broker (``airlock-broker serve``) with its job steps' events on
   (``[observability] trace_events``, airlock_broker/tracing.py) and splits the end-to-end
   latency of S1, S2 and S3 requests into phases (client, upload, pool hand-off, container,
   validation, stream back, container removal), with the client ``make bench`` uses: the
   broker's Unix socket, so the same-host fast path (``peer_write`` is the output's copy into
   the caller's file);
2. times the worker's own steps (load, skl2onnx, ONNX checker, parity, write; torch load,
   save, read-back) in a fresh container of the sandbox image, as a single-use container
   runs them: first call in the process, then later calls to show one-off costs;
3. measures what a container start costs in CPU: the engine (an empty container), the
   interpreter, and what each profile module's import adds.

Every model is generated here; nothing is deserialized in this process (the worker steps
run inside the sandbox image, with no network).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airlock_sandbox.formats import PROFILES
from bench import host
from bench.broker import ROOT, Broker
from bench.containers import shim_pids
from bench.run import IMAGE, WARM_CONFIG, log, pct

# -- 1. phases of a request -------------------------------------------------------------------

#: (name, from event, to event): consecutive phases of one request.
PHASES = [
    ("client starts, connects, sends metadata", "client.begin", "metadata.end"),
    ("upload + spool (client and broker hash)", "metadata.end", "spool.end"),
    ("detect, admission", "spool.end", "acquire.begin"),
    ("pool: take warm container (inspect)", "acquire.begin", "acquire.end"),
    ("hand-off: artifact in (+ 2nd sandbox), job spec", "acquire.end", "sandbox_run.begin"),
    ("container: worker job + exit + docker wait", "sandbox_run.begin", "sandbox_run.end"),
    ("after exit: inspect, wait for extraction, report", "sandbox_run.end", "validate.begin"),
    ("validate output (broker)", "validate.begin", "validate.end"),
    ("compare or digest (fast path: copy inside) + header", "validate.end",
     "result_message.end"),
    ("stream output to the client (server side)", "result_message.end", "release.begin"),
    ("release (destroy is in the background)", "release.begin", "release.end"),
    ("handler end", "release.end", "rpc.end"),
    ("status -> client, client finishes file", "rpc.end", "client.end"),
]


def _load_trace(path: Path) -> dict[int, list[dict[str, Any]]]:
    by_task: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        with_event = json.loads(line)
        if with_event["rpc"]:
            by_task[with_event["rpc"]].append(with_event)
    return by_task


def _requests(trace: Path, calls: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Join each client call with the broker task whose rpc.begin falls inside it."""
    tasks = [evs for evs in _load_trace(trace).values() if any(e["ev"] == "job" for e in evs)]
    joined = []
    for call in calls:
        match = [evs for evs in tasks
                 if call["client.begin"] <= _first(evs, "rpc.begin") <= call["client.end"]]
        if len(match) != 1:
            continue
        evs = match[0]
        stamps: dict[str, float] = dict(call)
        info: dict[str, Any] = {}
        if not any(e["ev"] == "sandbox_run.begin" for e in evs):
            # The reading alone was the answer (a checkpoint or an estimator read first):
            # its sandbox is the request's container.
            evs = [{**e, "ev": e["ev"].replace("extract_run", "sandbox_run")} for e in evs]
        for e in evs:
            if e["ev"] in _LAST_WINS:
                stamps[e["ev"]] = e["t"]
            else:
                stamps.setdefault(e["ev"], e["t"])
            if e["ev"] == "acquire.end":
                info["warm"] = e.get("warm")
            if e["ev"] == "sandbox_run.end":
                info["wait_s"] = e.get("wait_s")
            if e["ev"] == "extract_run.end":
                info["extract_wait_s"] = e.get("wait_s")
            if e["ev"] == "read_report.end":
                info["timings"] = e.get("timings") or {}
        seq = [stamps[k] for k in _SERVER_ORDER if k in stamps]
        if any(b < a for a, b in itertools.pairwise(seq)):
            continue  # events out of order: not one request's story; leave it out
        joined.append({"stamps": stamps, **info})
    return joined


#: The integrity extraction's output is validated first (as soon as its sandbox is dead); the
#: job's own validation is the last one.
_LAST_WINS = frozenset({"validate.begin", "validate.end"})

_SERVER_ORDER = ["rpc.begin", "metadata.end", "spool.end", "acquire.begin", "acquire.end",
                 "sandbox_run.begin", "sandbox_run.end", "validate.begin", "validate.end",
                 "result_message.end", "release.begin", "release.end", "rpc.end"]


def _first(evs: list[dict[str, Any]], name: str) -> float:
    return next((e["t"] for e in evs if e["ev"] == name), -1.0)


CONTAINER = "container: worker job + exit + docker wait"


def _phase_table(requests: list[dict[str, Any]]) -> dict[str, Any]:
    phases: dict[str, list[float]] = defaultdict(list)
    for req in requests:
        s = req["stamps"]
        for name, a, b in PHASES:
            if a not in s or b not in s:
                continue
            span = s[b] - s[a]
            wait = req.get("wait_s")
            if name == CONTAINER and isinstance(wait, int | float):
                phases[name].append(span)
                job = req.get("timings", {}).get("job_s")
                if isinstance(job, int | float):
                    phases["  of which worker job_s (its report)"].append(job)
                    phases["  of which spec pickup, report, exit, engine, wait"].append(
                        wait - job)
                phases["  of which inspect after exit"].append(span - wait)
            else:
                phases[name].append(span)
        extract = req.get("extract_wait_s")
        if isinstance(extract, int | float):
            phases["(integrity extraction sandbox, in parallel)"].append(extract)
        phases["TOTAL end to end"].append(s["client.end"] - s["client.begin"])
    order = [p[0] for p in PHASES]
    at = order.index(CONTAINER)
    order[at + 1:at + 1] = ["  of which worker job_s (its report)",
                            "  of which spec pickup, report, exit, engine, wait",
                            "  of which inspect after exit",
                            "(integrity extraction sandbox, in parallel)"]
    order.append("TOTAL end to end")
    return {name: {"median_ms": round(statistics.median(phases[name]) * 1000, 1),
                   "p95_ms": round(pct(phases[name], 95) * 1000, 1), "n": len(phases[name])}
            for name in order if phases.get(name)}


def _spans(request: dict[str, Any]) -> dict[str, float]:
    """One request's phases in ms, in order (those it has)."""
    s = request["stamps"]
    spans = {name: s[b] - s[a] for name, a, b in PHASES if a in s and b in s}
    spans["TOTAL"] = s["client.end"] - s["client.begin"]
    return {name: round(span * 1000, 1) for name, span in spans.items()}


def request_phases(work: Path, quick: bool, which: set[str],
                   config: dict[str, dict[str, Any]] | None = None,
                   suffix: str = "") -> dict[str, Any]:
    from airlock_client import Client
    from tests.fixtures import models

    small, _ = models.make_sklearn_pickle(work / "models")
    forest, _ = models.make_random_forest_joblib(work / "models")
    big = work / "models" / "large.pt"
    if "S3" in which and not big.exists():
        models.make_large_state_dict(big, size_mb=400)
    trace = work / f"trace{suffix.replace(' ', '-')}.jsonl"
    broker = Broker(work, "traced" + suffix.replace(" ", "-"),
                    {**(config or WARM_CONFIG), "observability": {"trace_events": str(trace)}})
    out: dict[str, Any] = {}
    try:
        broker.start()
        broker.wait_ready()
        with Client(f"unix:{broker.socket}", retry_attempts=1) as client:
            for name, artifact, count in (("S1", small, 6 if quick else 15),
                                          ("S1b", small, 10 if quick else 20),
                                          ("S2", forest, 6 if quick else 15),
                                          ("S3", big, 1 if quick else 2)):
                if name.upper() not in which:
                    continue

                log(f"profile: {name} x {count}")
                client.convert(artifact, work / "warmup.out")  # one-off client costs
                calls = []
                for i in range(count):
                    if name != "S1b" or i == 0:  # S1b goes back to back, as bench.run's
                        broker.wait_ready()
                        host.settle_disk()  # as bench.run: no sample pays the last writeback
                    began = time.monotonic()
                    client.convert(artifact, work / f"{name}.out")
                    calls.append({"client.begin": began, "client.end": time.monotonic()})
                time.sleep(0.3)  # let the trace lines land
                requests = _requests(trace, calls)
                out[name + suffix] = _phase_table(requests)
                if name == "S1b":  # waits and contention differ request by request
                    out[name + suffix + " each request"] = [_spans(req) for req in requests]
    finally:
        broker.stop()
    return out


# -- 2. the worker's own steps, in a fresh sandbox container -----------------------------------

_WORKER_PROBE = r'''
import json, os, sys, time
t0 = time.perf_counter()
from airlock_worker.profiles import warm_up
warm_up(sys.argv[1])
imports = time.perf_counter() - t0
from airlock_sandbox.contract import JobSpec
from airlock_sandbox.formats import PREFIX_BYTES, detect_prefix
from airlock_worker import job, output, onnx_out, parity, report as report_mod
marks = {}
def timed(owner, name, label):
    orig = getattr(owner, name)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            marks[label] = marks.get(label, 0.0) + time.perf_counter() - t
    setattr(owner, name, wrapper)
if sys.argv[1] == "sklearn":
    import joblib
    from airlock_worker import sklearn_convert
    timed(joblib, "load", "load (joblib.load)")
    timed(sklearn_convert, "_convert", "convert (skl2onnx)")
    timed(onnx_out, "finish", "ONNX checker full_check + serialize")
    timed(parity, "check", "parity (ORT session + 2 runs)")
    timed(output, "write_bytes", "write output")
else:
    from airlock_worker import torch_convert, st_torch
    timed(torch_convert, "_load_checkpoint", "load (torch.load mmap weights_only)")
    timed(st_torch, "prepare", "prepare (dedupe, contiguous)")
    timed(st_torch, "save_file", "save_file")
    timed(st_torch, "write_verified", "save + read back + compare")
with open("/airlock/in/artifact", "rb") as fh:  # as the broker decides an undeclared one
    decided = detect_prefix(fh.read(PREFIX_BYTES), os.fstat(fh.fileno()).st_size)
runs = []
for i in range(int(sys.argv[2])):
    marks.clear()
    out = f"/out/{i}"
    os.mkdir(out)
    t = time.perf_counter()
    job.run(JobSpec(job_id=f"probe{i}", artifact_format=decided), "/airlock/in", out,
            report_mod.Report())
    total = time.perf_counter() - t
    runs.append({"job_s": round(total, 4), **{k: round(v, 4) for k, v in marks.items()}})
    for name in os.listdir(out):
        os.unlink(os.path.join(out, name))
print("PROBE " + json.dumps({"imports_s": round(imports, 3), "runs": runs}), flush=True)
'''


def worker_steps(work: Path, quick: bool) -> dict[str, Any]:
    from tests.fixtures import models

    cases: dict[str, tuple[str, Callable[[Path], tuple[Path, Any]]]] = {
        "S1 sklearn pipeline": ("sklearn", lambda d: models.make_sklearn_pickle(d)),
        "S2 RandomForest(100)": ("sklearn", lambda d: models.make_random_forest_joblib(d)),
        "S3 400 MiB state dict": ("torch", lambda d: models.make_large_state_dict(
            d / "model.pt", size_mb=400)),
    }
    results: dict[str, Any] = {}
    for name, (profile, make) in cases.items():
        case_dir = work / ("probe-" + profile + "-" + name.split()[0])
        case_dir.mkdir(parents=True)
        os.chmod(case_dir, 0o755)
        path, _ = make(case_dir)
        path.rename(case_dir / "artifact")
        os.chmod(case_dir / "artifact", 0o644)
        reps = 1 if profile == "torch" else (2 if quick else 3)
        samples = []
        for _ in range(1 if profile == "torch" else (2 if quick else 4)):
            proc = subprocess.run(
                ["docker", "run", "--rm", "--network", "none", "--read-only",
                 "--user", "10001:10001", "--tmpfs", "/tmp:size=256m",
                 "--tmpfs", "/out:size=1g,uid=10001", "--cpus", "1", "--memory", "4g",
                 "-v", f"{case_dir}:/airlock/in:ro", "--entrypoint", "python3", IMAGE,
                 "-c", _WORKER_PROBE, profile, str(reps)],
                capture_output=True, text=True, timeout=300, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
            if line is None:
                results[name] = {"error": proc.stderr[-2000:]}
                break
            samples.append(json.loads(line[6:]))
        else:
            first = [s["runs"][0] for s in samples]
            later = [r for s in samples for r in s["runs"][1:]]
            results[name] = {
                "first_call_in_process_median": _median_dict(first),
                "later_calls_median": _median_dict(later) if later else {},
                "imports_s_median": round(statistics.median(s["imports_s"] for s in samples), 3),
                "samples": samples,
            }
        (case_dir / "artifact").unlink()
    return results


def _median_dict(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: round(statistics.median(r[k] for r in rows if k in r) * 1000, 1) for k in keys}


# -- 3. CPU per container start -----------------------------------------------------------------


def _container_cost(script: str, reps: int) -> dict[str, Any]:
    """CPU of one container start, split: the container itself (its cgroup: interpreter +
    ``script``), its shim (+ the runc calls it waits for), dockerd + containerd, and the
    docker CLI. The script ends in a 1 s sleep so the cgroup can be read before it goes, then
    in ``os._exit`` as the worker does (a normal exit's collections and finalizers would count
    CPU no worker spends)."""
    daemons = host.pids_named("dockerd", "containerd")
    rows = []
    for _ in range(reps):
        d0 = {n: host.pid_cpu(p) for n, p in daemons.items()}
        ch0 = os.times()
        began = time.perf_counter()
        cid = subprocess.run(
            ["docker", "run", "-d", "--network", "none", "--read-only", "--tmpfs", "/tmp",
             "--entrypoint", "python3", IMAGE, "-c",
             script + "\nimport os, time; time.sleep(1.0); os._exit(0)"],
            capture_output=True, text=True, timeout=120, check=True).stdout.strip()
        shim = shim_pids().get(cid)
        cgroup_cpu, shim_cpu, last_change, ready = 0.0, 0.0, time.perf_counter(), None
        while True:
            cpu = host.container_cpu(cid)
            if shim is not None:
                # own + waited-for children (runc calls, and the container's process once
                # it is reaped: taken out below)
                shim_cpu = host.pid_cpu(shim) or shim_cpu
            if cpu is None:
                break
            if cpu - cgroup_cpu > 0.005:
                last_change = time.perf_counter()
            elif ready is None and time.perf_counter() - last_change > 0.3:
                ready = last_change - began  # imports done: the container went quiet
            cgroup_cpu = cpu
            time.sleep(0.02)
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60, check=False)
        ch1 = os.times()
        rows.append({
            "container_cgroup": cgroup_cpu,
            "shim_and_runc": max(0.0, shim_cpu - cgroup_cpu),
            **{f"{n}": host.pid_cpu(p) - d0[n] for n, p in daemons.items()},
            "docker_cli": (ch1.children_user + ch1.children_system)
            - (ch0.children_user + ch0.children_system),
            "ready_wall_s": ready if ready is not None else float("nan"),
        })
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}


#: ``import skops.io`` as the worker does it for an MLflow 3 sklearn model (saved as skops), in
#: images with airlock_worker.skops_import, and plainly in older ones (for before/after runs).
_SKOPS_IMPORT = """
try:
    from airlock_worker.skops_import import import_skops_io
except ImportError:
    import skops.io
else:
    import_skops_io()
"""


def start_costs(quick: bool) -> dict[str, Any]:
    reps = 3 if quick else 5
    out: dict[str, Any] = {
        "cpu_s per start (median), python3 -c pass": _container_cost("pass", reps),
    }
    # What a warm container really does before its job, per profile: the imports, then the
    # priming conversion (airlock_worker.priming) where the profile has one. The image's own
    # profile lists are used, so a before/after run compares what each image imports.
    for profile in PROFILES:
        out[f"cpu_s per start (median), {profile} warm_up (imports + priming)"] = \
            _container_cost(f"from airlock_worker.profiles import warm_up; warm_up({profile!r})",
                            reps)
    out["cpu_s per start (median), sklearn warm_up + import skops.io"] = _container_cost(
        "from airlock_worker.profiles import warm_up; warm_up('sklearn')\n" + _SKOPS_IMPORT,
        reps)
    out["import ms (incremental, in profile order, --cpus 1, median of 3)"] = {
        profile: _import_times(profile) for profile in PROFILES}
    return out


_EXIT_PROBE = r'''
import os, sys, time
from airlock_worker.profiles import warm_up
warm_up("sklearn")
while not os.path.exists("/airlock/in/go"):
    time.sleep(0.005)
with open("/airlock/out/t", "w") as f:
    f.write(repr(time.monotonic()))
os._exit(0)
'''


def exit_latency(work: Path, reps: int) -> dict[str, Any]:
    """What happens between the worker's last act and the broker seeing it dead: a warm
    sklearn container is told to go (a file appears, as the job spec does), writes
    CLOCK_MONOTONIC and calls os._exit; the host watches the cgroup empty and, like the
    broker, waits with the Docker API, then inspects."""
    import docker

    client = docker.from_env(version="auto")
    rows = []
    try:
        for i in range(reps):
            d_in, d_out = work / f"exit-{i}" / "in", work / f"exit-{i}" / "out"
            d_in.mkdir(parents=True)
            d_out.mkdir()
            os.chmod(d_in, 0o755)
            os.chmod(d_out, 0o777)
            container = client.containers.run(
                IMAGE, entrypoint=["python3", "-c", _EXIT_PROBE], detach=True,
                network_mode="none", read_only=True, user="10001:10001",
                tmpfs={"/tmp": "size=64m"}, volumes={str(d_in): {"bind": "/airlock/in",
                                                                  "mode": "ro"},
                                                     str(d_out): {"bind": "/airlock/out",
                                                                   "mode": "rw"}})
            cid = str(container.id)
            procs = host.CPUACCT / cid / "cgroup.procs"
            while True:  # warm: imports done when the cgroup goes quiet
                a = host.container_cpu(cid)
                time.sleep(0.3)
                b = host.container_cpu(cid)
                if a is not None and b is not None and b - a < 0.01:
                    break
            result: dict[str, float] = {}

            def waiter(cid: str = cid, out: dict[str, float] = result) -> None:
                client.api.wait(cid)
                out["wait"] = time.monotonic()

            th = threading.Thread(target=waiter)
            th.start()
            time.sleep(0.1)
            go = time.monotonic()
            (d_in / "go").write_text("")
            empty = None
            while empty is None:
                try:
                    if not procs.read_text().strip():
                        empty = time.monotonic()
                except OSError:
                    empty = time.monotonic()
                time.sleep(0.0005)
            th.join()
            client.api.inspect_container(cid)
            inspected = time.monotonic()
            t0 = time.perf_counter()
            client.api.remove_container(cid, force=True, v=True)
            removed = time.perf_counter() - t0
            last = float((d_out / "t").read_text())
            rows.append({"spec_pickup_ms": (last - go) * 1000,
                         "exit_to_cgroup_empty_ms": (empty - last) * 1000,
                         "cgroup_empty_to_wait_return_ms": (result["wait"] - empty) * 1000,
                         "inspect_ms": (inspected - result["wait"]) * 1000,
                         "remove_container_ms": removed * 1000})
    finally:
        client.close()
    return {k: round(statistics.median(r[k] for r in rows), 1) for k in rows[0]} | {
        "samples": rows}


def _import_times(profile: str) -> dict[str, Any]:
    """Wall (= CPU: single-threaded, one CPU) time each import of ``profile`` (the image's own
    list) adds after the ones before it (shared dependencies are charged to the first
    importer), then its priming, in a fresh container; 3 runs."""
    script = ("import importlib, json, time\n"
              "from airlock_worker.profiles import PROFILES\n"
              "t0 = time.perf_counter(); out = {}\n"
              f"for m in PROFILES[{profile!r}]:\n"
              "    t = time.perf_counter(); importlib.import_module(m)\n"
              "    out[m] = round((time.perf_counter() - t) * 1000, 1)\n"
              "t = time.perf_counter()\n"
              "from airlock_worker.priming import prime\n"
              f"prime({profile!r})\n"
              "out['(priming)'] = round((time.perf_counter() - t) * 1000, 1)\n"
              "out['TOTAL'] = round((time.perf_counter() - t0) * 1000, 1)\n"
              "print('PROBE ' + json.dumps(out))\n")
    runs = []
    for _ in range(3):
        proc = subprocess.run(["docker", "run", "--rm", "--network", "none", "--cpus", "1",
                               "--read-only", "--tmpfs", "/tmp", "--entrypoint", "python3",
                               IMAGE, "-c", script],
                              capture_output=True, text=True, timeout=300, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
        if line is None:
            return {"error": proc.stderr[-2000:]}
        runs.append(json.loads(line[6:]))
    return {m: statistics.median(r[m] for r in runs) for m in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "profile.json")
    parser.add_argument("--only", choices=["phases", "worker", "start", "exit"],
                        default=None, help="one part only")
    parser.add_argument("--phases", default="S1,S2,S3", help="scenarios for the phase split")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    work = Path(tempfile.mkdtemp(prefix="airlock-profile-"))
    doc: dict[str, Any] = {"machine": host.machine(IMAGE, "runc"),
                           "machine_busy_before_run": round(host.busy_fraction(1.0), 3)}
    try:
        if args.only in (None, "phases"):
            which = {x.strip().upper() for x in args.phases.split(",")}
            doc["phases"] = request_phases(work, args.quick, which)
            if "S3" in which:  # what integrity verification (on by default) costs
                off = {**WARM_CONFIG,
                       "broker": {**WARM_CONFIG["broker"], "verify_integrity": False}}
                doc["phases"] |= request_phases(work, args.quick, {"S3"}, off,
                                                " (integrity verification off)")
        if args.only in (None, "worker"):
            log("profile: worker steps in fresh containers")
            doc["worker_steps"] = worker_steps(work, args.quick)
        if args.only in (None, "exit"):
            log("profile: exit latency")
            doc["exit_latency"] = exit_latency(work, 3 if args.quick else 8)
        if args.only in (None, "start"):
            log("profile: container start costs")
            doc["start_costs"] = start_costs(args.quick)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for name, table in doc.get("phases", {}).items():
        if isinstance(table, list):  # one row per request, a column per phase
            columns = [phase for phase, _, _ in PHASES] + ["TOTAL"]
            print(f"\n{name} (ms), columns: "
                  + "; ".join(f"{i} {phase}" for i, phase in enumerate(columns, 1)))
            print("  " + " ".join(f"{i:>7}" for i in range(1, len(columns) + 1)))
            for row in table:
                print("  " + " ".join(f"{row.get(phase, '-'):>7}" for phase in columns))
            continue
        print(f"\n{name}: phases (median / p95 ms)")
        for phase, v in table.items():
            print(f"  {phase:<48} {v['median_ms']:>9.1f} {v['p95_ms']:>9.1f}  (n={v['n']})")
    for name, steps in doc.get("worker_steps", {}).items():
        shown = {k: v for k, v in steps.items() if k != "samples"}
        print(f"\nworker steps, {name}: {json.dumps(shown)}")
    if "exit_latency" in doc:
        shown = {k: v for k, v in doc["exit_latency"].items() if k != "samples"}
        print(f"\nexit latency (median ms): {json.dumps(shown)}")
    if "start_costs" in doc:
        print("\ncontainer start costs:")
        print(json.dumps(doc["start_costs"], indent=1))
    print(f"\nraw: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

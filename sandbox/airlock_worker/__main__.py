"""``python3 -m airlock_worker [--profile P] [--in-dir D] [--out-dir D]``

Warm up (import the profile's libraries), wait for the job spec, run the job, exit with a
:class:`WorkerExit` code. stdout and stderr are silenced at the file-descriptor level while
libraries run (exporters print progress, native code logs), and the worker prints exactly
one short line at the end: the broker logs a capped copy and decides nothing from it."""

from __future__ import annotations

import argparse
import os
import select
import stat
import sys
import time
import warnings
from typing import TextIO

from airlock_sandbox.contract import (
    DOORBELL_FALLBACK_SECONDS,
    DOORBELL_NAME,
    IN_DIR,
    JOB_SPEC_NAME,
    MAX_JOB_SPEC_BYTES,
    OUT_DIR,
    SPEC_POLL_FAST_SECONDS,
    SPEC_POLL_SECONDS,
    WARM_WAIT_SECONDS,
    JobSpec,
    WorkerExit,
)

from . import job, output
from .errors import WorkerError, describe, one_line
from .profiles import DEFAULT_PROFILE, PROFILES, warm_up
from .report import Report
from .spec_types import check_dtype


def wait_for_spec(in_dir: str, timeout: float, idle_poll: float = SPEC_POLL_SECONDS) -> JobSpec:
    """The broker renames the spec into place last, so once it exists it is complete. With
    a doorbell (contract.DOORBELL_NAME), the worker sleeps on it until it rings; else the
    spec is looked for every ``SPEC_POLL_SECONDS`` at first, every ``idle_poll`` once the
    container has waited ``SPEC_POLL_FAST_SECONDS`` (contract.py says what a look costs)."""
    path = os.path.join(in_dir, JOB_SPEC_NAME)
    began = time.monotonic()
    deadline = began + timeout
    bell = _open_doorbell(in_dir)  # before the first look: a ring after it is not lost
    try:
        while True:
            try:
                with open(path, "rb") as f:
                    raw = f.read(MAX_JOB_SPEC_BYTES + 1)
                break
            except FileNotFoundError:
                now = time.monotonic()
                if now >= deadline:
                    raise WorkerError(WorkerExit.BAD_JOB_SPEC,
                                      f"no job spec within {timeout:g} s") from None
                if bell is not None:
                    if _rang(bell, min(DOORBELL_FALLBACK_SECONDS, deadline - now)):
                        os.close(bell)  # it rings once: from here on, polling
                        bell = None
                    continue
                time.sleep(SPEC_POLL_SECONDS if now - began < SPEC_POLL_FAST_SECONDS
                           else idle_poll)
    finally:
        if bell is not None:
            os.close(bell)
    try:
        spec = JobSpec.from_json(raw)
    except Exception as exc:
        raise WorkerError(WorkerExit.BAD_JOB_SPEC, f"invalid job spec: {describe(exc)}") from None
    names = [t.name for t in spec.inputs]
    if spec.max_output_bytes <= 0 or len(set(names)) != len(names) or not all(names):
        raise WorkerError(WorkerExit.BAD_JOB_SPEC,
                          "invalid job spec: output cap or input names")
    for tensor in spec.inputs:  # refuse before anything is loaded, not after
        check_dtype(tensor)
    return spec


def _open_doorbell(in_dir: str) -> int | None:
    """The broker's doorbell, open for reading without waiting for a writer; None where there
    is none (or it is not a FIFO, or cannot be opened): then the worker polls."""
    try:
        fd = os.open(os.path.join(in_dir, DOORBELL_NAME),
                     os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _rang(bell: int, seconds: float) -> bool:
    """Whether the bell rang (or its writer came and went) within ``seconds``."""
    poller = select.poll()
    poller.register(bell, select.POLLIN | select.POLLHUP)
    return bool(poller.poll(max(0, round(seconds * 1000))))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="airlock_worker", description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE)
    parser.add_argument("--in-dir", default=IN_DIR)
    parser.add_argument("--out-dir", default=OUT_DIR)
    parser.add_argument("--wait-seconds", type=float, default=WARM_WAIT_SECONDS,
                        help=argparse.SUPPRESS)  # for development only
    parser.add_argument("--idle-poll-ms", type=int, default=round(SPEC_POLL_SECONDS * 1000),
                        help="look for the job spec this often once idle (1-1000 ms)")
    parser.add_argument("--selftest", action="store_true",
                        help="probe this sandbox's confinement instead of running a job")
    parser.add_argument("--verbose", action="store_true",
                        help="keep library output and tracebacks (development only)")
    return parser.parse_args(argv)


def _silence() -> TextIO:
    """Point fds 1 and 2 at /dev/null; return a stream on the original stderr."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    return os.fdopen(saved, "w", buffering=1)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.selftest:
        from . import selftest

        return selftest.run(args.out_dir)
    console = sys.stderr if args.verbose else _silence()
    if not args.verbose:
        warnings.simplefilter("ignore")
    report = Report()
    code, line = WorkerExit.OK, ""
    linger = 0.0
    started = time.perf_counter()
    try:
        warm_up(args.profile)
        report.timings["warm_up_s"] = round(time.perf_counter() - started, 4)
        output.mark_ready(args.out_dir)
        idle_poll = min(max(args.idle_poll_ms, 1), 1000) / 1000
        spec = wait_for_spec(args.in_dir, args.wait_seconds, idle_poll)
        linger = spec.linger_seconds
        job_started = time.perf_counter()
        try:
            job.run(spec, args.in_dir, args.out_dir, report)
        finally:
            report.timings["job_s"] = round(time.perf_counter() - job_started, 4)
        line = f"ok: {report.detected_format} -> {report.output_format} via {report.loader}"
    except WorkerError as exc:
        code, line = exc.exit, f"{exc.exit.name}: {exc.message}"
    except BaseException as exc:  # our bug, or an artifact raising SystemExit & co.
        if args.verbose:
            raise
        code, line = WorkerExit.UNCAUGHT, f"UNCAUGHT: {describe(exc)}"
    if code is not WorkerExit.OK:
        output.remove_outputs(args.out_dir)
        report.error = {"exit": code.name, "message": line}
    print(one_line(f"airlock-worker: {line}"), file=console, flush=True)
    output.write_report(args.out_dir, report.to_json())  # last: the broker acts on it
    if code is WorkerExit.OK and linger > 0:
        # The broker freezes this container now, rather than wait for the exit of a process
        # with hundreds of MiB mapped; if it does not, exit as usual.
        output.mark_done(args.out_dir)
        time.sleep(linger)
    return int(code)


if __name__ == "__main__":
    # The container is destroyed right after; interpreter teardown (torch, sklearn and ORT
    # finalizers) would add 0.3-0.4 s to every job's latency for nothing. Every file the
    # worker wrote is closed by now and the one line is flushed.
    os._exit(main())

"""``python -m bench.traced_broker serve ...``: the real broker with timestamps around its steps.

For ``bench.profile`` only: it wraps (never changes) a few broker functions so that each job's
path can be split into phases. Events go, one JSON object per line, to the file named by
``AIRLOCK_BENCH_TRACE``: ``{"t": <CLOCK_MONOTONIC seconds>, "rpc": <n>, "ev": <name>, ...}``.
CLOCK_MONOTONIC is shared by every process on the machine, so the client's own timestamps can
be merged with these.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

_lock = threading.Lock()
#: Which RPC the running code serves (0: background work such as pool replenishment).
_rpc: contextvars.ContextVar[int] = contextvars.ContextVar("rpc", default=0)
_ids = itertools.count(1)
_out = open(os.environ["AIRLOCK_BENCH_TRACE"], "a", buffering=1)  # noqa: SIM115


def emit(ev: str, **fields: Any) -> None:
    line = json.dumps({"t": time.monotonic(), "rpc": _rpc.get(), "ev": ev, **fields})
    with _lock:
        _out.write(line + "\n")


def around_async(owner: Any, name: str, label: str,
                 extra: Callable[[Any, tuple[Any, ...]], dict[str, Any]] | None = None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        emit(f"{label}.begin")
        result = await original(*args, **kwargs)
        emit(f"{label}.end", **(extra(result, args) if extra else {}))
        return result

    setattr(owner, name, wrapper)


def around_sync(owner: Any, name: str, label: str,
                extra: Callable[[Any, tuple[Any, ...]], dict[str, Any]] | None = None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        emit(f"{label}.begin")
        result = original(*args, **kwargs)
        emit(f"{label}.end", **(extra(result, args) if extra else {}))
        return result

    setattr(owner, name, wrapper)


def install() -> None:
    from airlock_broker.api import answers, servicer
    from airlock_broker.conversion import jobs
    from airlock_broker.conversion.audit import AuditLog
    from airlock_broker.sandboxes import docker_sandbox
    from airlock_broker.sandboxes.pools import Pools
    from airlock_broker.sandboxes.workspace import JobWorkspace

    convert = servicer.ConversionServicer.Convert

    async def traced_convert(self: Any, request_iterator: Any, context: Any
                             ) -> AsyncIterator[Any]:
        _rpc.set(next(_ids))
        emit("rpc.begin")
        first = True
        async for response in convert(self, request_iterator, context):
            if first:
                emit("rpc.first_response")
                first = False
            yield response
        emit("rpc.end")

    servicer.ConversionServicer.Convert = traced_convert  # type: ignore[method-assign]

    original_request = servicer.job_request  # type: ignore[attr-defined]

    def traced_request(meta: Any, job_id: str, **kw: Any) -> Any:
        emit("job", job_id=job_id)
        return original_request(meta, job_id, **kw)

    servicer.job_request = traced_request  # type: ignore[attr-defined]
    around_async(servicer, "read_metadata", "metadata")
    around_async(servicer, "spool_chunks", "spool")
    # The same-host fast path's spool (its copy runs on a thread of the fast path's own).
    around_async(servicer, "spool_from_peer", "spool")
    around_async(Pools, "acquire", "acquire",
                 lambda slot, _a: {"warm": bool(slot.started), "profile": slot.profile})
    around_async(Pools, "release", "release")
    around_sync(JobWorkspace, "write_job_spec", "spec")
    run = docker_sandbox.DockerSandbox.run

    async def traced_run(self: Any, slot: Any, spec: Any, deadline: float) -> Any:
        # The job's own sandbox is "sandbox_run"; integrity extraction's is "extract_run".
        mode = str(getattr(spec, "mode", "convert")).lower()
        label = "extract_run" if "extract" in mode else "sandbox_run"
        emit(f"{label}.begin", profile=slot.profile)
        out = await run(self, slot, spec, deadline)
        emit(f"{label}.end", wait_s=out.duration_seconds, exit=out.exit_code)
        return out

    docker_sandbox.DockerSandbox.run = traced_run  # type: ignore[method-assign,assignment]
    around_async(docker_sandbox.DockerSandbox, "start", "container_start")
    around_async(docker_sandbox.DockerSandbox, "prepare", "container_prepare")

    def report_timings(report: Any, _a: Any) -> dict[str, Any]:
        timings = (report or {}).get("timings") if isinstance(report, dict) else None
        return {"timings": timings if isinstance(timings, dict) else {}}

    around_sync(jobs, "read_report", "read_report", report_timings)
    around_async(jobs, "validate_output", "validate")
    around_sync(servicer, "result_message", "result_message")
    # The answer's steps, one by one.
    around_sync(servicer, "statement", "statement")
    around_sync(servicer, "sign", "sign")
    around_async(servicer, "spool_answer", "answer_spool")
    around_async(answers, "write_to_peer", "peer_write")
    around_sync(AuditLog, "write", "audit")
    around_sync(answers.Answer, "close", "answer_close")
    around_sync(answers.Answer, "keep", "answer_keep")


def main() -> int:
    install()
    from airlock_broker.__main__ import main as broker_main

    return broker_main(sys.argv[1:])  # airlock-broker's arguments: serve ...


if __name__ == "__main__":
    sys.exit(main())

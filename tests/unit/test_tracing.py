"""The job steps' events (tracing.py): what bench.profile's phase table is read from, and
nothing at all when they are off."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from pathlib import Path

import pytest

from airlock_broker.config import BrokerConfig
from airlock_broker.tracing import NO_TRACE, Trace
from airlock_client import Client
from bench.profile import _SERVER_ORDER
from tests.unit.test_broker import PICKLE, audit_records, make_broker, write_safetensors

__all__ = ["make_broker"]  # the fixture


def _events(path: Path, until: str, timeout: float = 10.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        events = [json.loads(line) for line in path.read_text().splitlines()]
        if any(e["ev"] == until for e in events) or time.monotonic() > deadline:
            return events
        time.sleep(0.02)


def test_off_the_hooks_write_nothing_and_allocate_nothing() -> None:
    assert not NO_TRACE and NO_TRACE.span("a") is NO_TRACE.span("b")

    def hooks() -> None:
        for _ in range(10_000):
            NO_TRACE.event("step")
            with NO_TRACE.span("step") as span:
                if span:
                    span.note({"never": "built"})

    hooks()  # warm: anything cached on first use is in place
    before = sys.getallocatedblocks()
    hooks()
    assert sys.getallocatedblocks() - before < 10  # noise from the interpreter, not per event


def test_on_each_call_is_numbered_and_a_span_says_how_it_ended(tmp_path: Path) -> None:
    trace = Trace.to_file(tmp_path / "events.jsonl")

    async def call(fail: bool) -> None:
        trace.rpc()
        with trace.span("step") as span:
            span.note({"n": 1})
            if fail:
                raise ValueError("no")

    async def scenario() -> None:
        trace.event("background")
        await asyncio.create_task(call(False))
        with pytest.raises(ValueError):
            await asyncio.create_task(call(True))

    asyncio.run(scenario())
    trace.close()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["rpc"], e["ev"]) for e in events] == [
        (0, "background"), (1, "rpc.begin"), (1, "step.begin"), (1, "step.end"),
        (2, "rpc.begin"), (2, "step.begin"), (2, "step.end")]
    assert events[3]["n"] == 1 and "error" not in events[3]
    assert events[6]["error"] == "ValueError"
    assert all(a["t"] <= b["t"] for a, b in itertools.pairwise(events))
    assert (tmp_path / "events.jsonl").stat().st_mode & 0o777 == 0o600


def test_a_broker_with_trace_events_tells_each_step_of_a_job(make_broker,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    # One sandbox: the phases bench.profile cuts at (the integrity reading has its own span).
    address, _ = make_broker(write_safetensors, trace_events=path, verify_integrity=False)
    src = tmp_path / "model.pkl"
    src.write_bytes(PICKLE)
    with Client(address) as client:
        result = client.convert(src, tmp_path / "out.safetensors")
    events = [e for e in _events(path, "rpc.end") if e["rpc"]]
    names = [e["ev"] for e in events]
    # Every event bench.profile's phase table is cut at, in its order, in the call's number.
    assert {e["rpc"] for e in events} == {events[0]["rpc"]}
    assert [n for n in names if n in _SERVER_ORDER] == _SERVER_ORDER
    assert next(e for e in events if e["ev"] == "job")["job_id"] == result.job_id
    acquired = next(e for e in events if e["ev"] == "acquire.end")
    assert acquired["profile"] and acquired["warm"] is False
    ran = next(e for e in events if e["ev"] == "sandbox_run.end")
    assert ran["exit"] == 0 and isinstance(ran["wait_s"], float)
    for step in ("spool", "statement", "sign", "answer_spool", "answer_store", "audit",
                 "read_report"):
        assert f"{step}.begin" in names and f"{step}.end" in names
    assert audit_records(tmp_path, 1)[0]["outcome"] == "ok"


def test_trace_events_is_read_from_the_observability_section(tmp_path: Path) -> None:
    toml = tmp_path / "airlock.toml"
    toml.write_text(f'[observability]\ntrace_events = "{tmp_path / "e.jsonl"}"\n')
    assert BrokerConfig.load(toml, state_root=tmp_path).trace_events == tmp_path / "e.jsonl"
    assert BrokerConfig(state_root=tmp_path).trace_events is None
    toml.write_text("[observability]\nevents = 1\n")
    with pytest.raises(ValueError, match=r"unknown keys in \[observability\]"):
        BrokerConfig.load(toml, state_root=tmp_path)

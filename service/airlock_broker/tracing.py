"""Timestamped events around a job's steps, for ``bench.profile``'s phase table. Off by default.

``[observability] trace_events = "/path/events.jsonl"`` makes the broker append one JSON object
per line: ``{"t": <CLOCK_MONOTONIC seconds>, "rpc": <n>, "ev": <name>, ...}``. CLOCK_MONOTONIC
is shared by every process on the machine, so a client's own timestamps can be merged with
these. ``rpc`` numbers the Convert calls from 1, in the call's task and the tasks it starts (0:
background work, such as pool replenishment). A span writes ``<name>.begin`` and
``<name>.end`` (the end with ``error`` when its block raised).

Events (who emits them): ``rpc.begin``/``rpc.end`` (api.servicer); ``job`` (the job id),
``metadata``, ``spool``, ``answer_spool``, ``answer_store``, ``audit`` (conversion.pipeline);
``statement``, ``sign``, ``result_message`` (api.servicer's signed header); ``peer_write``
(fastpath.peer_transfer); ``acquire`` (``warm``, ``profile``), ``sandbox_run`` and
``extract_run`` (``profile``, ``wait_s``, ``exit``), ``read_report`` (the worker's
``timings``), ``validate``, ``release`` (conversion.jobs); ``container_prepare``,
``container_start``, ``spec`` (sandboxes.docker_sandbox).

Off, a hook costs a method call and allocates nothing: ``event`` and ``span`` take their
fields as one optional mapping, the disabled span is one shared object, and the few fields that
cost something to build are built under ``if trace:`` only.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from airlock_broker.security.state_dirs import open_private_file

log = logging.getLogger(__name__)

#: Which Convert call the running code serves (0: none, background work).
_RPC: contextvars.ContextVar[int] = contextvars.ContextVar("airlock_trace_rpc", default=0)
_NO_FIELDS: Mapping[str, Any] = {}


class Trace:
    """Where events go: a JSONL file, or nowhere (``NO_TRACE``). Thread-safe; ``close`` once."""

    __slots__ = ("_ids", "_lock", "_out")

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    @classmethod
    def to_file(cls, path: Path) -> Trace:
        """Append to ``path`` a line at a time: a 0600 file of the broker's, opened as the
        audit log is (no link followed, no other owner: the broker runs as root)."""
        fd = open_private_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return cls(os.fdopen(fd, "a", buffering=1, encoding="utf-8"))

    def __bool__(self) -> bool:
        return self._out is not None

    def rpc(self) -> None:
        """Number the call being served (in its task's context) and write ``rpc.begin``."""
        if self._out is None:
            return
        _RPC.set(next(self._ids))
        self.event("rpc.begin")

    def event(self, name: str, fields: Mapping[str, Any] = _NO_FIELDS) -> None:
        if self._out is None:
            return
        line = json.dumps({"t": time.monotonic(), "rpc": _RPC.get(), "ev": name, **fields},
                          default=str)
        with self._lock:
            out = self._out
            if out is None:
                return  # closed meanwhile
            try:
                out.write(line + "\n")
            except (OSError, ValueError) as exc:
                # A full disk must not fail the job being measured: measuring stops.
                self._out = None
                log.warning("trace events stopped: %s", exc)
                with contextlib.suppress(OSError):
                    out.close()

    def span(self, name: str) -> Span:
        """``with trace.span("x"):`` writes ``x.begin`` and ``x.end``."""
        if self._out is None:
            return _OFF
        return Span(self, name)

    def close(self) -> None:
        with self._lock:
            out, self._out = self._out, None
        if out is not None:
            with contextlib.suppress(OSError):  # never in the way of the broker's shutdown
                out.close()


class Span:
    """One step's begin and end; ``note`` adds fields to the end (only where tracing is on:
    ``if span: span.note({...})``)."""

    __slots__ = ("_end", "_name", "_trace")

    def __init__(self, trace: Trace | None, name: str) -> None:
        self._trace = trace
        self._name = name
        self._end: Mapping[str, Any] = _NO_FIELDS

    def __bool__(self) -> bool:
        return self._trace is not None

    def note(self, fields: Mapping[str, Any]) -> None:
        if self._trace is not None:
            self._end = fields

    def __enter__(self) -> Span:
        if self._trace is not None:
            self._trace.event(self._name + ".begin")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._trace is None:
            return
        fields = self._end if kind is None else {**self._end, "error": kind.__name__}
        self._trace.event(self._name + ".end", fields)


_OFF = Span(None, "")
#: The default everywhere: tracing off.
NO_TRACE = Trace()

__all__ = ["NO_TRACE", "Span", "Trace"]

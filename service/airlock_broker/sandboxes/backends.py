"""Which ``SandboxBackend`` the broker and its operator commands run on: the one place that
names a concrete backend (the local Docker engine today)."""

from __future__ import annotations

from pathlib import Path

from airlock_broker.sandboxes.docker_sandbox import DockerSandbox
from airlock_broker.sandboxes.sandbox import SandboxBackend
from airlock_broker.tracing import NO_TRACE, Trace
from airlock_sandbox.policy import SandboxPolicy


def make_backend(policy: SandboxPolicy, spool_root: Path, *, threads: int = 16,
                 trace: Trace = NO_TRACE) -> SandboxBackend:
    """The backend for ``policy``, whose workspaces live under ``spool_root``; its steps go
    to ``trace``."""
    return DockerSandbox(policy, spool_root, threads=threads, trace=trace)

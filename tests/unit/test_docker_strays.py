"""The Docker adapter's sweep: dead brokers' orphans and this broker's strays go, the rest stays.

A stray is a container with this broker's label whose slot the broker no longer owns: a create
whose answer was lost, or a removal that failed while the engine was away. A fake Docker API
client stands at the seam (only the two calls the sweep makes).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from airlock_broker.docker_sandbox import LABEL_BROKER, LABEL_SLOT, DockerSandbox, broker_identity
from airlock_sandbox.policy import SandboxPolicy


class FakeApi:
    def __init__(self, containers: list[dict[str, Any]]) -> None:
        self.listed = containers
        self.removed: list[str] = []

    def containers(self, all: bool, filters: dict[str, str]) -> list[dict[str, Any]]:
        return self.listed

    def remove_container(self, container_id: str, force: bool, v: bool) -> None:
        self.removed.append(container_id)


class FakeClient:
    def __init__(self, api: FakeApi) -> None:
        self.api = api

    def close(self) -> None:
        pass


def _container(cid: str, owner: str, slot: str) -> dict[str, Any]:
    return {"Id": cid, "Labels": {"airlock.managed": "true", LABEL_BROKER: owner,
                                  LABEL_SLOT: slot}}


def test_sweep_removes_strays_and_dead_brokers_orphans_only(tmp_path: Path) -> None:
    me = broker_identity()
    alive_other = broker_identity().rsplit(":", 2)[0] + f":1:{_start_of(1)}"  # PID 1 lives
    dead = me.rsplit(":", 2)[0] + ":999999999:12345"
    api = FakeApi([
        _container("owned", me, "slot-owned"),
        _container("stray", me, "slot-lost"),
        _container("orphan", dead, "x"),
        _container("neighbour", alive_other, "y"),
    ])
    sandbox = DockerSandbox(SandboxPolicy(), tmp_path, client=FakeClient(api))  # type: ignore[arg-type]
    sandbox._owned.add("slot-owned")

    async def sweep() -> int:
        try:
            return await sandbox.reap_orphans()
        finally:
            await sandbox.close()

    assert asyncio.run(sweep()) == 2
    assert sorted(api.removed[:2]) == ["orphan", "stray"]


def _start_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rsplit(b")", 1)[1].split()[19].decode()


def test_identity_is_this_process() -> None:
    assert broker_identity().split(":")[1] == str(os.getpid())

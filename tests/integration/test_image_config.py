"""Threat: an image whose own configuration weakens every sandbox made from it (a rebuilt or
substituted ``airlock-sandbox`` image). Its settings are inherited by each container unless
the create request overrides them, so the broker overrides them and the self-test reads the
result back from the engine. In-process on the real engine: a tiny image built ``FROM`` the
sandbox image (metadata only, no network), a sandbox prepared and started from it by the
Docker adapter, and the engine's own record judged by the self-test's configuration checks."""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.ops.selftest import config_checks
from airlock_broker.sandboxes.docker_hardening import confinement_of
from airlock_broker.sandboxes.docker_sandbox import DockerSandbox
from airlock_broker.sandboxes.workspace import reap_stale
from airlock_sandbox.formats import PROFILE_LIGHT
from airlock_sandbox.policy import SandboxPolicy
from tests.conftest import IMAGE

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def _image_from_sandbox(docker_client: Any, *lines: str) -> Iterator[str]:
    """A tag for the sandbox image plus ``lines`` of Dockerfile, removed afterwards."""
    tag = f"airlock-test-image-config-{uuid.uuid4().hex[:12]}:latest"
    dockerfile = "\n".join([f"FROM {IMAGE}", *lines, ""]).encode()
    docker_client.images.build(fileobj=io.BytesIO(dockerfile), tag=tag, rm=True,
                               network_mode="none", pull=False)
    try:
        yield tag
    finally:
        docker_client.api.remove_image(tag, force=True)


def _sandbox_record(image: str, spool: Path, *, start: bool) -> dict[str, Any]:
    """``docker inspect`` of a job's sandbox made from ``image`` by the Docker adapter."""
    async def scenario() -> dict[str, Any]:
        backend = DockerSandbox(SandboxPolicy(image=image), spool)
        try:
            await backend.check()
            slot = await backend.prepare(PROFILE_LIGHT)
            try:
                if start:
                    await backend.start(slot)
                info: dict[str, Any] = await asyncio.to_thread(
                    backend.client.api.inspect_container, slot.container_id)
                return info
            finally:
                await backend.destroy(slot)
        finally:
            await backend.close()

    spool.mkdir(mode=0o700, exist_ok=True)  # a state root, as the broker makes it
    try:
        return asyncio.run(scenario())
    finally:
        reap_stale(spool)


def _failed(info: dict[str, Any]) -> set[str]:
    return {c.name for c in config_checks(confinement_of(info), SandboxPolicy()) if not c.passed}


def test_an_images_healthcheck_never_runs_in_a_sandbox(docker_client: Any,
                                                       tmp_path: Path) -> None:
    """With a HEALTHCHECK in the image, the engine would exec its command into every sandbox
    every second (DESIGN §1.2: never exec into a sandbox). The sandbox says NONE, the engine
    tracks no health for it, and a container that inherits the check fails the self-test."""
    with _image_from_sandbox(docker_client,
                             'HEALTHCHECK --interval=1s CMD ["python3", "-c", "0"]') as tag:
        image = docker_client.api.inspect_image(tag)
        assert image["Config"]["Healthcheck"]["Test"][0] == "CMD"  # the image carries one

        info = _sandbox_record(tag, tmp_path / "spool", start=True)
        assert info["Config"]["Healthcheck"]["Test"] == ["NONE"]
        assert "Health" not in info["State"], info["State"]
        assert "no_healthcheck" not in _failed(info)

        # A container made without the override, as the engine records it: refused.
        inherits = docker_client.api.create_container(tag, command=["true"])
        try:
            record = docker_client.api.inspect_container(inherits["Id"])
        finally:
            docker_client.api.remove_container(inherits["Id"], force=True)
        assert record["Config"]["Healthcheck"]["Test"][0] == "CMD"
        assert "no_healthcheck" in _failed(record)


def test_an_images_volume_fails_the_self_test(docker_client: Any, tmp_path: Path) -> None:
    """A ``VOLUME`` in the image gives every sandbox an anonymous volume: writable under a
    read-only root, exec-capable, capped by nothing but the host's disk. The engine lists it
    among the sandbox's mounts, beside the job's two binds, and the self-test refuses it
    (before: only binds were counted, and it passed)."""
    with _image_from_sandbox(docker_client, "VOLUME /data") as tag:
        info = _sandbox_record(tag, tmp_path / "spool", start=False)
        kinds = sorted((m["Type"], m["Destination"]) for m in info["Mounts"])
        assert ("volume", "/data") in kinds, kinds
        assert "only_job_mounts" in _failed(info)

    # The sandbox image itself: the job's binds and nothing else, and what the engine lists
    # of them is exactly what the check expects (the tmpfs /tmp and /dev/shm are not listed).
    info = _sandbox_record(IMAGE, tmp_path / "spool", start=False)
    assert sorted((m["Type"], m["Destination"]) for m in info["Mounts"]) == [
        ("bind", "/airlock/in"), ("bind", "/airlock/out")]
    assert "only_job_mounts" not in _failed(info)

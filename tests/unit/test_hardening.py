"""The sandbox policy is frozen, validated data, and it reaches Docker intact."""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

import pytest

from airlock_broker.docker_sandbox import create_kwargs
from airlock_broker.workspace import JobWorkspace
from airlock_sandbox.contract import IN_DIR, OUT_DIR
from airlock_sandbox.policy import SandboxPolicy


def _kwargs(policy: SandboxPolicy, tmp_path: Path) -> dict[str, object]:
    ws = JobWorkspace(root=tmp_path, uid=10001, gid=10001)
    return create_kwargs(policy, ws, "sklearn", {"airlock.managed": "true"})


def test_default_policy_is_the_hardened_profile(tmp_path: Path) -> None:
    kw = _kwargs(SandboxPolicy(), tmp_path)
    assert kw["network_mode"] == "none"
    assert kw["read_only"] is True
    assert kw["cap_drop"] == ["ALL"]
    assert "no-new-privileges" in kw["security_opt"]  # type: ignore[operator]
    assert kw["user"] == "10001:10001"
    assert kw["mem_limit"] == kw["memswap_limit"]  # no swap beyond the memory limit
    assert kw["pids_limit"] and kw["nano_cpus"]
    assert kw["environment"] == {} and kw["use_config_proxy"] is False
    assert kw["log_config"]["Type"] == "none"  # type: ignore[index]
    assert kw["runtime"] == "runc"
    for mount in ("/tmp", "/dev/shm"):
        tmpfs = kw["tmpfs"][mount]  # type: ignore[index]
        assert {"noexec", "nosuid", "nodev"} <= set(tmpfs.split(","))
        assert "size=" in tmpfs and "nr_inodes=" in tmpfs  # bytes and files both capped
    mounts = {m["Target"]: m for m in kw["mounts"]}  # type: ignore[attr-defined]
    assert set(mounts) == {IN_DIR, OUT_DIR}
    assert mounts[IN_DIR]["ReadOnly"] is True
    assert all(m["Type"] == "bind" for m in mounts.values())
    assert not any("docker.sock" in str(m["Source"]) for m in mounts.values())
    assert "privileged" not in kw and "cap_add" not in kw and "devices" not in kw


@pytest.mark.parametrize("change", [
    {"user": "0:0"}, {"user": "root"}, {"runtime": "crun"}, {"pids_limit": 0},
    {"memory_bytes": 0}, {"deadline_seconds": 0}, {"security_opts": ("seccomp=unconfined",)},
    {"output_bytes": -1},
])
def test_policy_refuses_unsafe_or_unbounded_values(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SandboxPolicy(**change)  # type: ignore[arg-type]


def test_policy_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SandboxPolicy().network_disabled = False  # type: ignore[misc]


def test_weakening_is_visible(tmp_path: Path) -> None:
    weak = SandboxPolicy(network_disabled=False)
    assert weak.weakened == ("network",)
    assert SandboxPolicy().weakened == ()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_output_tmpfs_is_size_capped_noexec_and_removed(tmp_path: Path) -> None:
    ws = JobWorkspace.create(tmp_path, uuid.uuid4().hex, uid=10001, gid=10001,
                             output_bytes=1024 * 1024)
    try:
        line = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                    if line.split()[4] == str(ws.out_dir))
        opts = set(line.split()[5].split(","))
        assert {"noexec", "nosuid", "nodev"} <= opts
        with pytest.raises(OSError), (ws.out_dir / "big").open("wb") as fh:
            fh.write(b"\0" * (2 * 1024 * 1024))
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        ws.destroy()
    assert not ws.root.exists()
    assert str(ws.out_dir) not in Path("/proc/self/mountinfo").read_text()

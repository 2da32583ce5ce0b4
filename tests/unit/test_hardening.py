"""The sandbox policy is frozen, validated data, and it reaches Docker intact."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import types
import uuid
from pathlib import Path

import pytest

from airlock_broker.sandboxes.docker_hardening import create_kwargs, probe_kwargs
from airlock_broker.sandboxes.docker_sandbox import DockerSandbox
from airlock_broker.sandboxes.sandbox import SandboxUnavailable
from airlock_broker.sandboxes.workspace import JobWorkspace, reap_stale
from airlock_sandbox.contract import IN_DIR, OUT_DIR
from airlock_sandbox.policy import SandboxPolicy

ROOT = Path(__file__).resolve().parents[2]


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


def _as_docker_py_sends_it(kwargs: dict[str, object]) -> dict[str, object]:
    """The create request's body docker-py's ``containers.create`` makes of ``kwargs``."""
    from docker.models.containers import _create_container_args
    from docker.types import ContainerConfig

    args = _create_container_args({k: v for k, v in kwargs.items()
                                   if k not in {"detach", "use_config_proxy"}}
                                  | {"version": "1.41"})
    args.setdefault("command", None)
    return dict(ContainerConfig("1.41", **args))


def test_no_sandbox_inherits_the_images_healthcheck(tmp_path: Path) -> None:
    """An image's HEALTHCHECK would have the engine exec into every sandbox on a timer
    (DESIGN §1.2): jobs' containers and the version probe both say NONE, and docker-py sends
    it (before: neither did, and the image's check applied)."""
    job = _kwargs(SandboxPolicy(), tmp_path)
    probe = probe_kwargs(SandboxPolicy(), "print(1)", {"airlock.managed": "true"})
    for kwargs in (job, probe):
        assert kwargs["healthcheck"] == {"test": ["NONE"]}
        assert _as_docker_py_sends_it(kwargs)["Healthcheck"]["Test"] == ["NONE"]  # type: ignore[index]


@pytest.mark.parametrize(("runtime", "clone3"), [("runc", "SCMP_ACT_ERRNO"),
                                                 ("runsc", "SCMP_ACT_ALLOW"),
                                                 ("runsc-oci", "SCMP_ACT_ALLOW")])
def test_every_sandbox_gets_the_deny_by_default_seccomp_profile(tmp_path: Path, runtime: str,
                                                                clone3: str) -> None:
    """docker-py takes the profile's content; gVisor gets its variant (it ignores errnoRet)."""
    opts = _kwargs(SandboxPolicy(runtime=runtime), tmp_path)["security_opt"]
    (profile,) = [o.split("=", 1)[1] for o in opts if o.startswith("seccomp=")]  # type: ignore[attr-defined]
    doc = json.loads(profile)
    assert doc["defaultAction"] == "SCMP_ACT_ERRNO" and doc["defaultErrnoRet"] == 1
    allowed = {n for r in doc["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    assert allowed.isdisjoint({"unshare", "setns", "mount", "ptrace", "bpf", "io_uring_setup",
                               "keyctl", "userfaultfd", "memfd_create", "perf_event_open"})
    (rule,) = [r for r in doc["syscalls"] if "clone3" in r["names"]]
    assert rule["action"] == clone3


@pytest.mark.parametrize(("runtime", "idle_poll"), [("runc", []),
                                                    ("runsc", ["--idle-poll-ms", "50"]),
                                                    ("runsc-oci", ["--idle-poll-ms", "50"])])
def test_an_idle_worker_under_gvisor_looks_for_its_job_less_often(
        tmp_path: Path, runtime: str, idle_poll: list[str]) -> None:
    """Each look is a trip through gVisor's sentry: 13 % of a core at 5 ms (contract.py)."""
    command = _kwargs(SandboxPolicy(runtime=runtime), tmp_path)["command"]
    assert command == ["--profile", "sklearn", *idle_poll]


def test_the_committed_seccomp_profiles_are_what_the_generator_writes() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-seccomp-profile.py"),
                           "--check"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_a_weaker_seccomp_profile_is_a_visible_choice(tmp_path: Path) -> None:
    weak = SandboxPolicy(seccomp="docker-default")
    assert weak.weakened == ("seccomp=docker-default",)
    assert not any(o.startswith("seccomp") for o in _kwargs(weak, tmp_path)["security_opt"])  # type: ignore[attr-defined]
    for bad in ("unconfined", ""):
        with pytest.raises(ValueError):
            SandboxPolicy(seccomp=bad)
    with pytest.raises(ValueError):
        SandboxPolicy(security_opts=("seccomp=/tmp/other.json",))


@pytest.mark.parametrize("change", [
    {"user": "0:0"}, {"user": "root"}, {"runtime": "crun"}, {"pids_limit": 0},
    {"memory_bytes": 0}, {"deadline_seconds": 0}, {"security_opts": ("seccomp=unconfined",)},
    {"output_bytes": -1},
])
def test_policy_refuses_unsafe_or_unbounded_values(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SandboxPolicy(**change)  # type: ignore[arg-type]


#: Root however the engine's integer parse reads it, or by name (before: only "0", "root"
#: and "" were refused, compared as strings).
ROOT_USERS = ["0", "00", "+0", "-0", "0000:0", "0:10001", "root", "root:10001", "10001:0",
              "10001:00", "10001:root", ""]


@pytest.mark.parametrize("user", ROOT_USERS)
def test_the_sandbox_never_runs_as_root_however_it_is_spelled(user: str) -> None:
    with pytest.raises(ValueError, match="never runs as root") as refused:
        SandboxPolicy(user=user)
    assert repr(user) in str(refused.value)


@pytest.mark.parametrize("user", ["10001:10001", "010001:10001", "airlock", "airlock:airlock",
                                  "10001"])
def test_a_user_other_than_root_is_a_visible_choice(user: str) -> None:
    assert SandboxPolicy(user=user).user == user


def test_no_sandbox_gets_a_network_from_the_engine(tmp_path: Path) -> None:
    """Beside network mode "none", NetworkDisabled: the engine builds no libnetwork sandbox
    and runs no prestart hook for it (docker_hardening.py has the CPU this saves); runc makes
    the empty namespace itself. A policy that allows a network drops both."""
    job = _kwargs(SandboxPolicy(), tmp_path)
    probe = probe_kwargs(SandboxPolicy(), "print(1)", {"airlock.managed": "true"})
    for kwargs in (job, probe):
        sent = _as_docker_py_sends_it(kwargs)
        assert sent["NetworkDisabled"] is True
        assert sent["HostConfig"]["NetworkMode"] == "none"  # type: ignore[index]
    open_net = _as_docker_py_sends_it(_kwargs(SandboxPolicy(network_disabled=False), tmp_path))
    assert open_net["NetworkDisabled"] is False
    assert open_net["HostConfig"]["NetworkMode"] == "bridge"  # type: ignore[index]


def test_policy_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SandboxPolicy().network_disabled = False  # type: ignore[misc]


def test_weakening_is_visible(tmp_path: Path) -> None:
    weak = SandboxPolicy(network_disabled=False)
    assert weak.weakened == ("network",)
    assert SandboxPolicy().weakened == ()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root (CI runs as root)")
@pytest.mark.parametrize(("on_disk", "fstype"), [(False, "tmpfs"), (True, "ext4")])
def test_the_output_filesystem_is_capped_owned_noexec_and_removed(
        tmp_path: Path, on_disk: bool, fstype: str) -> None:
    cap = 8 * 1024 * 1024
    # A disk-backed output's image is on the disk spool, wherever its slot is (here a
    # directory standing for the RAM spool).
    slot_id = uuid.uuid4().hex
    (tmp_path / "ram").mkdir(mode=0o700)
    ws = JobWorkspace.create(tmp_path / "ram", slot_id, uid=10001, gid=10001,
                             output_bytes=cap, image_root=tmp_path if on_disk else None)
    try:
        line = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                    if line.split()[4] == str(ws.out_dir))
        fields = line.split()
        assert {"noexec", "nosuid", "nodev"} <= set(fields[5].split(","))
        assert fields[fields.index("-") + 1] == fstype
        st = ws.out_dir.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (10001, 10001, 0o700)
        assert list(ws.out_dir.iterdir()) == []  # (ext4: no lost+found) the output alone
        assert ws.root == tmp_path / "ram" / "slots" / slot_id
        if on_disk:  # the image on the disk spool is sparse until written
            assert ws.image == tmp_path / "images" / f"{slot_id}.img"
            assert ws.image.stat().st_blocks * 512 < cap
        else:
            assert ws.image is None
        with pytest.raises(OSError), (ws.out_dir / "big").open("wb") as fh:
            fh.write(b"\1" * (2 * cap))
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        ws.destroy()
    assert not ws.root.exists()
    assert not (tmp_path / "images").exists() or list((tmp_path / "images").iterdir()) == []
    assert str(ws.out_dir) not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="a loop mount needs root (CI runs as root)")
def test_a_disk_backed_output_left_by_a_dead_broker_is_unmounted_by_the_reaper(
        tmp_path: Path) -> None:
    ws = JobWorkspace.create(tmp_path, uuid.uuid4().hex, uid=10001, gid=10001,
                             output_bytes=8 * 1024 * 1024, image_root=tmp_path)
    assert reap_stale(tmp_path) == 2  # at the next start: nothing of the slot survives
    assert not ws.root.exists()
    assert ws.image is not None and not ws.image.exists()
    assert str(ws.out_dir) not in Path("/proc/self/mountinfo").read_text()


def test_what_disk_backed_outputs_need_is_named_when_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from airlock_broker.sandboxes import workspace

    assert workspace.disk_outputs_missing() is None  # this host (and CI's) has all of it
    monkeypatch.setattr(workspace.shutil, "which", lambda name, path=None: None)
    missing = workspace.disk_outputs_missing()
    assert missing is not None and "mkfs.ext4" in missing and "mount" in missing


def test_a_stuck_mkfs_is_a_sandbox_failure_with_its_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mkfs or mount past their timeout (a stuck disk, a wedged loop driver) raised
    ``subprocess.TimeoutExpired``, which no layer maps: the job failed INTERNAL. It is a
    ``WorkspaceError`` naming the tool and the timeout, so the job gets SANDBOX_UNAVAILABLE,
    and the half-made slot and image are removed."""
    from airlock_broker.sandboxes import workspace

    ran: list[str] = []

    def stuck(cmd: list[str], **kwargs: object) -> object:
        ran.append(Path(cmd[0]).name)
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])  # type: ignore[arg-type]

    monkeypatch.setattr(workspace.subprocess, "run", stuck)
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    sandbox = DockerSandbox(SandboxPolicy(), spool, client=types.SimpleNamespace())  # type: ignore[arg-type]

    async def prepare() -> None:
        try:
            await sandbox.prepare("torch", disk_output_bytes=64 * 1024 * 1024)
        finally:
            sandbox._pool.shutdown(wait=False)

    with pytest.raises(SandboxUnavailable) as failed:
        asyncio.run(prepare())
    assert ran == ["mkfs.ext4"]
    assert isinstance(failed.value.__cause__, workspace.WorkspaceError)
    assert "mkfs.ext4 did not finish within 60 s" in str(failed.value)
    assert [p for p in spool.rglob("*") if p.is_file() or p.parent.name == "slots"] == []


class _EngineStub:
    """Just enough of docker.DockerClient for DockerSandbox.check()."""

    def __init__(self, runtimes: dict[str, object]) -> None:
        self.runtimes = runtimes
        self.images = types.SimpleNamespace(get=lambda name: types.SimpleNamespace(id="sha256:x"))
        self.api = types.SimpleNamespace(containers=lambda **filters: [])

    def ping(self) -> bool:
        return True

    def info(self) -> dict[str, object]:
        return {"Runtimes": self.runtimes}

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("args", "seccomp", "refused"), [
    (["--network=none"], "airlock", True),  # a registration from before --oci-seccomp
    (["--network=none", "--oci-seccomp"], "airlock", False),
    (["--network=none"], "docker-default", False),  # nothing of ours to apply
])
def test_runsc_without_oci_seccomp_is_refused_at_start(tmp_path: Path, args: list[str],
                                                       seccomp: str, refused: bool) -> None:
    """runsc drops a container's seccomp profile unless registered with --oci-seccomp."""
    engine = _EngineStub({"runc": {"path": "runc"}, "runsc": {"path": "runsc",
                                                              "runtimeArgs": args}})
    backend = DockerSandbox(SandboxPolicy(runtime="runsc", seccomp=seccomp), tmp_path,
                            client=engine)  # type: ignore[arg-type]
    try:
        if refused:
            with pytest.raises(SandboxUnavailable, match="--oci-seccomp"):
                asyncio.run(backend.check())
        else:
            asyncio.run(backend.check())
    finally:
        asyncio.run(backend.close())


def test_a_container_runs_the_image_id_checked_not_whatever_the_tag_names_now(
        tmp_path: Path) -> None:
    """Found by review: containers were created from the tag while provenance signed the id
    read at the last check, so between a retag (``make image``) and the next sweep's check a
    job ran one image and its record named another. Both a job's container and a probe are
    created from the id checked."""
    import docker

    created: list[dict[str, object]] = []

    def create(**kwargs: object) -> None:
        created.append(kwargs)
        raise docker.errors.APIError("no container in this test")

    engine = _EngineStub({"runc": {"path": "runc"}})
    engine.containers = types.SimpleNamespace(create=create)  # type: ignore[attr-defined]
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    backend = DockerSandbox(SandboxPolicy(), spool, client=engine)  # type: ignore[arg-type]

    async def run() -> None:
        try:
            assert await backend.check() == "sha256:x"
            with pytest.raises(SandboxUnavailable):
                await backend.prepare("sklearn")
            with pytest.raises(SandboxUnavailable):
                await backend._probe_image("print(1)")
        finally:
            await backend.close()

    asyncio.run(run())
    assert [kw["image"] for kw in created] == ["sha256:x", "sha256:x"]
    assert SandboxPolicy().image != "sha256:x"


def test_a_slot_whose_output_cannot_be_unmounted_is_left_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed unmount was only logged: the removal then walked the sandbox's own
    filesystem (on ext4, as many hard links as it made), and the image was unlinked under
    its loop device, which nothing tracked any more."""
    from airlock_broker.sandboxes import workspace

    ws = JobWorkspace.create(tmp_path, uuid.uuid4().hex, uid=10001, gid=10001,
                             output_bytes=8 * 1024 * 1024, image_root=tmp_path)
    (ws.out_dir / "written").write_bytes(b"the sandbox's")
    try:
        with monkeypatch.context() as patched:
            patched.setattr(workspace._libc, "umount2", lambda *_args: -1)
            ws.destroy()
        assert (ws.out_dir / "written").read_bytes() == b"the sandbox's"
        assert ws.image is not None and ws.image.exists()
    finally:
        ws.destroy()
    assert not ws.root.exists() and not ws.image.exists()
    assert str(ws.out_dir) not in Path("/proc/self/mountinfo").read_text()

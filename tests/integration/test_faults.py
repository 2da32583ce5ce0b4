"""Faults survived, with the real engine (issue 5, "Faults survived").

- the Docker engine stops mid-job: that job fails UNAVAILABLE with a reason, the broker stays
  up and says why (health, pool status, refusals), and serves again once the engine is back;
- a sandbox is killed from outside mid-job: SANDBOX_KILLED with the signal, nothing leaked;
- the broker is SIGKILLed mid-job: its successor reaps the orphan container, the half-written
  upload, the kept results and the output mounts.

Stopping the engine disturbs everyone on this machine: that test keeps the engine down for as
short a time as it can (it restarts it as soon as the outage has been observed) and always
restarts it, in a ``finally``, with scripts/ensure-docker.sh.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_client import Client, ConversionError, ServiceUnavailable
from tests.adversarial import payloads
from tests.conftest import IMAGE, ROOT, spool_dirs
from tests.integration import pool_helpers as ph

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DOCKER_PID = Path("/var/run/docker.pid")


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.RpcError:
            return -1
        return int(reply.status)


def _busy(docker_client: Any, broker: ph.PoolBroker) -> list[Any]:
    """The broker's containers that hold a job (their input directory is not empty)."""
    return [c for c in ph.containers_of(docker_client, broker.identity, running_only=True)
            if not ph.is_idle(c, broker.spool)]


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _spool_files(spool: Path, sub: str) -> list[str]:
    """The entries of ``sub`` on the spool's disk and in its RAM spool."""
    return sorted(p.name for base in spool_dirs(spool, sub) if base.is_dir()
                  for p in base.iterdir())


def _warm_slots_only(docker_client: Any, broker: ph.PoolBroker) -> None:
    """Every slot directory and output mount left belongs to an idle warm container.

    The pool may be starting a replacement meanwhile (it starts once the job that took the warm
    one has ended), so the warm set is read again until the two agree, within a bound.
    """
    warm: set[str] = set()

    def only_warm() -> bool:
        nonlocal warm
        warm = {c.labels[ph.LABEL_SLOT] for c in ph.containers_of(docker_client, broker.identity)
                if ph.is_idle(c, broker.spool)}
        return set(_spool_files(broker.spool, "slots")) <= warm

    ph.wait_for(only_warm, 60, "only warm slot directories",
                lambda: f"slots {_spool_files(broker.spool, 'slots')}, warm {warm}")
    mounts = ph.slot_mounts(broker.spool)
    assert all(any(s in m for s in warm) for m in mounts), f"stray mounts: {mounts}"
    assert _spool_files(broker.spool, "uploads") == []


def _describe(docker_client: Any, broker: ph.PoolBroker) -> str:
    return "\n".join(f"{c.id[:12]} {c.status} created {c.attrs.get('Created')} slot "
                     f"{c.labels.get(ph.LABEL_SLOT)}" for c in
                     ph.containers_of(docker_client, broker.identity)) + "\n" + broker.log_tail()


# -- the engine stops mid-job -------------------------------------------------------------------


def _engine_pid() -> int:
    return int(DOCKER_PID.read_text().strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


DOCKERD_LOG = Path(os.environ.get("AIRLOCK_DOCKERD_LOG", "/var/log/airlock-dockerd.log"))


def _engine_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


def _children(pid: int) -> list[int]:
    """dockerd's own containerd: a new engine cannot start while the old one holds its socket."""
    run = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in run.stdout.split()]


def _restart_engine(pids: list[int], keep_log: Path) -> None:
    """Wait for the stopping engine (dockerd and its containerd) to exit, killing it if it
    hangs, then start it again.

    ensure-docker.sh starts a new log: the stopping engine's is kept in ``keep_log`` first.
    It is tried twice, and what it said is shown if the engine still does not answer.
    """
    began = time.monotonic()
    while any(_alive(p) for p in pids) and time.monotonic() - began < 30:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            print(f"{pid} still stopping after 30 s: SIGKILL")
            os.kill(pid, signal.SIGKILL)
            time.sleep(1)
    print(f"old engine gone after {time.monotonic() - began:.1f} s")
    with contextlib.suppress(OSError):
        keep_log.write_bytes(DOCKERD_LOG.read_bytes()[-200_000:])
    said = []
    for _ in range(2):
        run = subprocess.run([str(ROOT / "scripts" / "ensure-docker.sh")], timeout=120,
                             capture_output=True, text=True, env={**os.environ,
                                                                 "AIRLOCK_DOCKER_WAIT": "30"})
        said.append(f"exit {run.returncode}: {run.stdout}{run.stderr}")
        print(f"ensure-docker.sh {said[-1].strip()}")
        if _engine_up():
            print(f"engine restarted {time.monotonic() - began:.1f} s after the stop was done")
            return
    raise AssertionError("could not restart the Docker engine:\n" + "\n".join(said))


@contextlib.contextmanager
def engine_stopped(keep_log: Path) -> Iterator[float]:
    """SIGTERM to dockerd (as ``systemctl stop docker`` would); always restarted on exit."""
    pid = _engine_pid()
    pids = [pid, *_children(pid)]
    began = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    try:
        yield began
    finally:
        stopping = time.monotonic()
        _restart_engine(pids, keep_log)
        print(f"engine down for {time.monotonic() - began:.1f} s (stopped and restarted in "
              f"{time.monotonic() - stopping:.1f} s once the test was done with it)")


def test_engine_stop_mid_job_fails_it_unavailable_and_the_broker_recovers(
        docker_client: Any, tmp_path: Path) -> None:
    config = ph.write_config(tmp_path, {"min_warm": 1, "profiles": ["sklearn"],
                                        "engine_check_seconds": 0.5, "sweep_seconds": 2},
                             sandbox={"image": IMAGE})
    broker = ph.launch(tmp_path, config)
    try:
        ph.wait_settled(broker, 1, ("sklearn",))
        slow = payloads.fake_success_pickle(tmp_path / "slow.pkl", sleep_seconds=120)
        quick = payloads.fake_success_pickle(tmp_path / "quick.pkl")
        job, box = _in_thread(lambda: Client(broker.address, retry_attempts=1).convert(
            slow, tmp_path / "slow.safetensors"))
        ph.wait_for(lambda: _busy(docker_client, broker), 60, "the job's sandbox to run")

        with engine_stopped(tmp_path / "dockerd.log") as began:
            job.join(45)
            assert not job.is_alive(), "the job did not end when the engine stopped"
            failure = box.get("error")
            assert isinstance(failure, ServiceUnavailable), f"{box}\n{broker.log_tail()}"
            assert failure.reason == "SANDBOX_UNAVAILABLE" and "engine" in failure.message
            print(f"job failed {time.monotonic() - began:.1f} s after the stop: {failure}")
            # The broker stays up and says why: health, pool status, and at once on a new job.
            ph.wait_for(lambda: _health(broker.address) == NOT_SERVING, 30,
                        "health NOT_SERVING", broker.log_tail)
            assert broker.proc.process.poll() is None
            why = broker.status()["sklearn"].unavailable
            assert "engine" in why, why
            refused_at = time.monotonic()
            with pytest.raises(ServiceUnavailable) as info:
                Client(broker.address, retry_attempts=1).convert(quick, tmp_path / "q.out")
            assert info.value.reason == "SANDBOX_UNAVAILABLE" and "engine" in info.value.message
            assert time.monotonic() - refused_at < 30  # at once: no start tried and failed

        # Back: the same broker (the same docker-py client) serves again and the pool refills.
        ph.wait_for(lambda: _health(broker.address) == SERVING, 60, "health SERVING again",
                    broker.log_tail)
        assert broker.status()["sklearn"].unavailable == ""
        ph.wait_for(lambda: broker.status()["sklearn"].warm >= 1, 90, "the pool to refill",
                    broker.log_tail)
        with Client(broker.address, retry_attempts=1) as client:
            assert client.convert(quick, tmp_path / "q.safetensors").format == "safetensors"
        # Nothing left from before the outage: the dead job's container went with the engine
        # restart or was removed once the engine answered; only the new warm one remains.
        ph.wait_for(lambda: all(ph.is_idle(c, broker.spool)
                                for c in ph.containers_of(docker_client, broker.identity)),
                    30, "only idle warm containers",
                    lambda: _describe(docker_client, broker))
        _warm_slots_only(docker_client, broker)
    finally:
        ph.stop_cleanly(broker, docker_client)


# -- a sandbox killed from outside ----------------------------------------------------------------


def test_a_sandbox_killed_from_outside_fails_its_job_with_the_signal_and_leaks_nothing(
        docker_client: Any, tmp_path: Path) -> None:
    config = ph.write_config(tmp_path, {"min_warm": 1, "profiles": ["sklearn"]},
                             sandbox={"image": IMAGE})
    with ph.running_broker(tmp_path, config, docker_client) as broker:
        ph.wait_settled(broker, 1, ("sklearn",))
        slow = payloads.fake_success_pickle(tmp_path / "slow.pkl", sleep_seconds=120)
        job, box = _in_thread(lambda: Client(broker.address, retry_attempts=1).convert(
            slow, tmp_path / "slow.safetensors"))
        busy = ph.wait_for(lambda: _busy(docker_client, broker), 60, "the job's sandbox")
        assert len(busy) == 1
        docker_client.api.kill(busy[0].id)  # found by Airlock's labels, killed from outside
        job.join(30)
        failure = box.get("error")
        assert isinstance(failure, ConversionError), box
        assert (failure.reason, failure.code) == ("SANDBOX_KILLED", "ABORTED"), failure
        assert "signal 9" in failure.message and "from outside" in failure.message
        assert not (tmp_path / "slow.safetensors").exists()
        assert ph.removed(docker_client, busy[0].id), "the killed sandbox was not removed"
        _warm_slots_only(docker_client, broker)
        # The next job is served.
        quick = payloads.fake_success_pickle(tmp_path / "quick.pkl")
        with Client(broker.address, retry_attempts=1) as client:
            assert client.convert(quick, tmp_path / "q.safetensors").format == "safetensors"


# -- the broker SIGKILLed mid-job --------------------------------------------------------------


def test_a_sigkilled_broker_leaves_nothing_its_successor_does_not_reap(
        docker_client: Any, tmp_path: Path) -> None:
    config = ph.write_config(tmp_path / "first", {"min_warm": 0}, sandbox={"image": IMAGE})
    first = ph.launch(tmp_path / "first", config)
    stalled = threading.Event()
    try:
        # A kept result (idempotency store), a job in its sandbox, an upload half-way.
        quick = payloads.fake_success_pickle(tmp_path / "quick.pkl")
        first.client.convert(quick, tmp_path / "q.safetensors")
        # The broker answers as soon as the kernel says the sandbox is dead (exit_watch.py),
        # before the engine does and before its background removal: until that is done, the
        # quick job's container could pass for the slow job's below.
        ph.wait_for(lambda: not ph.containers_of(docker_client, first.identity), 30,
                    "the quick job's sandbox removed")
        slow = payloads.fake_success_pickle(tmp_path / "slow.pkl", sleep_seconds=120)
        _in_thread(lambda: Client(first.address, retry_attempts=1).convert(
            slow, tmp_path / "slow.safetensors"))
        job = ph.wait_for(lambda: _busy(docker_client, first), 60, "the job's sandbox")[0]

        def half_upload() -> Iterator[pb.ConvertRequest]:
            data = b"\x80\x04\x95" + b"\0" * 1000
            yield pb.ConvertRequest(metadata=pb.ConvertMetadata(size_bytes=100_000))
            yield pb.ConvertRequest(chunk=pb.Chunk(data=data, crc32=zlib.crc32(data)))
            stalled.wait(60)

        channel = grpc.insecure_channel(first.address)
        call = pb_grpc.ConversionServiceStub(channel).Convert(half_upload(), timeout=120)
        ph.wait_for(lambda: _spool_files(first.spool, "uploads"), 60, "the half upload")
        assert _spool_files(first.spool, "results"), "the first job's result should be kept"

        first.proc.process.send_signal(signal.SIGKILL)
        first.proc.process.wait(30)
        stalled.set()
        call.cancel()
        channel.close()
        assert ph.exists(docker_client, job.id), "the job's sandbox should outlive its broker"
        assert ph.slot_mounts(first.spool), "its output mount should remain"

        (tmp_path / "second").mkdir()
        second = ph.launch(tmp_path / "second", config, spool=first.spool)
        try:
            assert not ph.exists(docker_client, job.id), "the orphan was not reaped"
            assert _spool_files(first.spool, "uploads") == []
            assert _spool_files(first.spool, "results") == []
            assert _spool_files(first.spool, "slots") == []
            assert ph.slot_mounts(first.spool) == []
            with Client(second.address, retry_attempts=1) as client:
                result = client.convert(quick, tmp_path / "again.safetensors")
            assert result.format == "safetensors"
        finally:
            ph.stop_cleanly(second, docker_client)
    finally:
        stalled.set()
        first.stop()

"""Threat class C: a payload that exhausts what it is given - processes, memory, CPU, time,
disk and inodes, the log pipe - to hurt the host, the broker or other jobs.

The adversarial broker runs with tight limits (conftest.ADVERSARIAL_CONFIG) and the deadline
cases ask for 5 s, so each case hits its limit within seconds. Every case must end in a
defined outcome, bounded by the limit rather than by luck, with the broker intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airlock_sandbox.policy import SandboxPolicy
from tests.adversarial import payloads
from tests.adversarial.conftest import MEMORY_BYTES, OUTPUT_BYTES, PIDS_LIMIT, TMPFS_BYTES
from tests.adversarial.oracles import (
    Observers,
    assert_contained,
    broker_rss_bytes,
    findings,
    observers,  # noqa: F401  (fixture)
    run_case,
)
from tests.conftest import BrokerProcess

pytestmark = pytest.mark.adversarial

DEADLINE = 5
#: Time the broker may take beyond a deadline to kill, collect and answer.
KILL_SLACK = 30
MiB = 1024**2
TMPFS_INODES = SandboxPolicy().tmpfs_inodes


def _probe(tmp_path: Path, case: str, body: str, **params: object) -> Path:
    return payloads.write_carrier(tmp_path / f"{case}.npy", "npy",
                                  payloads.probe_source(case, body, **params))


def test_fork_bomb_is_bounded_by_the_pids_limit(broker: BrokerProcess, docker_client,
                                                observers: Observers,  # noqa: F811
                                                tmp_path: Path) -> None:
    case = run_case(broker, _probe(tmp_path, "C1", payloads.FORK_BOMB, pids_limit=PIDS_LIMIT),
                    "--timeout", "60")
    if broker.runtime == "runsc":  # type: ignore[attr-defined]
        # gVisor's sentry runs on host threads, which count against the same pids limit: the
        # bomb exhausts it and the sentry itself dies (Go runtime, exit 2). Still the limit,
        # and still only this sandbox.
        assert case.outcome == ("failed", "CONVERSION_FAILED"), case.doc
        assert "code 2" in case.doc["message"], case.doc
        assert_contained(case, broker, docker_client, observers, tmp_path, "failed")
        return
    found = findings(case, "C1")
    assert found["fork_error"] == "EAGAIN", found
    assert int(found["tasks"]) <= PIDS_LIMIT, found
    assert int(found["tasks"]) > PIDS_LIMIT // 2, f"the bomb never got going: {found}"
    assert_contained(case, broker, docker_client, observers, tmp_path, "ok")


def test_memory_bomb_is_killed_at_the_memory_limit(broker: BrokerProcess, docker_client,
                                                   observers: Observers,  # noqa: F811
                                                   tmp_path: Path) -> None:
    rss_before = broker_rss_bytes(broker)
    artifact = payloads.write_carrier(tmp_path / "C2.npy", "npy",
                                      payloads.probe_source("C2", payloads.MEMORY_BOMB))
    case = run_case(broker, artifact, "--timeout", "60")
    assert case.outcome == ("failed", "SANDBOX_OOM"), case.doc
    assert broker_rss_bytes(broker) - rss_before < 64 * MiB
    assert_contained(case, broker, docker_client, observers, tmp_path, "failed")


def test_cpu_spin_ignoring_signals_with_a_reparented_child_ends_at_the_deadline(
        broker: BrokerProcess, docker_client, observers: Observers,  # noqa: F811
        tmp_path: Path) -> None:
    artifact = payloads.write_carrier(
        tmp_path / "C3.npy", "npy",
        payloads.probe_source("C3", payloads.CPU_SPIN_IGNORING_SIGNALS))
    case = run_case(broker, artifact, "--timeout", str(DEADLINE))
    assert case.outcome == ("failed", "SANDBOX_TIMEOUT"), case.doc
    assert case.elapsed < DEADLINE + KILL_SLACK, f"{case.elapsed:.1f} s for a {DEADLINE} s deadline"
    # Nothing survives the kill: no container (hence no process) is left.
    assert_contained(case, broker, docker_client, observers, tmp_path, "failed")


def test_slow_drip_of_output_ends_at_the_overall_deadline(broker: BrokerProcess, docker_client,
                                                          observers: Observers,  # noqa: F811
                                                          tmp_path: Path) -> None:
    artifact = payloads.write_carrier(tmp_path / "C8.npy", "npy",
                                      payloads.probe_source("C8", payloads.SLOW_DRIP))
    case = run_case(broker, artifact, "--timeout", str(DEADLINE))
    assert case.outcome == ("failed", "SANDBOX_TIMEOUT"), case.doc
    assert case.elapsed < DEADLINE + KILL_SLACK
    assert_contained(case, broker, docker_client, observers, tmp_path, "failed")


def test_disk_and_inode_fill_stop_at_each_mounts_cap(broker: BrokerProcess, docker_client,
                                                     observers: Observers,  # noqa: F811
                                                     tmp_path: Path) -> None:
    artifact = _probe(tmp_path, "C6", payloads.DISK_FILL, byte_bound=4 * OUTPUT_BYTES,
                      inode_bound=4 * TMPFS_INODES)
    case = run_case(broker, artifact, "--timeout", "90")
    found = findings(case, "C6")
    caps = {"tmp": TMPFS_BYTES, "out": OUTPUT_BYTES, "shm": SandboxPolicy().shm_bytes}
    for mount, cap in caps.items():
        assert found[f"{mount}.bytes_error"] in {"ENOSPC", "EFBIG"}, (mount, found)
        assert int(found[f"{mount}.bytes"]) <= cap, (mount, found)
    # Files: the output tmpfs (the broker's own mount) allows 64 inodes under both runtimes.
    assert found["out.inodes_error"] == "ENOSPC" and int(found["out.inodes"]) <= 64, found
    for mount in ("tmp", "shm"):
        if broker.runtime == "runc":  # type: ignore[attr-defined]
            assert found[f"{mount}.inodes_error"] == "ENOSPC", (mount, found)
            assert int(found[f"{mount}.inodes"]) < TMPFS_INODES, (mount, found)
        # gVisor ignores nr_inodes on its own tmpfs; its inodes live in the sentry's memory,
        # which the container's memory limit bounds (the fill ran and the job still reported).
    assert sum(caps.values()) < MEMORY_BYTES  # the fills fit in memory: the caps stopped them
    assert_contained(case, broker, docker_client, observers, tmp_path, "ok")


def test_stdout_and_stderr_flood_does_not_reach_the_broker(broker: BrokerProcess, docker_client,
                                                           observers: Observers,  # noqa: F811
                                                           tmp_path: Path) -> None:
    log_before = broker.log.stat().st_size
    rss_before = broker_rss_bytes(broker)
    case = run_case(broker, _probe(tmp_path, "C7", payloads.LOG_FLOOD), "--timeout", "60")
    found = findings(case, "C7")
    written = json.loads(found["written"])
    assert sum(written.values()) > 0, f"the flood wrote nothing anywhere: {found}"
    grown = broker.log.stat().st_size - log_before
    assert grown < 64 * 1024, f"the broker's log grew by {grown} bytes"
    log_tail = broker.log.read_bytes()[log_before:]
    assert b"\x1b" not in log_tail and b"SUCCESS" not in log_tail
    assert broker_rss_bytes(broker) - rss_before < 64 * MiB
    assert_contained(case, broker, docker_client, observers, tmp_path, "ok")

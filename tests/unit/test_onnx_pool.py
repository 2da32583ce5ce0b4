"""The ONNX validator pool: a crash, hang or memory blow-up of a validator fails only that job,
the broker process never parses the model, the next validation works, and no process is left.
Each validator serves one validation, sees an empty filesystem as a uid of its own, runs under
a seccomp filter, and what it writes on stderr reaches the log bounded and escaped."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from airlock_broker.errors import AirlockError, Reason
from airlock_broker.validation import OutputLimits, validate_onnx_bytes
from airlock_broker.validation.onnx_info import OnnxInfo
from airlock_broker.validation.onnx_pool import OnnxValidatorPool, ValidatorSettings
from airlock_broker.validation.onnx_worker import task_limit
from tests.unit import hostile_outputs as hostile
from tests.unit import onnx_pool_fakes as fakes

LIMITS = OutputLimits()
#: The validators' uid and gid by default: ids of their own, not nobody's (65534).
VALIDATOR_ID = 64998
FAKE = fakes.__name__
T = TypeVar("T")


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return to_onnx(LogisticRegression().fit(x, y), x[:1],
                   options={"zipmap": False}).SerializeToString()


def alive(pid: int) -> bool:
    # A reaped child is gone from /proc; a zombie would still be listed (and be a leak).
    return Path(f"/proc/{pid}").exists()


def with_pool(settings: ValidatorSettings,
              body: Callable[[OnnxValidatorPool], Awaitable[T]]) -> tuple[T, list[int]]:
    """Run ``body`` against a started pool; close it; return the body's result and every
    validator pid the pool ever had, after asserting none of them is still alive."""
    seen: set[int] = set()

    async def main() -> T:
        pool = OnnxValidatorPool(LIMITS, settings, worker_module=FAKE)
        pool.start()
        try:
            return await body(pool)
        finally:
            await pool.close()
            seen.update(pool.forked)
            seen.add(pool.template_pid() or 0)

    result = asyncio.run(main())
    pids = sorted(seen)
    assert pids and not [p for p in pids if alive(p)], "a validator process was left behind"
    return result, pids


def plain_pool(settings: ValidatorSettings,
               body: Callable[[OnnxValidatorPool], Awaitable[T]]) -> T:
    """``with_pool`` for a body whose result is all the test needs."""
    return with_pool(settings, body)[0]


async def until(condition: Callable[[], bool], seconds: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def validated(pool: OnnxValidatorPool, source: Path) -> tuple[bytes, OnnxInfo]:
    """``pool.validate(source)``, its canonical bytes read back from the broker's file (and
    found to be what its digest says), the file closed."""
    canonical, info = await pool.validate(source)
    with canonical:
        data = os.pread(canonical.fileno(), canonical.size + 1, 0)
    assert len(data) == canonical.size
    assert hashlib.sha256(data).hexdigest() == canonical.sha256
    return data, info


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_pool_returns_exactly_the_in_process_canonical_model(
    tmp_path: Path, model_bytes: bytes
) -> None:
    source = write(tmp_path, "model.onnx", model_bytes)

    async def body(pool: OnnxValidatorPool) -> list[tuple[bytes, object]]:
        return [await validated(pool, source) for _ in range(3)]

    results, _pids = with_pool(ValidatorSettings(processes=1), body)
    canonical, info = validate_onnx_bytes(model_bytes, LIMITS)
    assert all(got == (canonical, info) for got in results)


def test_no_validator_serves_two_validations(tmp_path: Path) -> None:
    # A parser exploit that still answers "ok" must not be around for the next caller's model.
    source = write(tmp_path, "model.onnx", fakes.PID)

    async def body(pool: OnnxValidatorPool) -> list[bytes]:
        return [(await validated(pool, source))[0] for _ in range(4)]

    served = plain_pool(ValidatorSettings(processes=1), body)
    assert len(set(served)) == 4, f"validators served more than one job: {served}"


def test_a_refused_model_is_refused_with_the_validators_reason(tmp_path: Path) -> None:
    source = write(tmp_path, "model.onnx", hostile.external_in_if_branch().SerializeToString())

    async def body(pool: OnnxValidatorPool) -> AirlockError:
        with pytest.raises(AirlockError) as caught:
            await validated(pool, source)
        return caught.value

    exc, _pids = with_pool(ValidatorSettings(processes=1), body)
    assert exc.reason is Reason.OUTPUT_INVALID and "external data" in exc.message


@pytest.mark.parametrize(("payload", "settings", "words"), [
    (fakes.CRASH, ValidatorSettings(processes=1), "SIGSEGV"),
    (fakes.NATIVE_MEMORY, ValidatorSettings(processes=1, memory_bytes=256 * 1024**2),
     "SIGABRT"),
    (fakes.MEMORY, ValidatorSettings(processes=1, memory_bytes=256 * 1024**2), "out of memory"),
    # (The good model after it has the same deadline, on a validator started afresh.)
    (fakes.HANG, ValidatorSettings(processes=1, timeout_seconds=5.0), "did not finish in 5 s"),
    (fakes.SPIN, ValidatorSettings(processes=1, cpu_seconds=1, timeout_seconds=30.0), "SIGXCPU"),
])
def test_a_misbehaving_validator_fails_only_that_job(
    tmp_path: Path, model_bytes: bytes, payload: bytes, settings: ValidatorSettings, words: str
) -> None:
    bad = write(tmp_path, "bad.onnx", payload)
    good = write(tmp_path, "good.onnx", model_bytes)

    async def body(pool: OnnxValidatorPool) -> tuple[AirlockError, bytes]:
        with pytest.raises(AirlockError) as caught:
            await validated(pool, bad)
        canonical, _info = await validated(pool, good)
        return caught.value, canonical

    (exc, canonical), _pids = with_pool(settings, body)
    assert exc.reason is Reason.OUTPUT_INVALID
    assert words in exc.message
    assert canonical == validate_onnx_bytes(model_bytes, LIMITS)[0]


def test_a_validator_that_stalls_in_the_middle_of_its_answer_is_killed_at_the_deadline(
    tmp_path: Path, model_bytes: bytes
) -> None:
    # It sends a length and a few bytes, then sleeps: only the deadline can end it, and the
    # deadline must cover the answer's last byte, not only its first.
    stall = write(tmp_path, "stall.onnx", fakes.STALL)
    good = write(tmp_path, "good.onnx", model_bytes)
    settings = ValidatorSettings(processes=1, timeout_seconds=3.0)
    bound = settings.timeout_seconds + 30  # generous, for a busy machine

    async def body(pool: OnnxValidatorPool) -> tuple[AirlockError, bytes]:
        with pytest.raises(AirlockError) as caught:
            await asyncio.wait_for(validated(pool, stall), bound)
        stalled = pool.forked[0]
        await until(lambda: not alive(stalled))  # killed, and reaped by its template
        # Its one slot is filled again: the next job gets a fresh validator.
        canonical, _info = await asyncio.wait_for(validated(pool, good), 60)
        assert pool.started >= 2 and stalled not in pool.pids()
        return caught.value, canonical

    (exc, canonical), _pids = with_pool(settings, body)
    assert exc.reason is Reason.OUTPUT_INVALID
    assert exc.message == ("ONNX validation did not finish in 3 s (10 of a 1048576-byte "
                           "message had come by then)"), exc.message
    assert canonical == validate_onnx_bytes(model_bytes, LIMITS)[0]


def test_a_cancelled_validation_kills_its_validator(
    tmp_path: Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airlock_broker.validation import onnx_pool

    hang = write(tmp_path, "hang.onnx", fakes.HANG)
    good = write(tmp_path, "good.onnx", model_bytes)
    handed: list[int] = []
    real_send_fd = onnx_pool._send_fd

    def send_fd(conn: Connection, fd: int) -> None:
        real_send_fd(conn, fd)
        handed.append(fd)

    monkeypatch.setattr(onnx_pool, "_send_fd", send_fd)

    async def body(pool: OnnxValidatorPool) -> bytes:
        job = asyncio.ensure_future(validated(pool, hang))
        await until(lambda: bool(handed))  # a validator started and was handed the job
        busy = list(pool.forked)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        deadline = asyncio.get_running_loop().time() + 30
        while [p for p in busy if alive(p)] and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert not [p for p in busy if alive(p)]
        canonical, _info = await validated(pool, good)
        return canonical

    canonical, _pids = with_pool(ValidatorSettings(processes=1), body)
    assert canonical == validate_onnx_bytes(model_bytes, LIMITS)[0]


def test_concurrent_validations_use_every_process(tmp_path: Path, model_bytes: bytes) -> None:
    source = write(tmp_path, "model.onnx", model_bytes)
    hang = write(tmp_path, "hang.onnx", fakes.HANG)

    async def body(pool: OnnxValidatorPool) -> tuple[BaseException | bytes, ...]:
        # One validator hangs; the other keeps serving meanwhile.
        stuck = asyncio.ensure_future(validated(pool, hang))
        await asyncio.sleep(0)
        done = [(await validated(pool, source))[0] for _ in range(3)]
        assert not stuck.done()
        # The hung job holds one of the two first validators (the other served the first good
        # job and was killed after it). Kill it rather than wait out its deadline: the deadline
        # is test_a_misbehaving_validator_fails_only_that_job[hang]'s to prove, and here only
        # that job may fail.
        [hung] = [p for p in pool.forked[:2] if p in pool.pids()]
        os.kill(hung, signal.SIGKILL)
        with pytest.raises(AirlockError):
            await stuck
        return tuple(done)

    done, _pids = with_pool(ValidatorSettings(processes=2), body)
    assert len(set(done)) == 1


def test_closing_a_pool_whose_template_is_still_starting_forks_nothing() -> None:
    """A broker stopped within a second of its start (every in-process test broker) closes
    its pool while the template still imports: the template is killed, not waited for and
    then asked for spares that would be killed at once."""

    async def main() -> tuple[int, int | None]:
        pool = OnnxValidatorPool(LIMITS, ValidatorSettings(processes=2), worker_module=FAKE)
        pool.start()
        template = pool.template_pid()
        # A refill has begun waiting for the template (it holds the lock while it waits).
        await until(lambda: pool._template_lock.locked())
        await pool.close()
        return pool.started, template

    started, template = asyncio.run(main())
    assert started == 0
    assert template is not None and not alive(template)


def test_a_closed_pool_refuses_work(tmp_path: Path, model_bytes: bytes) -> None:
    source = write(tmp_path, "model.onnx", model_bytes)

    async def main() -> AirlockError:
        pool = OnnxValidatorPool(LIMITS, ValidatorSettings(processes=1))
        pool.start()
        await pool.close()
        assert not [p for p in [*pool.forked, pool.template_pid()] if p and alive(p)]
        with pytest.raises(AirlockError) as caught:
            await validated(pool, source)
        return caught.value

    assert asyncio.run(main()).reason is Reason.INTERNAL


@pytest.mark.parametrize("bad", [
    {"processes": 0}, {"processes": 65}, {"timeout_seconds": 0}, {"memory_bytes": -1},
    {"cpu_seconds": True}, {"uid": 0}, {"gid": 0}, {"uid": 2**32 - 1},
    {"start_timeout_seconds": "1"}, {"max_stderr_bytes": 0},
])
def test_settings_are_checked(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ValidatorSettings(**bad)  # type: ignore[arg-type]


def test_the_broker_process_never_parses_onnx_outputs() -> None:
    # outputs.py must reach ONNX validation only through the pool.
    outputs = Path(__file__).parents[2] / "service/airlock_broker/conversion/outputs.py"
    source = outputs.read_text()
    assert "validate_onnx_bytes" not in source and "onnx_check" not in source
    assert "onnx_validator.validate(" in source
    assert os.fspath("onnx_pool") in source


def test_a_validator_that_cannot_be_replaced_costs_no_slot(
    tmp_path: Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airlock_broker.validation import onnx_pool

    crash = write(tmp_path, "crash.onnx", fakes.CRASH)
    good = write(tmp_path, "good.onnx", model_bytes)
    real_spawn = onnx_pool.Template.spawn

    def no_processes(self: onnx_pool.Template, timeout: float,
                     stderr_bytes: int) -> onnx_pool.Validator:
        raise OSError(11, "Resource temporarily unavailable")

    async def body(pool: OnnxValidatorPool) -> tuple[Reason, Reason, bytes]:
        await asyncio.wait_for(validated(pool, good), 60)  # the spare is forked and used
        await until(lambda: pool.started == 2)  # and its replacement is ready
        monkeypatch.setattr(onnx_pool.Template, "spawn", no_processes)
        with pytest.raises(AirlockError) as crashed:
            await validated(pool, crash)  # its replacement cannot start
        with pytest.raises(AirlockError) as starved:
            await validated(pool, good)  # the slot is still there: it tries, and says why
        monkeypatch.setattr(onnx_pool.Template, "spawn", real_spawn)
        canonical, _info = await asyncio.wait_for(validated(pool, good), 60)
        return crashed.value.reason, starved.value.reason, canonical

    (crashed, starved, canonical), _pids = with_pool(ValidatorSettings(processes=1), body)
    assert crashed is Reason.OUTPUT_INVALID
    assert starved is Reason.INTERNAL
    assert canonical == validate_onnx_bytes(model_bytes, LIMITS)[0]


def test_a_validator_forked_for_a_cancelled_job_is_not_left_to_the_pools_close(
    tmp_path: Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job that finds its slot empty (the slot's replacement failed) forks a validator itself;
    # cancelled while that fork runs, the validator it forks must still belong to the slot.
    # It was dropped: alive, one more than the pool's size, until the pool closed.
    import threading

    from airlock_broker.validation import onnx_pool

    crash = write(tmp_path, "crash.onnx", fakes.CRASH)
    good = write(tmp_path, "good.onnx", model_bytes)
    real_spawn = onnx_pool.Template.spawn
    forking, go_on = threading.Event(), threading.Event()

    def no_processes(self: onnx_pool.Template, timeout: float,
                     stderr_bytes: int) -> onnx_pool.Validator:
        raise OSError(11, "Resource temporarily unavailable")

    def slow_spawn(self: onnx_pool.Template, timeout: float,
                   stderr_bytes: int) -> onnx_pool.Validator:
        forking.set()
        go_on.wait(30)
        return real_spawn(self, timeout, stderr_bytes)

    def settled(pool: OnnxValidatorPool) -> bool:
        return not pool._refills and pool._idle is not None and pool._idle.qsize() == 1

    async def body(pool: OnnxValidatorPool) -> tuple[list[int], list[int], bytes]:
        await until(lambda: pool.started == 1 and settled(pool))  # the spare is ready
        monkeypatch.setattr(onnx_pool.Template, "spawn", no_processes)
        with pytest.raises(AirlockError):
            await pool.validate(crash)  # its replacement cannot start: the slot is empty
        await until(lambda: settled(pool))
        monkeypatch.setattr(onnx_pool.Template, "spawn", slow_spawn)
        job = asyncio.ensure_future(pool.validate(good))
        await until(forking.is_set)  # the job forks for the empty slot
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        monkeypatch.setattr(onnx_pool.Template, "spawn", real_spawn)
        go_on.set()
        await until(lambda: settled(pool))
        live = pool.pids()
        stray = [p for p in pool.forked if p not in live and alive(p)]
        canonical, _info = await asyncio.wait_for(validated(pool, good), 60)
        return live, stray, canonical

    (live, stray, canonical), _pids = with_pool(ValidatorSettings(processes=1), body)
    assert len(live) == 1, f"{len(live)} validators alive for one slot: {live}"
    assert stray == []
    assert canonical == validate_onnx_bytes(model_bytes, LIMITS)[0]


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _seccomp_on(pid: int) -> bool:
    try:
        return _status(pid).get("Seccomp") == "2"
    except FileNotFoundError:
        return False


def _limit(pid: int, name: str) -> list[str]:
    """The soft and hard value of one row of /proc/PID/limits ("Max processes")."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(name + " "):
            return line[len(name):].split()[:2]
    raise AssertionError(f"no {name!r} in /proc/{pid}/limits")


def _mounts(pid: int) -> list[list[str]]:
    return [line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]


def test_validators_run_unprivileged_without_network(tmp_path: Path, model_bytes: bytes) -> None:
    import socket

    # Only root can give up root, the network and the filesystem; anyone else gets
    # no_new_privs and the seccomp filter, and says so.
    root = os.geteuid() == 0
    settings = ValidatorSettings(processes=1)
    source = write(tmp_path, "model.onnx", model_bytes)
    source.chmod(0o600)  # readable by the broker only: the validator gets a descriptor
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    probe = write(tmp_path, "probe.onnx", fakes.CONNECT + str(port).encode())

    async def body(pool: OnnxValidatorPool) -> tuple[dict[str, str], str, list[list[str]],
                                                      str, list[str], bool, str]:
        await validated(pool, source)  # a validator served a job; its replacement is forked
        await until(lambda: [p for p in pool.pids() if _seccomp_on(p)] != [])
        [pid] = pool.pids()
        status = _status(pid)
        interfaces = [line.split(":")[0].strip()
                      for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]]
        mounts = _mounts(pid)
        ipc_namespace = os.readlink(f"/proc/{pid}/ns/ipc")
        max_tasks = _limit(pid, "Max processes")
        with pytest.raises(AirlockError) as probed:
            await validated(pool, probe)
        return (status, ",".join(interfaces), mounts, ipc_namespace, max_tasks,
                pool.confinement.full, probed.value.message)

    (status, interfaces, mounts, ipc_namespace, max_tasks, full, probed), _pids = \
        with_pool(settings, body)
    try:
        with pytest.raises(TimeoutError):
            listener.accept()[0].close()  # nothing reached the host's listener
    finally:
        listener.close()
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert max_tasks == [str(task_limit(settings.processes))] * 2, max_tasks
    assert full is root
    assert probed.startswith("connect failed"), probed
    if root:
        assert status["Uid"].split() == [str(settings.uid)] * 4
        assert status["Gid"].split() == [str(settings.gid)] * 4
        assert status["Groups"] == ""
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        assert interfaces == "lo"
        # Its own IPC namespace: what it might make there is not the host's, and goes with it.
        assert ipc_namespace != os.readlink("/proc/self/ns/ipc"), ipc_namespace
        # One mount, an empty read-only tmpfs as its root: no spool, no keys, no /proc.
        assert len(mounts) == 1, mounts
        [root_mount] = mounts
        assert root_mount[4] == "/" and "ro" in root_mount[5].split(","), root_mount
        assert root_mount[root_mount.index("-") + 1] == "tmpfs", root_mount
        assert str(tmp_path) not in " ".join(" ".join(m) for m in mounts)
    else:
        assert status["Uid"].split()[0] == str(os.geteuid())


def refusal_of(source: Path) -> str:
    """The message of the refusal one fake validator gives ``source``."""

    async def body(pool: OnnxValidatorPool) -> str:
        with pytest.raises(AirlockError) as caught:
            await validated(pool, source)
        return caught.value.message

    return plain_pool(ValidatorSettings(processes=1), body)


def test_a_validator_sees_no_file_of_the_broker_as_a_uid_of_its_own(tmp_path: Path) -> None:
    # The spool, keys and results are the broker's; a subverted validator must not see them.
    if os.geteuid() != 0:
        pytest.fail("run as root: only root can give validators an empty root and a uid")
    source = write(tmp_path, "look.onnx", fakes.LOOK)

    looked = refusal_of(source)
    assert looked == (f"look {{'root': [], 'uid': {VALIDATOR_ID}, 'gid': {VALIDATOR_ID}, "
                      "'proc': False, 'tmp': False}"), looked
    assert ValidatorSettings().uid == ValidatorSettings().gid == VALIDATOR_ID


def test_a_validator_cannot_fork_open_sockets_or_signal_others(tmp_path: Path) -> None:
    source = write(tmp_path, "syscalls.onnx", fakes.SYSCALLS)

    message = refusal_of(source)
    denied = os.strerror(1)  # EPERM
    assert message == (f"syscalls {{'fork': '{denied}', 'socket': '{denied}', "
                       f"'kill': '{denied}'}}"), message


def test_a_validator_cannot_start_more_threads_than_its_task_limit(tmp_path: Path) -> None:
    # Threads are allowed (clone with CLONE_THREAD); without RLIMIT_NPROC a subverted validator
    # could start them until the host's pid_max ran out.
    source = write(tmp_path, "threads.onnx", fakes.THREADS)

    message = refusal_of(source)  # one validator (processes=1)
    counted = re.fullmatch(r"threads (\d+) started, then can't start new thread", message)
    assert counted, message
    # The limit counts every task of the uid (the template, this validator, any other's).
    assert int(counted.group(1)) < task_limit(1), message


#: The uid that plays a broker that is not root: no account's, not the validators'.
NOT_ROOT_UID = 64997


#: CAP_SYS_ADMIN: one of the two capabilities that lift RLIMIT_NPROC (CAP_SYS_RESOURCE, the
#: other, is outside this test machine's bounding set).
CAP_SYS_ADMIN = 21


@pytest.mark.parametrize("ambient", [None, CAP_SYS_ADMIN], ids=["plain", "holding-sys-admin"])
def test_a_validator_of_a_broker_that_is_not_root_cannot_fork_and_has_a_task_limit(
    ambient: int | None,
) -> None:
    # RLIMIT_NPROC counts the tasks of the validator's real uid, which is then the broker's
    # own: it still binds, and the seccomp filter, not the rlimit, is what refuses a process.
    # A broker that is not root but was given a capability (an ambient one, which every
    # program it starts inherits) handed it to its validators: with CAP_SYS_ADMIN (or
    # CAP_SYS_RESOURCE) the kernel lifted their RLIMIT_NPROC (1000 threads started) and they
    # held CAP_SYS_ADMIN. The tests run as root, so a process that drops to a uid of its own
    # plays that broker (onnx_pool_not_root).
    import json
    import pwd
    import subprocess
    import sys

    with contextlib.suppress(KeyError):
        pytest.fail(f"uid {NOT_ROOT_UID} is {pwd.getpwuid(NOT_ROOT_UID).pw_name!r}'s")
    run = subprocess.run(
        [sys.executable, "-m", "tests.unit.onnx_pool_not_root", str(NOT_ROOT_UID),
         *([] if ambient is None else [str(ambient)])],
        capture_output=True, text=True, timeout=240, check=False,
        cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    expected_uid = NOT_ROOT_UID if os.geteuid() == 0 else os.geteuid()
    assert found["uid"] == expected_uid and found["full"] is False, found
    status = found["status"]
    assert status["Uid"].split() == [str(expected_uid)] * 4, status
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
    [max_tasks] = [line.split()[2:4] for line in found["limits"].splitlines()
                   if line.startswith("Max processes ")]
    assert max_tasks == [str(task_limit(1))] * 2, max_tasks
    counted = re.fullmatch(r"threads (\d+) started, then can't start new thread",
                           found["threads"])
    assert counted and int(counted.group(1)) < task_limit(1), found["threads"]
    denied = os.strerror(1)  # EPERM
    assert found["syscalls"] == (f"syscalls {{'fork': '{denied}', 'socket': '{denied}', "
                                 f"'kill': '{denied}'}}"), found["syscalls"]
    for held in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(status[held], 16) == 0, status


#: /proc/sysvipc/<kind>: the column that holds each object's id.
_IPC_ID_COLUMN = {"shm": "shmid", "msg": "msqid", "sem": "semid"}


def _host_ipc_objects(uid: int) -> set[tuple[str, int]]:
    """The System V IPC objects in this (the host's) IPC namespace that ``uid`` made."""
    found: set[tuple[str, int]] = set()
    for kind, id_column in _IPC_ID_COLUMN.items():
        header, *rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        for row in rows:
            fields = dict(zip(header.split(), row.split(), strict=True))
            if int(fields["cuid"]) == uid:
                found.add((kind, int(fields[id_column])))
    return found


def _remove_ipc_objects(objects: set[tuple[str, int]]) -> None:
    """IPC_RMID each of ``objects``, and the probe's POSIX queue: a failed run leaves none."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    remove = {"shm": lambda i: libc.shmctl(i, 0, None), "msg": lambda i: libc.msgctl(i, 0, None),
              "sem": lambda i: libc.semctl(i, 0, 0)}
    for kind, ipc_id in objects:
        remove[kind](ipc_id)
    libc.mq_unlink(fakes.IPC_MQ_NAME)


def test_a_validator_cannot_leave_ipc_objects_on_the_host(tmp_path: Path) -> None:
    # A shared memory segment outlives the process that made it (kernel.shm_rmid_forced=0):
    # a subverted validator could pin host memory long after it was killed.
    source = write(tmp_path, "ipc.onnx", fakes.IPC)
    uid = VALIDATOR_ID if os.geteuid() == 0 else os.geteuid()
    before = _host_ipc_objects(uid)
    try:
        message = refusal_of(source)
        left = _host_ipc_objects(uid) - before
    finally:
        _remove_ipc_objects(_host_ipc_objects(uid) - before)
    assert left == set(), f"System V IPC objects left on the host: {left} ({message})"
    denied = os.strerror(1)  # EPERM
    assert message == (f"ipc {{'shmget': '{denied}', 'msgget': '{denied}', "
                       f"'semget': '{denied}', 'mq_open': '{denied}'}}"), message


def test_validator_stderr_is_bounded_and_escaped_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    source = write(tmp_path, "stderr.onnx", fakes.STDERR)
    settings = ValidatorSettings(processes=1)  # keeps 8192 bytes of stderr by default

    async def body(pool: OnnxValidatorPool) -> None:
        with pytest.raises(AirlockError):
            await validated(pool, source)
        await until(lambda: any("bytes to stderr" in r.getMessage() and
                                "template" not in r.getMessage() for r in caplog.records))

    with caplog.at_level(logging.WARNING):
        plain_pool(settings, body)
    [record] = [r.getMessage() for r in caplog.records if "bytes to stderr" in r.getMessage()
                and "template" not in r.getMessage()]
    total = len(fakes.STDERR_TEXT) + 200_000
    assert f"wrote {total} bytes to stderr, the first 8192 shown" in record, record[:300]
    assert "\\x1b[2J\\x1b[31mred\\r\\nINFO job 1 converted fine\\n" in record, record[:300]
    assert not any(c in record for c in "\x1b\r\n"), "a control character reached the log"
    assert len(record) < 8192 * 4 + 300


def test_a_busy_validator_dies_with_a_killed_broker(tmp_path: Path) -> None:
    # Busy, so the socket's EOF cannot end it: only PDEATHSIG can, and the kernel clears that
    # on a uid change, so the worker must set it after dropping root.
    import subprocess
    import sys
    import time

    hang = write(tmp_path, "hang.onnx", fakes.HANG)
    script = (
        "import asyncio, sys\n"
        "from airlock_broker.validation.limits import OutputLimits\n"
        "from airlock_broker.validation.onnx_pool import OnnxValidatorPool, ValidatorSettings\n"
        "async def main():\n"
        "    pool = OnnxValidatorPool(OutputLimits(), ValidatorSettings(processes=1),\n"
        f"                             worker_module={FAKE!r})\n"
        "    pool.start()\n"
        "    print(pool.template_pid(), flush=True)\n"
        f"    await pool.validate(__import__('pathlib').Path({str(hang)!r}))\n"
        "asyncio.run(main())\n")
    broker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[2])
    pids: list[int] = []
    try:
        assert broker.stdout is not None
        [template] = [int(p) for p in broker.stdout.readline().split()]
        pids.append(template)
        # Wait until a validator is confined and serving the hanging job.
        deadline = time.monotonic() + 60
        busy: list[int] = []
        while time.monotonic() < deadline and not busy:
            busy = [p for p in _children(template)
                    if alive(p) and _status(p).get("Seccomp") == "2"]
            time.sleep(0.1)
        assert busy, "no validator took the job"
        pids.extend(busy)
        time.sleep(1.0)  # it reads the model and hangs
        assert all(alive(p) for p in pids)
        broker.send_signal(signal.SIGKILL)
        broker.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)]
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait()
        for pid in pids:  # a failed run must not leave its orphans behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.extend(int(p) for p in (task / "children").read_text().split())
    return found


def test_config_reads_the_onnx_validator_section(tmp_path: Path) -> None:
    from airlock_broker.config import BrokerConfig

    path = tmp_path / "broker.toml"
    path.write_text("[onnx_validator]\nprocesses = 3\ntimeout_seconds = 5.0\n")
    config = BrokerConfig.load(path)
    assert config.onnx_validator == ValidatorSettings(processes=3, timeout_seconds=5.0)
    assert BrokerConfig().onnx_validator == ValidatorSettings()
    path.write_text("[onnx_validator]\nin_process = true\n")
    with pytest.raises(ValueError, match="onnx_validator"):
        BrokerConfig.load(path)
    path.write_text("[onnx_validator]\nmax_jobs_per_process = 100\n")
    with pytest.raises(ValueError, match="serves one validation; remove the line"):
        BrokerConfig.load(path)
    path.write_text("[onnx_validator]\nuid = 64000\ngid = 64001\n")
    assert BrokerConfig.load(path).onnx_validator == ValidatorSettings(uid=64000, gid=64001)


def test_an_account_that_owns_the_validator_uid_is_refused() -> None:
    with pytest.raises(ValueError, match=r"uid = 0 belongs to the account 'root'"):
        ValidatorSettings.check_ids_unused(_unchecked(uid=0))
    with pytest.raises(ValueError, match=r"gid = 0 belongs to the group 'root'"):
        ValidatorSettings.check_ids_unused(_unchecked(gid=0))
    with pytest.raises(ValueError, match=r"are the sandboxes' \(64998:10001\)"):
        ValidatorSettings().check_ids_unused("64998:10001")
    for spelling in ("064998:10001", "+64998", "10001:064998"):  # the engine's Atoi reads these
        with pytest.raises(ValueError, match=r"are the sandboxes'"):
            ValidatorSettings().check_ids_unused(spelling)
    ValidatorSettings().check_ids_unused("10001:10001")  # the defaults belong to nobody here
    ValidatorSettings().check_ids_unused("sandbox:sandbox")  # names: the image's, not ours


def _unchecked(**values: int) -> ValidatorSettings:
    settings = ValidatorSettings()
    for name, value in values.items():
        object.__setattr__(settings, name, value)
    return settings


def test_a_killed_template_is_not_alive_even_before_it_is_dead() -> None:
    """The pool kills a template that could not fork and starts another on the next job; it
    asked the dying one instead when the kill had not landed yet (a BrokenPipeError from
    test_a_validator_that_cannot_be_replaced_costs_no_slot in a full run)."""
    async def body(pool: OnnxValidatorPool) -> bool:
        template = pool._template
        assert template is not None and template.alive()
        template.kill()
        return template.alive()

    still_alive, _pids = with_pool(ValidatorSettings(processes=1), body)
    assert still_alive is False

"""Shared fixtures. Integration and adversarial tests use the real Docker engine and the real
sandbox image: when either is missing they FAIL with a message saying how to fix it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.broker import free_port  # one definition, for the benchmark's brokers and ours

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
AIRLOCK = str(VENV_BIN / "airlock")
#: The broker's operator command: what its console script ``airlock-broker`` runs
#: (``airlock_broker.__main__:main``; tests/unit/test_distributions.py pins the entry point).
BROKER = [sys.executable, "-m", "airlock_broker"]
IMAGE = os.environ.get("AIRLOCK_TEST_IMAGE", "airlock-sandbox:latest")
LABEL = "airlock.managed=true"
#: Spool directories of the brokers the tests are running now (their warm slots live there).
LIVE_SPOOLS: set[Path] = set()
#: Every broker process this session started, by its state root: at the end of the session the
#: roots of those that are gone are reaped (a SIGKILLed broker leaves its output tmpfs mounted).
ALL_STATES: dict[Path, subprocess.Popen[bytes]] = {}
#: PIDs of every broker this test session started: their containers are the ones we judge
#: (other brokers on a shared machine are none of our business).
STARTED_PIDS: set[int] = set()

# The CLIs and in-process brokers of this session keep their state (the provenance signing key)
# in a directory of the session's own, never in the machine's /var/lib/airlock; each broker
# process gets a state root of its own under its test's tmp_path (start_broker).
if "AIRLOCK_STATE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _STATE_DIR = tempfile.mkdtemp(prefix="airlock-test-state-")
    os.environ["AIRLOCK_STATE_DIR"] = _STATE_DIR
    atexit.register(shutil.rmtree, _STATE_DIR, True)
# Nor do they take the machine's Unix socket (/run/airlock/broker.sock), nor a CLI find a broker
# there: start_broker gives each broker a socket of its own; in-process brokers have none.
os.environ["AIRLOCK_SOCKET"] = "none"


def _docker_client():  # type: ignore[no-untyped-def]
    import docker

    try:
        client = docker.from_env(version="auto")
        client.ping()
    except Exception as exc:
        pytest.fail(f"the Docker engine is not reachable ({exc}). Integration tests never skip: "
                    "run `make test`, which installs and starts the engine, or "
                    "`scripts/ensure-docker.sh`.", pytrace=False)
    try:
        client.images.get(IMAGE)
    except Exception:
        pytest.fail(f"the sandbox image {IMAGE} is missing: run `make image` (or `make test`).",
                    pytrace=False)
    return client


@pytest.fixture(scope="session")
def docker_client(pytestconfig: pytest.Config):  # type: ignore[no-untyped-def]
    if (refused := engine_refused(pytestconfig)) is not None:
        pytest.fail(refused, pytrace=False)
    client = _docker_client()
    yield client
    client.close()


def airlock_containers(client) -> list[str]:  # type: ignore[no-untyped-def]
    return [c.id for c in client.containers.list(all=True, filters={"label": LABEL})]


@dataclass
class BrokerProcess:
    """``airlock-broker serve`` started as an operator would, on a free loopback port."""

    address: str
    process: subprocess.Popen[bytes]
    #: Its state root (AIRLOCK_STATE_DIR): audit.jsonl, the key, uploads/, results/, slots/.
    state: Path
    log: Path
    #: Its Unix socket: where root (the tests) may operate the pools.
    socket: Path | None = None

    @property
    def spool(self) -> Path:
        """The spool's directories (uploads/, results/, slots/) are in the state root."""
        return self.state

    @property
    def audit(self) -> Path:
        return self.state / "audit.jsonl"

    @property
    def transfer_socket(self) -> Path:
        """The fast path's socket (default place): beside the Unix socket, else in the root."""
        if self.socket is not None:
            return self.socket.parent / "transfer.sock"
        return self.state / "sockets" / "transfer.sock"

    @property
    def unix_address(self) -> str:
        assert self.socket is not None, "this broker has no Unix socket"
        return f"unix:{self.socket}"

    def stop(self) -> int:
        LIVE_SPOOLS.discard(self.state)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                reap_state(self.state)  # it could not unmount its slots' tmpfs: do it for it
        return int(self.process.returncode)


def spool_dirs(spool: Path, sub: str) -> list[Path]:
    """``sub`` (uploads/ or slots/) on the spool's disk and in its RAM spool (``ram/``, where
    warm containers' slots and the inputs that fit its budget live)."""
    return [spool / sub, spool / "ram" / sub]


def reap_state(state: Path) -> None:
    """What the broker's next start would do on this state root: unmount and remove the slots
    (and uploads, results) of a broker that is gone. Never for a live broker's root."""
    from airlock_broker.sandboxes.workspace import reap_stale, unmount_ram_spool

    if state.is_dir():
        reap_stale(state)
        unmount_ram_spool(state)  # its RAM spool, emptied by reap_stale


#: ``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadgroup``): every
#: test that uses the Docker engine is in this one group, which one worker runs alone and in
#: the order collected, while the other worker takes the unit tests (310 s in one process on
#: this 2-core machine, before the engine tests' 1,060 s; beside them, those slowed by 1.2 to
#: 1.6 times while both ran). Engine tests never overlap one another: they judge the engine's
#: labelled containers (``job_containers``), reap what their brokers left, measure the pools.
ENGINE_GROUP = "engine"


def uses_engine(item: pytest.Item) -> bool:
    """Whether a test talks to the Docker engine: every one that does asks for
    ``docker_client`` (the integration and adversarial suites ask through their autouse
    ``no_sandbox_left_behind``)."""
    return "docker_client" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook names each test by its group
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Puts the engine tests in ``ENGINE_GROUP`` (where pytest-xdist is installed)."""
    if config.pluginmanager.hasplugin("xdist"):
        for item in items:
            if uses_engine(item):
                item.add_marker(pytest.mark.xdist_group(ENGINE_GROUP))


def engine_refused(config: pytest.Config) -> str | None:
    """Why this process must not use the engine: it is one of several pytest-xdist workers,
    and only ``--dist loadgroup`` keeps the engine tests on one of them."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers > 1 and not config.getvalue("loadgroup"):
        return (f"the tests that use the Docker engine must run one at a time: with {workers} "
                "pytest-xdist workers, run them with --dist loadgroup, as `make test` does")
    return None


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown stopped their brokers
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Brokers killed by a test (SIGKILL) leave their output tmpfs mounted: reap their roots,
    so pytest can remove its temporary directories (EBUSY otherwise)."""
    for state, process in list(ALL_STATES.items()):
        if process.poll() is not None:
            reap_state(state)


def wait_serving(address: str, process: subprocess.Popen[bytes], log: Path,
                 timeout: float = 60.0,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    deadline = time.monotonic() + timeout
    with (grpc.secure_channel(address, credentials) if credentials is not None
          else grpc.insecure_channel(address)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"airlock-broker serve exited with {process.returncode}:\n"
                            f"{log.read_text()[-3000:]}", pytrace=False)
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    pytest.fail(f"airlock-broker serve did not become SERVING:\n{log.read_text()[-3000:]}",
                pytrace=False)


#: On SIGTERM a broker keeps its listener open with health NOT_SERVING for
#: ``shutdown_drain_seconds`` (2 s by default) so that load balancers notice; nothing balances
#: a test's broker, and every stop would wait it out. A config that names the setting keeps its
#: own (test_lifecycle's SIGTERM test, which is about that drain).
NO_SHUTDOWN_DRAIN = "shutdown_drain_seconds = 0"


def without_shutdown_drain(config: Path) -> None:
    """Add ``NO_SHUTDOWN_DRAIN`` to ``config``'s ``[broker]`` table (made if missing), unless
    the file already names ``shutdown_drain_seconds``."""
    text = config.read_text()
    if "shutdown_drain_seconds" in text:
        return
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines)
               if line.split("#", 1)[0].strip() == "[broker]"]
    if headers:
        lines.insert(headers[0] + 1, NO_SHUTDOWN_DRAIN)
    else:  # a table of its own at the end: whatever the file holds, the TOML stays valid
        lines += ["", "[broker]", NO_SHUTDOWN_DRAIN]
    config.write_text("\n".join(lines) + "\n")


#: Warm pools of ``min_warm`` (1) each, not sized for the stream of jobs: a broker that
#: serves a test module a job every few seconds would otherwise keep what the stream's memory
#: budget allows (1 GiB: 8 sklearn containers beyond ``min_warm``), which wait unused (each
#: polling its job spec, ~0.5 % of a core) until the broker stops and are killed then: their
#: starts (~1.5 CPU-s each) wasted. Stream sizing has tests of its own (test_pool_stream.py); the
#: warm path itself is unchanged (every profile keeps its warm container).
STEADY_POOLS = "[pools]\nstream_window_seconds = 0\n"


def start_broker(tmp: Path, *extra: str, env: dict[str, str] | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> BrokerProcess:
    """``credentials``: for a broker serving TLS (health is open, but the channel is TLS)."""
    port = free_port()
    state = tmp / "state"  # under tmp_path: root's, 0700; the broker makes it
    log = tmp / "broker.log"
    if "--config" not in extra:
        # The image under test (AIRLOCK_TEST_IMAGE) and, for measuring, another seccomp profile
        # (AIRLOCK_TEST_SECCOMP, e.g. the allow-and-log variant of gen-seccomp-profile.py).
        config = tmp / "broker.toml"
        lines = ["[sandbox]", f"image = {IMAGE!r}"]
        if os.environ.get("AIRLOCK_TEST_SECCOMP"):
            lines.append(f"seccomp = {os.environ['AIRLOCK_TEST_SECCOMP']!r}")
        lines += ["", *STEADY_POOLS.splitlines()]
        config.write_text("\n".join(lines) + "\n")
        extra = ("--config", str(config), *extra)
    without_shutdown_drain(Path(extra[extra.index("--config") + 1]))
    socket_path = tmp / "run" / "broker.sock"
    full_env = {**os.environ, "AIRLOCK_STATE_DIR": str(state),
                "AIRLOCK_SOCKET": str(socket_path), **(env or {})}
    state = Path(full_env["AIRLOCK_STATE_DIR"])
    with log.open("wb") as fh:
        process = subprocess.Popen([*BROKER, "serve", "--listen", f"127.0.0.1:{port}", *extra],
                                   stdout=fh, stderr=subprocess.STDOUT, env=full_env)
    address = f"127.0.0.1:{port}"
    STARTED_PIDS.add(process.pid)
    ALL_STATES[state] = process
    try:
        wait_serving(address, process, log, credentials=credentials)
    except BaseException:  # pytest.fail included: a broker that never served must not linger
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        raise
    LIVE_SPOOLS.add(state)
    unix = None if full_env["AIRLOCK_SOCKET"] == "none" else Path(full_env["AIRLOCK_SOCKET"])
    return BrokerProcess(address=address, process=process, state=state, log=log, socket=unix)


@contextlib.contextmanager
def running_broker(tmp: Path, config: str | None = None) -> Iterator[BrokerProcess]:
    """A broker for a fixture (``config``: its TOML, beside it in ``tmp``), stopped at the
    end; it must exit 0."""
    extra: tuple[str, ...] = ()
    if config is not None:
        (tmp / "airlock.toml").write_text(config)
        extra = ("--config", str(tmp / "airlock.toml"))
    proc = start_broker(tmp, *extra)
    yield proc
    code = proc.stop()
    assert code == 0, f"broker exited {code}:\n{proc.log.read_text()[-3000:]}"


#: A broker on the image under test with cold containers only (cheap on a shared machine).
COLD_CONFIG = f'[sandbox]\nimage = "{IMAGE}"\n\n[pools]\nmin_warm = 0\n'


def holds_no_job(in_dir: Path) -> bool:
    """Whether a slot's input directory is a warm container's that no job has taken: there,
    with nothing in it but the doorbell (contract.DOORBELL_NAME)."""
    from airlock_sandbox.contract import DOORBELL_NAME

    try:
        return all(p.name == DOORBELL_NAME for p in in_dir.iterdir())
    except OSError:  # no such slot (any more), or on the other spool
        return False


def job_containers(client) -> list[str]:  # type: ignore[no-untyped-def]
    """Airlock containers that are not idle warm ones of a broker the tests run.

    A warm container is running and its workspace holds neither an artifact nor a job spec
    (``holds_no_job``);
    any other container labelled as Airlock's is a leftover.
    """
    left = []
    for info in client.api.containers(all=True, filters={"label": LABEL}):
        labels = info.get("Labels") or {}
        owner_pid = labels.get("airlock.broker", "::").split(":")[1]
        if not owner_pid.isdigit() or int(owner_pid) not in STARTED_PIDS:
            continue
        slot = labels.get("airlock.slot", "")
        in_dirs = [slots / slot / "in" for spool in LIVE_SPOOLS if slot
                   for slots in spool_dirs(spool, "slots")]
        idle = info.get("State") == "running" and any(holds_no_job(d) for d in in_dirs)
        if not idle:
            left.append(f"{info['Id'][:12]} ({info.get('State')})")
    return left


def assert_no_sandbox_left(client, grace: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Poll until no container but a live broker's idle warm ones is left (``job_containers``).

    The deadline is generous because a pool's refill is a container in state "created" until
    its start returns, and on this 2-core machine under the suite's own load that start took
    over 5 s (CI, stop 23: one "created" refill flagged after a torchscript test). A leaked
    container stays, so a leak still fails, a minute later; a clean state returns at once.
    """
    deadline = time.monotonic() + grace
    while (left := job_containers(client)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"sandbox containers left behind: {left}"


def run_broker_cli(*args: str, timeout: float = 300,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``airlock-broker ARGS`` (serve, token, keys), as the broker's operator runs it."""
    return subprocess.run([*BROKER, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


def run_cli(*args: str, server: str, timeout: float = 300, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AIRLOCK, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "AIRLOCK_SERVER": server, **(env or {})},
                          check=False, cwd=cwd)


#: Started by a shell's ``&`` (no job control), pytest and every child it starts inherit an
#: ignored SIGINT, and Python then leaves it ignored: Ctrl-C never raises. Tests of Ctrl-C
#: must not depend on how the suite was started.
@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this process for the test's duration."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


#: ``[*CTRL_C_ABLE, program, *args]`` runs the program with SIGINT at its default (exec keeps
#: an ignored signal ignored, a default one default), so a Python program in it gets its
#: KeyboardInterrupt handler.
CTRL_C_ABLE = [sys.executable, "-c", "import os, signal, sys; "
               "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"]

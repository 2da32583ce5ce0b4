"""Helpers for the warm-pool integration tests: dedicated brokers, what Docker says about a
broker's containers, polling, and the reduce-payload sources the pool tests send.

Several brokers (other test sessions included) may share this Docker engine, so everything here
looks only at the containers of one broker, recognised by its ``airlock.broker`` label
(``host:pid:starttime``).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from airlock_broker.sandboxes.owners import broker_identity
from airlock_client import Client, PoolStatus
from airlock_sandbox.contract import IN_DIR, JOB_SPEC_NAME
from tests.adversarial.payloads import reduce_pickle
from tests.conftest import BrokerProcess, holds_no_job, spool_dirs, start_broker

T = TypeVar("T")

LABEL_MANAGED = "airlock.managed=true"
LABEL_BROKER = "airlock.broker"
LABEL_SLOT = "airlock.slot"
LABEL_PROFILE = "airlock.profile"


def write_config(directory: Path, pools: dict[str, Any], **sections: dict[str, Any]) -> Path:
    """A small ``airlock.toml``: a ``[pools]`` section and any others (``broker=``,
    ``sandbox=``...) given as dicts. These tests count containers, so two things that change
    the counts are off unless a test turns them on, each with tests of its own: integrity's
    second sandbox (test_estimator_policy.py, adversarial/test_integrity.py) and pools sized
    for a stream of jobs (``stream_window_seconds``; test_pool_stream.py). With sizing on, a
    fixture's pool that served ten jobs keeps two warm, not the one these tests settle at."""
    sections["broker"] = {"verify_integrity": False, **sections.get("broker", {})}
    pools = {"stream_window_seconds": 0, **pools}
    def render(name: str, values: dict[str, Any]) -> str:
        lines = [f"[{name}]"]
        for key, value in values.items():
            # JSON's numbers, booleans, strings and arrays of them are valid TOML too.
            shown = list(value) if isinstance(value, tuple) else value
            lines.append(f"{key} = {json.dumps(shown)}")
        return "\n".join(lines) + "\n"

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "airlock.toml"
    path.write_text("".join(render(name, values)
                            for name, values in {"pools": pools, **sections}.items()))
    return path


@dataclass
class PoolBroker:
    """A dedicated ``airlock-broker serve`` with its own config, a client on it, and its
    identity."""

    proc: BrokerProcess
    client: Client
    identity: str
    #: time.time() just before it was started (Docker events of its containers come after).
    started_at: float = 0.0

    @property
    def address(self) -> str:
        return self.proc.address

    @property
    def unix_address(self) -> str:
        """Where the tests (root) may operate the pools: the TCP port is anonymous."""
        return self.proc.unix_address

    @property
    def spool(self) -> Path:
        return self.proc.spool

    def status(self) -> dict[str, PoolStatus]:
        return {p.profile: p for p in self.client.pool_status()}

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.proc.log.read_text()[-chars:]
        except OSError:
            return ""

    def stop(self) -> int:
        self.client.close()
        return self.proc.stop()


def launch(tmp: Path, config: Path, *, spool: Path | None = None) -> PoolBroker:
    """Start a broker on ``config``; with ``spool``, on that (possibly used) state root."""
    env = {"AIRLOCK_STATE_DIR": str(spool)} if spool is not None else None
    started_at = time.time()
    proc = start_broker(tmp, "--config", str(config), env=env)
    broker = PoolBroker(proc=proc, client=Client(proc.unix_address, retry_attempts=1),
                        identity=broker_identity(proc.process.pid), started_at=started_at)
    return broker


def stop_cleanly(broker: PoolBroker, docker_client: Any) -> None:
    """Stop (SIGTERM) and check: exit 0, and not one of its containers left."""
    code = broker.stop()
    assert code == 0, f"broker exited {code}:\n{broker.log_tail()}"
    left = containers_of(docker_client, broker.identity)
    assert left == [], f"the stopped broker left containers: {left}"
    assert mounts_under(broker.spool) == [], "the stopped broker left output tmpfs mounts"
    left = [p for slots in spool_dirs(broker.spool, "slots") if slots.is_dir()
            for p in slots.iterdir()]
    assert left == [], f"the stopped broker left slot directories: {left}"


def slot_mounts(spool: Path) -> list[str]:
    """Mount points in the slots of ``spool``, on its disk and in its RAM spool."""
    return [m for slots in spool_dirs(spool, "slots") for m in mounts_under(slots)]


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (the output tmpfs of each slot is one)."""
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    return [m for m in points if m == str(path) or m.startswith(f"{path}/")]


@contextlib.contextmanager
def running_broker(tmp: Path, config: Path, docker_client: Any) -> Iterator[PoolBroker]:
    broker = launch(tmp, config)
    try:
        yield broker
    finally:
        stop_cleanly(broker, docker_client)


# -- what Docker says -------------------------------------------------------------------------


def containers_of(docker_client: Any, identity: str, *, running_only: bool = False) -> list[Any]:
    """The containers one broker created (by its ``airlock.broker`` label); one removed while
    they are listed is left out."""
    return list(docker_client.containers.list(
        all=not running_only, ignore_removed=True,
        filters={"label": [LABEL_MANAGED, f"{LABEL_BROKER}={identity}"]}))


def is_idle(container: Any, spool: Path) -> bool:
    """A warm container waiting for a job: running, and its input directory holding nothing
    but its doorbell (no artifact, no job spec)."""
    slot = container.labels.get(LABEL_SLOT, "")
    if not slot or container.status != "running":
        return False
    return any(holds_no_job(slots / slot / "in") for slots in spool_dirs(spool, "slots"))


def idle_warm_ids(docker_client: Any, broker: PoolBroker, profile: str | None = None) -> set[str]:
    return {c.id for c in containers_of(docker_client, broker.identity)
            if is_idle(c, broker.spool)
            and (profile is None or c.labels.get(LABEL_PROFILE) == profile)}


def count_by_profile(docker_client: Any, identity: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in containers_of(docker_client, identity):
        profile = c.labels.get(LABEL_PROFILE, "")
        counts[profile] = counts.get(profile, 0) + 1
    return counts


def seconds_since(docker_time: str) -> float:
    """Age of a Docker RFC 3339 timestamp (nanoseconds and all) in seconds."""
    from datetime import datetime

    head, _, frac = docker_time.rstrip("Z").partition(".")
    stamp = datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{frac or 0}")
    return time.time() - stamp


def exists(docker_client: Any, container_id: str) -> bool:
    import docker.errors

    try:
        docker_client.api.inspect_container(container_id)
    except docker.errors.NotFound:
        return False
    return True


def removed(docker_client: Any, container_id: str, timeout: float = 60.0) -> bool:
    """Whether the container is gone within ``timeout``: the broker removes a finished job's
    container in the background, right after the RPC ends."""
    deadline = time.monotonic() + timeout
    while exists(docker_client, container_id):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# -- polling ----------------------------------------------------------------------------------


def wait_for(probe: Callable[[], T | None], timeout: float, what: str,
             describe: Callable[[], str] = lambda: "", interval: float = 0.2) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}. "
                                 f"{describe()}")
        time.sleep(interval)


def settled(broker: PoolBroker, warm: int, profiles: tuple[str, ...]) -> dict[str, PoolStatus]:
    """Status when every listed profile has exactly ``warm`` warm, none starting, none busy."""
    status = broker.status()
    ok = all(status[p].warm == warm and status[p].starting == 0 and status[p].busy == 0
             for p in profiles)
    return status if ok else {}


def wait_settled(broker: PoolBroker, warm: int, profiles: tuple[str, ...],
                 timeout: float = 60.0) -> dict[str, PoolStatus]:
    return wait_for(lambda: settled(broker, warm, profiles), timeout,
                    f"{profiles} pools to settle at {warm} warm",
                    lambda: f"status: {broker.status()}\nbroker log:\n{broker.log_tail()}")


# -- payloads (Python source run by a pickle reduce payload inside the sandbox) ----------------

#: Every file a marker payload leaves starts with this; the seeker looks for any such file.
MARKER_PREFIX = "airlock-marker-"

#: Where a payload looks for writable places: fixed candidates, every read-write mount but
#: /proc and /sys, and the directories up to two levels below those.
_PLACES = r'''
import os

def _places():
    places = {"/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/run", "/run/lock", "/home",
              "/airlock/out", "/airlock/in", "/", os.getcwd(), os.path.expanduser("~"),
              os.environ.get("HOME", "/tmp"), os.environ.get("TMPDIR", "/tmp")}
    try:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 3 and "rw" in parts[3].split(","):
                    places.add(parts[1])
    except OSError:
        pass
    places = {p for p in places if not p.startswith(("/proc", "/sys"))}
    found = set()
    for top in sorted(places):
        if not os.path.isdir(top) or top == "/":
            if os.path.isdir(top):
                found.add(top)
            continue
        base = top.rstrip("/").count("/")
        for root, dirs, _files in os.walk(top):
            found.add(root)
            if root.rstrip("/").count("/") - base >= 2:
                dirs[:] = []
    return sorted(found)
'''

#: Pure-Python safetensors writer: 8-byte little-endian header length, JSON header, data.
_SAFETENSORS = r'''
import json, struct

def _write_safetensors(path, name, metadata):
    data = struct.pack("<f", 1.0)
    header = {"__metadata__": metadata,
              name: {"dtype": "F32", "shape": [1], "data_offsets": [0, len(data)]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".part"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + data)
    os.rename(tmp, path)
'''

#: Exit codes chosen by the payloads (outside the worker's own 0, 1 and 64-72).
EXIT_NO_MARKER = 42
EXIT_SELF_TEST_FAILED = 43
EXIT_MARKED_BASE = 100


#: The places a marker must reach, as bits of the writer's exit code (HOME is /tmp).
KEY_PLACES = ("/tmp", "/airlock/out", "/dev/shm")


def marker_writer_source(token: str) -> str:
    """Leaves a marker in every writable place it finds, then exits with
    ``EXIT_MARKED_BASE + bits of KEY_PLACES written + 8 * other places written (<= 15)``."""
    return _PLACES + f'''
code = 0
others = 0
for place in _places():
    try:
        with open(os.path.join(place, {MARKER_PREFIX + token!r}), "w") as fh:
            fh.write("left by an earlier job")
    except OSError:
        continue
    key = {KEY_PLACES!r}
    if place in key:
        code |= 1 << key.index(place)
    else:
        others += 1
os._exit({EXIT_MARKED_BASE} + code + 8 * min(others, 15))
'''


def decode_marker_exit(code: int) -> tuple[set[str], int]:
    """(key places written, how many other places) from the writer's exit code."""
    bits = code - EXIT_MARKED_BASE
    return {p for i, p in enumerate(KEY_PLACES) if bits & (1 << i)}, bits >> 3


def marker_seeker_source() -> str:
    """Looks for any marker; succeeds with a ``marker_found`` tensor if it sees one, else exits
    ``EXIT_NO_MARKER``. First it proves its search works on a probe file of its own."""
    return _PLACES + _SAFETENSORS + f'''
def _find(prefix):
    hits = []
    for place in _places():
        try:
            names = os.listdir(place)
        except OSError:
            continue
        hits += [os.path.join(place, n) for n in names if n.startswith(prefix)]
    return hits

probe = "/tmp/airlock-probe-" + str(os.getpid())
with open(probe, "w") as fh:
    fh.write("probe")
if probe not in _find("airlock-probe-"):
    os._exit({EXIT_SELF_TEST_FAILED})
os.unlink(probe)
hits = _find({MARKER_PREFIX!r})
if hits:
    _write_safetensors("/airlock/out/model.safetensors", "marker_found",
                       {{"where": ",".join(hits)[:1000]}})
    os._exit(0)
os._exit({EXIT_NO_MARKER})
'''


def sleep_then_succeed_source(seconds: float, tensor: str = "slept") -> str:
    """Sleeps, then writes a valid one-tensor safetensors output and exits 0."""
    return "import os, time\n" + _SAFETENSORS + f'''
time.sleep({seconds!r})
_write_safetensors("/airlock/out/model.safetensors", {tensor!r}, {{"slept": "{seconds}"}})
os._exit(0)
'''


#: Created by the test (``release_jobs``) in a busy slot's input directory, which the sandbox
#: sees read-only at ``IN_DIR``: a job running ``wait_then_succeed_source`` may end.
RELEASE_NAME = "release"


def wait_then_succeed_source(cap_seconds: float, tensor: str = "released") -> str:
    """Runs until the test releases it (``release_jobs``), at most ``cap_seconds``; then writes
    a valid one-tensor safetensors output and exits 0. A job as long as the test needs it to
    be, without a fixed sleep sized for the slowest machine."""
    return "import os, time\n" + _SAFETENSORS + f'''
deadline = time.monotonic() + {cap_seconds!r}
while not os.path.exists("{IN_DIR}/{RELEASE_NAME}") and time.monotonic() < deadline:
    time.sleep(0.05)
_write_safetensors("/airlock/out/model.safetensors", {tensor!r}, {{"released": "yes"}})
os._exit(0)
'''


def release_jobs(broker: PoolBroker) -> int:
    """End every ``wait_then_succeed_source`` job of ``broker``: a release mark in each slot
    whose input holds a job. How many slots were released."""
    released = 0
    for in_dir in (d for slots in spool_dirs(broker.spool, "slots") for d in slots.glob("*/in")):
        with contextlib.suppress(OSError):  # a slot removed meanwhile
            if (in_dir / JOB_SPEC_NAME).exists():
                (in_dir / RELEASE_NAME).touch()
                released += 1
    return released


def release_and_join(broker: PoolBroker, job: threading.Thread, seconds: float) -> None:
    """Release ``broker``'s waiting job (polling until its slot holds it, up to a minute; a job
    not released ends at its cap) and wait up to ``seconds`` for the thread that runs it. For a
    ``finally``: it raises nothing of its own."""
    deadline = time.monotonic() + 60
    while job.is_alive() and not release_jobs(broker) and time.monotonic() < deadline:
        time.sleep(0.1)
    job.join(seconds)


def exit_source(code: int) -> str:
    return f"import os\nos._exit({code})\n"


def payload_pickle(path: Path, source: str) -> Path:
    """A pickle whose ``__reduce__`` runs ``source`` as a module of its own (fresh globals, so
    its functions see its imports), the way every pickle code-execution CVE does."""
    path.write_bytes(reduce_pickle(f"exec({source!r}, {{'__name__': 'airlock_payload'}})"))
    return path


def container_events(docker_client: Any, identity: str, since: float) -> dict[str, list[str]]:
    """Per container of one broker, its life since ``since`` as Docker recorded it:
    ``["profile=sklearn", "create", "start", "die:103", "destroy"]``. Waits up to a second for
    the window to close. The engine takes whole seconds; what it returns from before ``since``
    (up to two seconds of the test before) is left out by each event's own time."""
    life: dict[str, list[str]] = {}
    events = docker_client.events(
        since=int(since) - 1, until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "label": [f"{LABEL_BROKER}={identity}"],
                 "event": ["create", "start", "die", "destroy"]})
    for event in events:
        if event["timeNano"] < since * 1e9:
            continue
        attributes = event["Actor"]["Attributes"]
        action = event.get("Action") or event.get("status", "")
        if action == "die":
            action += ":" + attributes.get("exitCode", "?")
        entry = life.setdefault(event["id"], [f"profile={attributes.get(LABEL_PROFILE, '')}"])
        entry.append(action)
    return life

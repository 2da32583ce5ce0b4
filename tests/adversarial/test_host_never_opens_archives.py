"""Issue 11 §2: the broker parses no archive, so a zip central-directory bomb costs the host
nothing and delays nobody.

The bomb is a 46 MB zip declared as an MLflow bundle whose classic end record claims one
entry while its Zip64 record claims three million (a million 46-byte headers are really
there). A host that lists it with ``zipfile`` (as main did at 979d0fa, twice per job, on its
event loop) grows by ~450 bytes per entry and freezes for the parse. Here the sandbox must
refuse it with a reason while the broker's resident memory (VmRSS, sampled throughout, and
the high-water mark VmHWM) rises by no more than a few MiB, and a benign conversion sent at
the same time must finish within a generous bound of its usual time, measured first in the
same test.

Memory is watched from the moment the broker holds the whole bomb in its spool: that is when
a host that lists archives starts listing it. Taking the bytes in costs the same for any 44
MiB upload (the fast path's two 4 MiB copy buffers, a streamed upload's gRPC buffers) and is
bounded elsewhere; what is measured here is what the broker does with an archive's bytes,
which must be nothing but read 64 of them. The bomb comes over the same-host fast path (a
descriptor), the benign job as a stream.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock_client import Client, ConversionError
from tests import zip_bomb
from tests.conftest import BrokerProcess, spool_dirs, start_broker
from tests.fixtures import models

pytestmark = pytest.mark.adversarial

MiB = 1024**2
#: Headers really present, and what the Zip64 record claims.
PRESENT = 1_000_000
CLAIMED = 3_000_000
#: What the broker's memory may grow by while it takes the bomb in and answers it (measured:
#: 0.0-0.2 MiB; a host that lists the archive grows by ~450 MiB).
MAX_RSS_RISE = 4 * MiB


@pytest.fixture(scope="module")
def broker(docker_client, tmp_path_factory) -> Iterator[BrokerProcess]:  # type: ignore[no-untyped-def]
    proc = start_broker(tmp_path_factory.mktemp("archives"), "--runtime", "runc")
    yield proc
    code = proc.stop()
    assert code == 0, f"broker exited {code}:\n{proc.log.read_text()[-3000:]}"


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class RssWatch:
    """The broker's VmRSS sampled every few milliseconds on a thread, and its VmHWM."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = _status_kib(pid, "VmRSS")
        self.hwm_before = _status_kib(pid, "VmHWM")
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status_kib(self.pid, "VmRSS"))

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib(self.pid, "VmRSS"))
        self.hwm_after = _status_kib(self.pid, "VmHWM")

    @property
    def rise_bytes(self) -> int:
        """The larger of the sampled rise and the rise of the high-water mark."""
        return 1024 * max(self.peak - self.baseline, self.hwm_after - self.hwm_before)


def _spooled(broker: BrokerProcess, size: int) -> bool:
    """Whether an upload of ``size`` bytes has fully arrived: in the spool's uploads/, or
    already moved into its job's slot (where it stays until the job's answer is out)."""
    places = [*spool_dirs(broker.spool, "uploads"),
              *(d for slots in spool_dirs(broker.spool, "slots") for d in slots.glob("*/in"))]
    for place in places:
        try:
            if any(entry.stat().st_size >= size for entry in place.iterdir()):
                return True
        except FileNotFoundError:  # not created yet, or removed while we looked
            continue
    return False


def _send(broker: BrokerProcess, artifact: Path, declared: str | None) -> ConversionError:
    """Send ``artifact`` over the same-host fast path; the refusal it must get."""
    with Client(broker.address, timeout=300, local_transfer=True) as client:
        try:
            client.convert(artifact, artifact.with_suffix(".out"), declared_format=declared)
        except ConversionError as exc:
            return exc
    pytest.fail(f"{artifact.name} converted")


def _benign(broker: BrokerProcess, tmp_path: Path) -> float:
    """A small state dict converted to safetensors (the torch sandbox); seconds it took."""
    artifact, _check = models.make_state_dict(tmp_path / secrets.token_hex(4))
    began = time.monotonic()
    with Client(broker.address, timeout=300, local_transfer=False) as client:
        client.convert(artifact, artifact.with_suffix(".safetensors"))
    return time.monotonic() - began


def test_a_zip64_central_directory_bomb_costs_the_broker_no_memory_and_no_time(
        broker: BrokerProcess, tmp_path: Path) -> None:
    bomb = zip_bomb.write(tmp_path / "bundle.zip", present=PRESENT, claimed=CLAIMED)
    _benign(broker, tmp_path)  # warm: the pools, the broker's own first-use allocations
    usual = max(_benign(broker, tmp_path), _benign(broker, tmp_path))
    bound = 3 * usual + 15

    refused: list[ConversionError] = []

    def attack() -> None:
        refused.append(_send(broker, bomb, "mlflow"))

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    # The broker holds the whole bomb: a host that parses archives would be parsing it now.
    size = bomb.stat().st_size
    while not _spooled(broker, size):
        assert attacker.is_alive(), "the bomb was answered before it was spooled"
        time.sleep(0.005)
    with RssWatch(broker.process.pid) as rss:
        benign = _benign(broker, tmp_path)
        attacker.join(300)
        assert not attacker.is_alive(), "the bomb was not answered within 300 s"

    assert rss.rise_bytes <= MAX_RSS_RISE, (
        f"the broker's memory rose by {rss.rise_bytes / MiB:.1f} MiB while it handled a "
        f"{bomb.stat().st_size / MiB:.0f} MiB zip claiming {CLAIMED} entries (limit "
        f"{MAX_RSS_RISE / MiB:.0f} MiB): it parsed the archive on the host")
    assert benign <= bound, (
        f"a benign job sent beside the bomb took {benign:.1f} s; it usually takes "
        f"{usual:.1f} s (bound {bound:.1f} s)")
    assert refused, "the bomb's conversion raised something other than a refusal"
    assert refused[0].reason in {"UNSAFE_MODEL_DIR", "UNSUPPORTED_FORMAT"}, refused[0]
    assert "3000000 entries" in refused[0].message, refused[0].message
    print(f"bomb {bomb.stat().st_size / MiB:.0f} MiB: broker RSS +{rss.rise_bytes / MiB:.2f} MiB; "
          f"benign {benign:.1f} s (usual {usual:.1f} s)")

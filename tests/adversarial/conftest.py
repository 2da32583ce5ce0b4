from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.conftest import IMAGE, STEADY_POOLS, assert_no_sandbox_left

#: Tighter limits than the defaults, so that the resource-exhaustion cases hit them in seconds
#: (a memory bomb fills 1 GiB, not 4). Every other adversarial test runs under them too.
#: The image is the one under test (AIRLOCK_TEST_IMAGE), as for the integration tests. The pools
#: keep one warm container per profile (every job of these tests takes the warm path first),
#: not a stock sized for the stream of jobs (conftest.STEADY_POOLS).
MEMORY_BYTES = 1024**3
TMPFS_BYTES = 64 * 1024**2
OUTPUT_BYTES = 128 * 1024**2
PIDS_LIMIT = 256
ADVERSARIAL_CONFIG = f"""
[sandbox]
image = {IMAGE!r}
memory_bytes = {MEMORY_BYTES}
tmpfs_bytes = {TMPFS_BYTES}
output_bytes = {OUTPUT_BYTES}
pids_limit = {PIDS_LIMIT}

{STEADY_POOLS}"""


@pytest.fixture(autouse=True)
def no_sandbox_left_behind(docker_client) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """After every test, no Airlock container may remain but a live broker's idle warm ones."""
    yield
    # 30 s: on a loaded machine a pool's replacement container can sit in "created" a while.
    assert_no_sandbox_left(docker_client)


@pytest.fixture(scope="session", params=["runc", "runsc"])
def broker(request, docker_client, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Every adversarial test runs against a broker on each OCI runtime (DESIGN §1.3)."""
    from tests.conftest import start_broker

    # AIRLOCK_TEST_RUNSC: run the gVisor half on another registration of runsc (e.g. one with
    # different flags, registered side by side on a shared engine).
    runtime = os.environ.get("AIRLOCK_TEST_RUNSC", "runsc") if request.param == "runsc" \
        else request.param
    if runtime not in docker_client.info().get("Runtimes", {}):
        pytest.fail(f"the OCI runtime {runtime} is not registered with the Docker engine: "
                    "run `make test` (scripts/ensure-docker.sh registers runsc)", pytrace=False)
    home = tmp_path_factory.mktemp(f"broker-{runtime}")
    config = home / "airlock.toml"
    config.write_text(ADVERSARIAL_CONFIG)
    proc = start_broker(home, "--runtime", runtime, "--config", str(config))
    proc.runtime = runtime  # type: ignore[attr-defined]
    yield proc
    code = proc.stop()
    assert code == 0, f"broker exited {code}:\n{proc.log.read_text()[-3000:]}"

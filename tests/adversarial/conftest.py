from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.conftest import assert_no_sandbox_left


@pytest.fixture(autouse=True)
def no_sandbox_left_behind(docker_client) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """After every test, no Airlock container may remain but a live broker's idle warm ones."""
    yield
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
    proc = start_broker(tmp_path_factory.mktemp(f"broker-{runtime}"), "--runtime", runtime)
    yield proc
    code = proc.stop()
    assert code == 0, f"broker exited {code}:\n{proc.log.read_text()[-3000:]}"

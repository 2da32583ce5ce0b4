from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import COLD_CONFIG, BrokerProcess, assert_no_sandbox_left, running_broker
from tests.integration import mlflow_server
from tests.integration.mlflow_server import MlflowServer, mlflow_tracking_server


@pytest.fixture(autouse=True)
def no_sandbox_left_behind(docker_client) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """After every test, no Airlock container may remain but a live broker's idle warm ones."""
    yield
    assert_no_sandbox_left(docker_client)


@pytest.fixture(scope="package")
def broker(docker_client, tmp_path_factory) -> Iterator[BrokerProcess]:  # type: ignore[no-untyped-def]
    """The integration modules' shared broker (warm pools, conftest.STEADY_POOLS). Package
    scope: it stops when the integration tests end, not after the adversarial ones (whose
    brokers are their own), so its idle warm containers do not poll for 15 more minutes."""
    with running_broker(tmp_path_factory.mktemp("broker")) as proc:
        yield proc


@pytest.fixture(scope="session")
def cold_broker(docker_client, tmp_path_factory) -> Iterator[BrokerProcess]:  # type: ignore[no-untyped-def]
    """A broker on cold containers only, for the modules that need nothing else of theirs
    (no audit log, metrics or pool counts read): one start and stop for them all."""
    with running_broker(tmp_path_factory.mktemp("cold-broker"), COLD_CONFIG) as proc:
        yield proc


@pytest.fixture(scope="session")
def mlflow_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One loopback tracking server for the tests that register models under names of their
    own and look at nothing else in it (each server costs several CPU-seconds to start). A
    test that walks the whole registry (``migrate --all``) starts a server of its own."""
    # With several suites running on 2 cores, `mlflow server` has taken more than 120 s to
    # come up; the session starts this one once, so it can afford to wait.
    mlflow_server.START_TIMEOUT = max(mlflow_server.START_TIMEOUT, 400.0)
    with mlflow_tracking_server(tmp_path_factory.mktemp("mlflow-registry")) as server:
        yield server

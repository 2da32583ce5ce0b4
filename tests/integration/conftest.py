from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import assert_no_sandbox_left


@pytest.fixture(autouse=True)
def no_sandbox_left_behind(request, docker_client) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """After every test, no Airlock container may remain but a broker's idle warm ones."""
    yield
    spool = request.getfixturevalue("broker").spool if "broker" in request.fixturenames else None
    assert_no_sandbox_left(docker_client, spool)

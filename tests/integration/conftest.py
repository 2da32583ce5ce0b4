from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import assert_no_sandbox_left


@pytest.fixture(autouse=True)
def no_sandbox_left_behind(docker_client) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """After every test, no Airlock container may remain but a live broker's idle warm ones."""
    yield
    assert_no_sandbox_left(docker_client)

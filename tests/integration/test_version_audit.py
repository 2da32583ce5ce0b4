"""`make audit` against the real engine and image: every gate of the table is read (the image's
versions by a probe inside the image), and no enforced gate is violated on this machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from airlock_broker.sandboxes.version_gates import GATES
from tests.conftest import IMAGE

pytestmark = pytest.mark.integration


def test_audit_reads_every_gate_and_the_enforced_ones_hold(docker_client) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run([sys.executable, "-m", "airlock_broker.ops.version_audit",
                           "--image", IMAGE, "--json"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == len(GATES)
    for row in rows:
        assert row["status"] != "unknown", row  # every version was found
        if row["enforced"]:
            assert row["status"] == "ok", row
    image = {r["component"] for r in rows if r["where"] == "image"}
    assert image == {"torch", "onnx", "cpython"}

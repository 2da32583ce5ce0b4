"""Threat class D: data containers built to hurt whatever opens them - zip / decompression
bombs, tensors that declare terabytes, archive members named for path traversal or with
symlinks, and pathological names.

The broker never opens an archive itself (it only reads magic bytes); each container is
opened in the sandbox, so the worst case must be a sandbox limit, never the broker's memory
or a file outside the sandbox.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from tests.adversarial import payloads
from tests.adversarial.conftest import MEMORY_BYTES
from tests.adversarial.oracles import (
    Observers,
    assert_contained,
    assert_printable,
    broker_rss_bytes,
    observers,  # noqa: F401  (fixture)
    run_case,
)
from tests.conftest import BrokerProcess

pytestmark = pytest.mark.adversarial

MiB = 1024**2
#: A bomb inflates to 1.5x the sandbox's memory (the file itself is ~7 MiB: deflate level 1,
#: built in a few seconds).
BOMB_BYTES = MEMORY_BYTES * 3 // 2
#: A bomb or a huge declaration must fail for a stated cause.
FAILURES = {"SANDBOX_OOM", "CONVERSION_FAILED", "UNSUPPORTED_MODEL", "OUTPUT_TOO_LARGE",
            "OUTPUT_INVALID"}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """Built once per module (both runtimes): each takes a few seconds to deflate."""
    root = tmp_path_factory.mktemp("bombs")
    return {"npz": payloads.zip_bomb(root / "bomb.npz", "npz", BOMB_BYTES),
            "torch": payloads.zip_bomb(root / "bomb.pt", "torch", BOMB_BYTES)}


@pytest.mark.parametrize("kind", ["npz", "torch"])
def test_zip_bomb_is_bounded_by_the_sandbox_not_the_broker(
        kind: str, bombs: dict[str, Path], broker: BrokerProcess, docker_client,
        observers: Observers, tmp_path: Path) -> None:  # noqa: F811
    artifact = bombs[kind]
    assert artifact.stat().st_size * 100 < BOMB_BYTES  # it really is a bomb (~230:1)
    rss_before = broker_rss_bytes(broker)
    case = run_case(broker, artifact, "--timeout", "60")
    assert case.outcome[0] in {"failed", "rejected"}, case.doc
    assert broker_rss_bytes(broker) - rss_before < 64 * MiB
    assert_contained(case, broker, docker_client, observers, tmp_path, {"failed", "rejected"},
                     FAILURES)


@pytest.mark.parametrize("kind", ["npy", "safetensors", "torch"])
def test_huge_declared_tensor_fails_without_allocating_it(
        kind: str, broker: BrokerProcess, docker_client, observers: Observers,  # noqa: F811
        tmp_path: Path) -> None:
    if kind == "torch":
        artifact = payloads.huge_declared_torch(tmp_path / "huge.pt")
    else:
        artifact = tmp_path / f"huge.{kind}"
        artifact.write_bytes(payloads.huge_declared_npy() if kind == "npy"
                             else payloads.huge_declared_safetensors())
    case = run_case(broker, artifact, "--timeout", "60")
    assert case.outcome[0] in {"failed", "rejected"}, case.doc
    assert_contained(case, broker, docker_client, observers, tmp_path, {"failed", "rejected"},
                     FAILURES)


def test_archive_path_traversal_and_symlink_members_write_nothing(
        broker: BrokerProcess, docker_client, observers: Observers,  # noqa: F811
        tmp_path: Path) -> None:
    target = observers.escape_target
    names = ["../../../../../../" + str(target).lstrip("/"), str(target),
             "archive/../../../../etc/cron.d/pwned", "w"]
    artifact = payloads.npz_with_names(tmp_path / "traversal.npz", names,
                                       symlink=str(observers.canary_dir / "secret.txt"))
    case = run_case(broker, artifact, "--timeout", "60")
    # Member names are data: the output may carry them as tensor names, but no file is made
    # from them anywhere (the oracles check the host; the sandbox never extracts).
    assert_contained(case, broker, docker_client, observers, tmp_path,
                     {"ok", "rejected", "failed"})


def test_pathological_member_names_are_refused_or_escaped(
        broker: BrokerProcess, docker_client, observers: Observers,  # noqa: F811
        tmp_path: Path) -> None:
    names = ["\x1b[31mred\x1b[0m", "line\r\nINJECTED log line", "x" * 10_000,
             unicodedata.normalize("NFC", "caf\u00e9"), unicodedata.normalize("NFD", "caf\u00e9"),
             "CAFE", "cafe", "\u202egnp.exe"]
    artifact = payloads.npz_with_names(tmp_path / "names.npz", names)
    log_before = broker.log.stat().st_size
    case = run_case(broker, artifact, "--timeout", "60")
    assert case.outcome == ("rejected", "OUTPUT_INVALID"), case.doc
    assert_printable(case.doc["message"])
    log_tail = broker.log.read_bytes()[log_before:]
    assert b"\x1b" not in log_tail and b"INJECTED" not in log_tail.replace(b"\\r\\nINJECTED", b"")
    assert_contained(case, broker, docker_client, observers, tmp_path, "rejected",
                     {"OUTPUT_INVALID"})

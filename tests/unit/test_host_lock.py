"""The host's .venv is installed from host-requirements.txt with pip's hash checking
(scripts/setup-venv.sh), as the sandbox image is from its own lock: the broker runs as root
with those packages, so each must be the exact file locked, and the lock must cover what
pyproject.toml asks for (scripts/lock-host-requirements.sh rewrites it)."""

from __future__ import annotations

import platform
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "host-requirements.txt"
LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+) "
                  r"--hash=sha256:[0-9a-f]{64}$")


def _locked() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = LINE.match(line)
        assert match, f"not one pinned, hashed file: {line!r}"
        name = canonicalize_name(match["name"])
        assert name not in out, f"{name} is locked twice"
        out[name] = Version(match["version"])
    return out


def test_every_line_pins_one_file_by_its_hash() -> None:
    locked = _locked()
    assert {"pip", "setuptools", "wheel"} <= set(locked)  # the installer is locked too
    assert "airlock" not in locked  # the project itself is installed editable, apart


def test_the_lock_covers_what_pyproject_asks_for() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"],
              *project["optional-dependencies"]["safe-load"]]
    locked = _locked()
    for text in wanted:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in locked, (f"{name} ({text}) is not in host-requirements.txt: run "
                                "scripts/lock-host-requirements.sh")
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"host-requirements.txt locks {name} {locked[name]}, pyproject.toml asks for "
            f"{text!r}: run scripts/lock-host-requirements.sh")


#: What each of set-up's two pip installs may say, exactly (quiet aside).
LOCKED_INSTALL = {"--require-hashes", "--only-binary", ":all:", "--requirement", "$LOCK"}
PROJECT_INSTALL = {"--no-deps", "--no-build-isolation", "--editable", "."}


def _pip_installs(script: str) -> list[list[str]]:
    """Every ``pip install`` command of a shell script, continuation lines joined, as its
    arguments after ``install`` up to the end of the command (quoted words stay whole, so an
    ``echo "... pip install ..."`` is not one)."""
    logical = script.replace("\\\n", " ")
    found = []
    for line in logical.splitlines():
        if line.lstrip().startswith("#"):
            continue
        words = shlex.split(line)
        for at, word in enumerate(words[:-1]):
            if re.search(r"(^|/)pip3?(\.\d+)?$", word) and words[at + 1] == "install":
                rest = words[at + 2:]
                ends = [i for i, w in enumerate(rest) if w in {"||", "&&", ";", "|", "&"}]
                found.append(rest[:ends[0]] if ends else rest)
    return found


def test_set_up_installs_the_lock_with_hash_checking_and_nothing_unlocked() -> None:
    script = (ROOT / "scripts" / "setup-venv.sh").read_text()
    assert 'LOCK=host-requirements.txt' in script.splitlines()
    installs = [set(words) - {"--quiet"} for words in _pip_installs(script)]
    assert installs == [LOCKED_INSTALL, PROJECT_INSTALL], installs
    assert "pip download" not in script and "--upgrade" not in script
    stamp = next(line for line in (ROOT / "Makefile").read_text().splitlines()
                 if line.startswith("$(STAMP):"))
    assert LOCK.name in stamp.split(), "make does not reinstall when the lock changes"


@pytest.mark.parametrize("change", [
    ("--no-build-isolation ", ""),                                   # a floating build backend
    ("--only-binary :all: ", ""),                                    # an sdist's build deps
    ("--require-hashes ", ""),
    ('--editable . \\\n', '--editable ".[dev]" --extra-index-url http://x/simple \\\n'),
    ("# The project itself", ".venv/bin/pip install --upgrade pip setuptools\n# The project"),
])
def test_the_check_sees_a_set_up_that_would_fetch_unlocked_files(
        change: tuple[str, str]) -> None:
    script = (ROOT / "scripts" / "setup-venv.sh").read_text()
    assert change[0] in script
    installs = [set(words) - {"--quiet"} for words in _pip_installs(script.replace(*change))]
    assert installs != [LOCKED_INSTALL, PROJECT_INSTALL]


def test_the_lock_says_which_python_and_machine_it_is_for() -> None:
    header = [line for line in LOCK.read_text().splitlines() if line.startswith("#")]
    assert f"# python: {sys.version_info[0]}.{sys.version_info[1]}" in header
    assert f"# machine: {platform.machine()}" in header

"""The host's .venv is installed from host-requirements.txt with pip's hash checking
(scripts/setup-venv.sh), as the sandbox image is from its own lock: the broker runs as root
with those packages, so each must be the exact file locked, and the lock must cover what
pyproject.toml asks for (scripts/lock-host-requirements.sh rewrites it)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

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


def test_set_up_installs_the_lock_with_hash_checking_and_nothing_unlocked() -> None:
    commands = [shlex.split(line.strip().rstrip("\\"))
                for line in (ROOT / "scripts" / "setup-venv.sh").read_text().splitlines()
                if "-m pip install" in line and not line.lstrip().startswith("#")]
    assert commands, "setup-venv.sh installs nothing with pip"
    for words in commands:
        if "--editable" in words:
            assert "--no-deps" in words, "the editable install must not resolve dependencies"
            assert words[-1] == ".", words
        else:
            assert "--require-hashes" in words and words[-1] == LOCK.name, words
    stamp = next(line for line in (ROOT / "Makefile").read_text().splitlines()
                 if line.startswith("$(STAMP):"))
    assert LOCK.name in stamp.split(), "make does not reinstall when the lock changes"

"""What the set-up scripts that run as root take from where others may write, or from an index.

Found by review (of what runs as root outside the broker):

- ``scripts/ensure-docker.sh`` ran its daemon.json merge as ``python3 - ...``: Python puts the
  current directory first on ``sys.path`` for a script read from stdin, and the script never
  leaves the directory it was started in (the others ``cd`` to the repository). Root running
  it from a directory another user can write (``/tmp``, a user's home with ``sudo``, which
  keeps the directory) imported that user's ``json.py``: their code, as root.
- ``scripts/lock-host-requirements.sh`` resolved ``.[dev]`` with pip's build isolation, so pip
  installed the project's build backend (``setuptools>=68``: whatever newest file the index
  serves, no hash) into a throw-away environment and ran it as root; ``setup-venv.sh``
  builds with the locked setuptools only (``--no-build-isolation``), the lock did not.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


@pytest.fixture
def others_dir() -> Iterator[Path]:
    """A directory another user (uid 65534) owns and wrote, as ``/tmp`` or a home would be."""
    where = Path(tempfile.mkdtemp(prefix="airlock-others."))
    try:
        os.chmod(where, 0o755)
        os.chown(where, NOBODY, NOBODY)
        yield where
    finally:
        shutil.rmtree(where)


def _plant(directory: Path, name: str, marker: Path) -> None:
    module = directory / name
    module.write_text(f"open({str(marker)!r}, 'w').write('ran as uid %d' % __import__('os')"
                      ".getuid())\nraise SystemExit(0)\n")
    os.chown(module, NOBODY, NOBODY)


def test_ensure_docker_imports_nothing_from_the_directory_it_is_run_in(
        others_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    _plant(others_dir, "json.py", marker)
    bin_dir = tmp_path / "bin"  # a runsc to register: no apt-get here
    bin_dir.mkdir()
    (bin_dir / "runsc").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "runsc").chmod(0o755)
    daemon_json = tmp_path / "daemon.json"
    said = subprocess.run(
        ["bash", "-c", 'source "$1"; set +e; DAEMON_JSON="$2"; ensure_runsc; echo "rc=$?"',
         "bash", str(ROOT / "scripts" / "ensure-docker.sh"), str(daemon_json)],
        cwd=others_dir, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=60, check=False)
    assert not marker.exists(), f"the other user's json.py ran: {marker.read_text()}"
    assert "rc=0" in said.stdout, said
    runsc = daemon_json.read_text()
    assert str(bin_dir / "runsc") in runsc and "--oci-seccomp" in runsc, runsc


def _wheel(where: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel holding ``files``."""
    dist = f"{name}-{version}.dist-info"
    files = {**files,
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    record = []
    for member, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{member},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    wheel = where / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as whl:
        for member, text in files.items():
            whl.writestr(member, text)
        whl.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


def test_locking_the_host_runs_no_build_backend_the_lock_did_not_pin(tmp_path: Path) -> None:
    """An index (or mirror) serving a newer setuptools: resolving ``.[dev]`` must not run it."""
    marker = tmp_path / "ran"
    index = tmp_path / "index"
    index.mkdir()
    payload = (f"open({str(marker)!r}, 'w').write('ran as uid %d' % __import__('os').getuid())\n"
               "raise SystemExit('the planted build backend ran')\n")
    _wheel(index, "setuptools", "999.0", {"setuptools/__init__.py": payload,
                                          "setuptools/build_meta.py": payload})
    tree = tmp_path / "repo"  # the script writes host-requirements.txt beside pyproject.toml
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "bench-results", "__pycache__", "*.egg-info", ".*cache",
        ".hypothesis"))
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(index), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "AIRLOCK_HOST_PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    said = subprocess.run(["bash", str(tree / "scripts" / "lock-host-requirements.sh")],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert not marker.exists(), (f"the index's setuptools ran: {marker.read_text()}",
                                 said.stderr[-2000:])
    # Offline, the rest of the lock cannot be resolved: the script stops, writing nothing.
    assert said.returncode != 0
    assert (tree / "host-requirements.txt").read_bytes() == \
        (ROOT / "host-requirements.txt").read_bytes()

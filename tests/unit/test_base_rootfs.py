"""Threat: a Debian mirror, or anyone on the plain-http path to it, serving other packages for
the sandbox image's base (built as root). sandbox/image/base-rootfs.sh must have debootstrap
check the Release file's signature against the Debian archive keyring and refuse to go on
without one; with an explicit mirror debootstrap otherwise only warns and goes on unverified.
The recipe runs here against a stand-in debootstrap that records how it was called."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "sandbox" / "image" / "base-rootfs.sh"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _run_recipe(tmp_path: Path, *wrapper: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """base-rootfs.sh into ``tmp_path/rootfs`` with a debootstrap that writes its argv."""
    fake = tmp_path / "bin"
    fake.mkdir()
    argv = tmp_path / "argv"
    (fake / "debootstrap").write_text(
        f'#!/bin/bash\nprintf "%s\\n" "$@" > {argv}\nmkdir -p "${{@: -2:1}}/usr/bin"\n')
    os.chmod(fake / "debootstrap", 0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    env.pop("AIRLOCK_DEBIAN_MIRROR", None)
    done = subprocess.run([*wrapper, "bash", str(RECIPE), str(tmp_path / "rootfs")], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    return done, argv


def test_debootstrap_is_made_to_check_the_archive_signature(tmp_path: Path) -> None:
    assert Path(KEYRING).stat().st_size > 0, "install debian-archive-keyring (make docker)"
    done, argv = _run_recipe(tmp_path)
    assert done.returncode == 0, done.stderr
    args = argv.read_text().splitlines()
    assert "--force-check-gpg" in args and f"--keyring={KEYRING}" in args, args
    assert "--no-check-gpg" not in args
    assert args[-3:] == ["bookworm", str(tmp_path / "rootfs"), "http://deb.debian.org/debian"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="hides the keyring in a private mount namespace (root)")
def test_no_keyring_no_base_image(tmp_path: Path) -> None:
    """On a host without the keyring the recipe stops before debootstrap runs, and says what
    to install (the host's own keyrings are hidden in a mount namespace of the test's own)."""
    empty = tmp_path / "no-keyrings"
    empty.mkdir()
    wrapper = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount --bind "{empty}" /usr/share/keyrings && exec "$@"', "sh")
    done, argv = _run_recipe(tmp_path, *wrapper)
    assert done.returncode == 1 and not argv.exists(), done
    assert "apt-get install debian-archive-keyring" in done.stderr, done.stderr

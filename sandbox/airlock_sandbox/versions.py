"""What versions a Python environment holds of the parts the version gates judge.

Pure stdlib and import-free (metadata only: torch is never imported to learn its version), so
the same function reports the host's environment and, run inside the sandbox image by the
self-test probe or by ``make audit``, the image's.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

#: Distributions whose version the gates need (or the audit prints).
PACKAGES = ("torch", "onnx", "onnxruntime", "numpy", "safetensors", "scikit-learn")
DPKG_STATUS = "/var/lib/dpkg/status"


def stdlib_package() -> str:
    """The Debian package that ships this interpreter's ``tarfile`` (Lib/tarfile.py)."""
    return f"libpython{sys.version_info.major}.{sys.version_info.minor}-stdlib"


def debian_version(package: str, status_path: str = DPKG_STATUS) -> str | None:
    """The installed version of a Debian package, read from dpkg's status file; None if absent."""
    try:
        with open(status_path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if (fields.get("Package") == package and "installed" in fields.get("Status", "").split()
                and fields.get("Version")):
            return fields["Version"]
    return None


def interpreter_is_debian(package_version: str | None) -> bool:
    """Whether the running interpreter is the one that Debian package ships (same upstream
    version), not e.g. a pyenv build that happens to sit beside it."""
    if not package_version:
        return False
    upstream = package_version.split(":", 1)[-1].rsplit("-", 1)[0]
    return upstream == platform.python_version() and sys.executable.startswith("/usr/")


def collect() -> dict[str, str]:
    """``{"python": "3.11.2", "python-debian": "3.11.2-6+deb12u8", "torch": "2.13.0+cpu", …}``."""
    found = {"python": platform.python_version()}
    deb = debian_version(stdlib_package())
    if deb and interpreter_is_debian(deb):
        found["python-debian"] = deb
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def main() -> None:
    import json

    print(json.dumps(collect(), sort_keys=True))


if __name__ == "__main__":
    main()

"""Version gates: minimum versions of the parts whose old releases are escapable or bypassable.

One table (``GATES``): component, where it runs, the minimum upstream version, the Debian package
version that carries a backported fix (a distribution's backport counts: Debian keeps the old
upstream number and adds ``+debNuM``), the CVEs, and the source. The self-test fails (health
NOT_SERVING) when an *enforced* gate is violated or cannot be read; ``make audit`` prints every
gate against the host's and the image's versions. Advisory gates (``enforced=False``) say why
a violation does not reach the boundary; they are printed, never waived silently.

Sources were read on 2026-11-29 (advisory records as cited; Debian changelogs from the packages
themselves: ``zcat /usr/share/doc/<pkg>/changelog.Debian.gz``).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from airlock_sandbox import versions


@dataclass(frozen=True)
class Gate:
    component: str  # key into the observations: "runc", "runsc", "torch", "onnx", "cpython"
    where: str  # "engine" (the Docker host's OCI runtime), "image" (the sandbox), "host" (broker)
    #: Minimum upstream version; for CPython per minor branch ("3.11" -> "3.11.17").
    minimum: str | Mapping[str, str]
    cves: tuple[str, ...]
    source: str
    #: Debian package whose version is compared instead when the component is Debian's, and the
    #: first version of it that carries the fix.
    debian_package: str = ""
    debian_minimum: str = ""
    enforced: bool = True
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.component}@{self.where}"


@dataclass(frozen=True)
class Observation:
    version: str  # upstream version string as the component reports it
    debian_version: str = ""  # set when the component is the Debian package's
    origin: str = ""  # where the version was read


@dataclass(frozen=True)
class Verdict:
    gate: Gate
    status: str  # "ok", "violated", "unknown"
    found: str
    wanted: str

    @property
    def blocks(self) -> bool:
        """Whether this verdict keeps the broker from serving."""
        return self.gate.enforced and self.status != "ok"


_RUNC_ESCAPES = "CVE-2025-31133, CVE-2025-52565, CVE-2025-52881"
_TORCH_SRC = ("GHSA-53q9-r3pm-6pq6 (CVE-2025-32434: weights_only RCE, fixed 2.6.0); NVD "
              "CVE-2026-24747 (weights_only unpickler heap corruption, fixed 2.10.0)")
_ONNX_SRC = ("GHSA-whh8-fjgc-qp73 (CVE-2024-27318, fixed 1.16.0); PYSEC-2025-148 "
             "(CVE-2025-51480, last affected 1.17.0); PYSEC-2026-2239 (CVE-2026-27489), "
             "PYSEC-2026-2240 (CVE-2026-34445), PYSEC-2026-2241 (CVE-2026-34446), "
             "PYSEC-2026-104 (CVE-2026-34447): fixed 1.21.0")
_ONNX_CVES = ("CVE-2024-27318", "CVE-2025-51480", "CVE-2026-27489", "CVE-2026-34445",
              "CVE-2026-34446", "CVE-2026-34447")
_CPYTHON_MIN = {"3.11": "3.11.17", "3.12": "3.12.15", "3.13": "3.13.16", "3.14": "3.14.4"}
_CPYTHON_CVES = ("CVE-2024-6232", "CVE-2025-8194", "CVE-2025-13462", "CVE-2025-4517",
                 "CVE-2025-4330", "CVE-2025-4138", "CVE-2025-4435", "CVE-2024-12718",
                 "CVE-2026-82049")
_CPYTHON_SRC = ("CVE records (PSF): CVE-2025-4517 family fixed 3.11.13 / 3.12.11 / 3.13.4; "
                "CVE-2025-8194 fixed 3.11.14 / 3.12.12 / 3.13.6; CVE-2026-82049 fixed 3.11.17 / "
                "3.12.15 / 3.13.16; CVE-2025-13462 fixed 3.13.13 / 3.14.4 (the record lists no "
                "3.11 / 3.12 fix: upstream 3.11 stays exposed to it, Debian's is patched). Debian "
                "python3.11 changelog: CVE-2024-6232 in 3.11.2-6+deb12u4, CVE-2025-8194 in "
                "+deb12u7, CVE-2025-13462 in +deb12u8")
_CPYTHON_DEBIAN_NOTE = (
    "Debian bookworm's 3.11.2 has no tarfile extraction filters (PEP 706), so the filter-bypass "
    "CVEs do not apply to it; code in the sandbox must not rely on filter='data' there")

GATES: tuple[Gate, ...] = (
    Gate("runc", "engine", "1.1.12", ("CVE-2019-5736", "CVE-2024-21626"),
         "GHSA-xr7r-f8xq-vfvv (CVE-2024-21626 'Leaky Vessels', fixed 1.1.12); CVE-2019-5736 "
         "(/proc/self/exe overwrite) fixed 1.0.0-rc7; Debian runc changelog: "
         "1.1.5+ds1-1+deb12u1 (bookworm-security, 2024-02-02) carries CVE-2024-21626",
         debian_package="runc", debian_minimum="1.1.5+ds1-1+deb12u1"),
    Gate("runc", "engine", "1.2.8", tuple(_RUNC_ESCAPES.split(", ")),
         "runc GHSA-9493-h29p-rfm2, GHSA-qw9x-cqr3-wc7r, GHSA-cgrx-mc8f-2prm (Nov 2025; fixed "
         "1.2.8 / 1.3.3)", enforced=False,
         note="each needs an attacker-controlled image or mount configuration, or a container "
              "created against a mount another container shares; Airlock builds its own image "
              "and gives every sandbox its own mounts. Debian bookworm ships no fixed runc "
              "(1.1.5+ds1-1+deb12u1 is the newest): upgrade when it does"),
    Gate("runsc", "engine", "20221219.0", (),
         "no CVE-numbered gVisor escape is published for later releases (GitHub advisory and "
         "issue search, 2026-11-29); this pins the oldest release the suite was verified on "
         "(Debian bookworm 0.0~20221219.0), which applies OCI seccomp with --oci-seccomp"),
    Gate("torch", "image", "2.10.0", ("CVE-2025-32434", "CVE-2026-24747"), _TORCH_SRC),
    Gate("onnx", "image", "1.21.0", _ONNX_CVES, _ONNX_SRC),
    Gate("onnx", "host", "1.21.0", _ONNX_CVES, _ONNX_SRC,
         note="the broker parses returned ONNX files with onnx (validation/onnx_check.py)"),
    Gate("cpython", "image", _CPYTHON_MIN, _CPYTHON_CVES, _CPYTHON_SRC,
         debian_package="libpython3.11-stdlib", debian_minimum="3.11.2-6+deb12u8",
         note=_CPYTHON_DEBIAN_NOTE),
    Gate("cpython", "host", _CPYTHON_MIN, _CPYTHON_CVES, _CPYTHON_SRC,
         debian_package="libpython3.11-stdlib", debian_minimum="3.11.2-6+deb12u8",
         enforced=False,
         note="the host never opens an archive (artifacts are parsed only in the sandbox, "
              "DESIGN §1.1); a violation here is printed so an operator upgrades, not enforced"),
)


# -- version comparison ---------------------------------------------------------------------

def _numbers(version: str) -> tuple[int, ...]:
    """Upstream version -> comparable numbers: "2.13.0+cpu" -> (2, 13, 0), "1.1.5+ds1" ->
    (1, 1, 5), gVisor "release-20221219.0" / "0.0~20221219.0" -> (20221219, 0)."""
    dated = re.search(r"(\d{8})\.(\d+)", version)
    if dated:
        return int(dated.group(1)), int(dated.group(2))
    core = version.split(":", 1)[-1].split("+", 1)[0]
    core = re.split(r"[-~]|(?<=\d)(?=[a-z])", core, maxsplit=1)[0]
    return tuple(int(p) for p in re.findall(r"\d+", core))


def _prerelease(version: str) -> bool:
    return bool(re.search(r"\d(a|b|rc|dev|alpha|beta)\d*", version.split("+", 1)[0]))


def compare_upstream(a: str, b: str) -> int:
    """Numeric comparison; at equal numbers a pre-release (2.10.0a0, 1.0.0-rc7) comes first."""
    x, y = _numbers(a), _numbers(b)
    width = max(len(x), len(y))
    x, y = x + (0,) * (width - len(x)), y + (0,) * (width - len(y))
    if x == y:
        pa, pb = _prerelease(a) or "-rc" in a, _prerelease(b) or "-rc" in b
        return (pb and not pa) - (pa and not pb)
    return (x > y) - (x < y)


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    """dpkg's comparison of an upstream version or a revision (deb-version(7))."""
    while a or b:
        na = re.match(r"[^0-9]*", a).group()  # type: ignore[union-attr]
        nb = re.match(r"[^0-9]*", b).group()  # type: ignore[union-attr]
        for i in range(max(len(na), len(nb))):
            ca = _order(na[i]) if i < len(na) else 0
            cb = _order(nb[i]) if i < len(nb) else 0
            if ca != cb:
                return (ca > cb) - (ca < cb)
        a, b = a[len(na):], b[len(nb):]
        da = re.match(r"[0-9]*", a).group()  # type: ignore[union-attr]
        db = re.match(r"[0-9]*", b).group()  # type: ignore[union-attr]
        ia, ib = int(da or 0), int(db or 0)
        if ia != ib:
            return (ia > ib) - (ia < ib)
        a, b = a[len(da):], b[len(db):]
    return 0


def compare_debian(a: str, b: str) -> int:
    """Debian version comparison (epoch, upstream, revision), like ``dpkg --compare-versions``."""
    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), upstream, revision

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return (ea > eb) - (ea < eb)
    return _compare_part(ua, ub) or _compare_part(ra, rb)


# -- evaluation -----------------------------------------------------------------------------

def _minimum_for(gate: Gate, version: str) -> str | None:
    if isinstance(gate.minimum, str):
        return gate.minimum
    branch = ".".join(version.split(".")[:2])
    return gate.minimum.get(branch)


def evaluate(gate: Gate, seen: Observation | None) -> Verdict:
    if seen is None or not seen.version:
        return Verdict(gate, "unknown", "not found", _wanted(gate, ""))
    if seen.debian_version and gate.debian_package and gate.debian_minimum:
        ok = compare_debian(seen.debian_version, gate.debian_minimum) >= 0
        return Verdict(gate, "ok" if ok else "violated", f"{seen.debian_version} (Debian)",
                       f">= {gate.debian_minimum} (Debian)")
    minimum = _minimum_for(gate, seen.version)
    if minimum is None:
        return Verdict(gate, "unknown", seen.version, f"a supported branch ({_wanted(gate, '')})")
    ok = compare_upstream(seen.version, minimum) >= 0
    return Verdict(gate, "ok" if ok else "violated", seen.version, f">= {minimum}")


def _wanted(gate: Gate, version: str) -> str:
    minimum = gate.minimum if isinstance(gate.minimum, str) else "/".join(gate.minimum.values())
    extra = f" or Debian >= {gate.debian_minimum}" if gate.debian_minimum else ""
    return f">= {minimum}{extra}"


def evaluate_all(observed: Mapping[str, Observation],
                 gates: tuple[Gate, ...] = GATES) -> list[Verdict]:
    return [evaluate(g, observed.get(g.key)) for g in gates]


# -- observations ---------------------------------------------------------------------------

def from_probe(found: Mapping[str, str], where: str) -> dict[str, Observation]:
    """Observations from :func:`airlock_sandbox.versions.collect` output (image or host)."""
    out: dict[str, Observation] = {}
    origin = "sandbox probe" if where == "image" else "broker process"
    if found.get("python"):
        out[f"cpython@{where}"] = Observation(found["python"], found.get("python-debian", ""),
                                              origin)
    for name in ("torch", "onnx"):
        if found.get(name):
            out[f"{name}@{where}"] = Observation(found[name], "", origin)
    return out


def binary_version(path: str) -> str | None:
    """``runsc --version`` -> "0.0~20221219.0" (a binary the engine names); None if it cannot
    be run."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (done.stdout.splitlines() or [""])[0]
    return first.rsplit(" ", 1)[-1] or None


def engine_observations(components: list[Mapping[str, object]],
                        runsc_version: str | None) -> dict[str, Observation]:
    """The OCI runtimes: runc as the engine reports it (``docker version``), runsc from its
    ``--version``; each paired with the host's Debian package when that is what runs."""
    out: dict[str, Observation] = {}
    for comp in components:
        if comp.get("Name") == "runc" and comp.get("Version"):
            version = str(comp["Version"])
            out["runc@engine"] = Observation(version, _debian_if_same("runc", version),
                                             "docker version")
    if runsc_version:
        out["runsc@engine"] = Observation(runsc_version, _debian_if_same("runsc", runsc_version),
                                          "runsc --version")
    return out


def _debian_if_same(package: str, upstream: str) -> str:
    """The Debian package's version if the running binary is that package's (same upstream)."""
    deb = versions.debian_version(package)
    if deb and deb.split(":", 1)[-1].rsplit("-", 1)[0] == upstream:
        return deb
    return ""


def host_observations() -> dict[str, Observation]:
    return from_probe(versions.collect(), "host")


def relevant(gate: Gate, runtime_family: str) -> bool:
    """Gates the self-test judges for this policy: the engine gate of the runtime in use."""
    return gate.where != "engine" or gate.component == runtime_family


__all__ = ["GATES", "Gate", "Observation", "Verdict", "binary_version", "compare_debian",
           "compare_upstream", "engine_observations", "evaluate", "evaluate_all", "from_probe",
           "host_observations", "relevant"]

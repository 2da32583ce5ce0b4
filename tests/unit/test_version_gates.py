"""Version gates: the comparison rules, Debian backports, and what blocks serving."""

from __future__ import annotations

import pytest

from airlock_broker.ops.selftest import version_checks
from airlock_broker.sandboxes import version_gates as vg
from airlock_sandbox.policy import SandboxPolicy


@pytest.mark.parametrize(("a", "b", "want"), [
    ("1.1.5+ds1-1+deb12u1", "1.1.5+ds1-1+deb12u1", 0),
    ("1.1.5+ds1-1", "1.1.5+ds1-1+deb12u1", -1),  # the unpatched bookworm runc
    ("3.11.2-6+deb12u10", "3.11.2-6+deb12u9", 1),  # numbers, not strings
    ("1.0~rc1-1", "1.0-1", -1),  # ~ sorts before everything
    ("2:1.0-1", "1.9-1", 1),  # epoch first
])
def test_debian_versions_compare_like_dpkg(a: str, b: str, want: int) -> None:
    assert vg.compare_debian(a, b) == want
    assert vg.compare_debian(b, a) == -want


@pytest.mark.parametrize(("a", "b", "want"), [
    ("2.13.0+cpu", "2.10.0", 1), ("2.9.1", "2.10.0", -1), ("2.10.0a0", "2.10.0", -1),
    ("1.1.5+ds1", "1.1.12", -1), ("1.0.0-rc7", "1.0.0", -1),
    ("0.0~20221219.0", "20221219.0", 0), ("release-20230101.0", "20221219.0", 1),
])
def test_upstream_versions_compare_numerically(a: str, b: str, want: int) -> None:
    assert vg.compare_upstream(a, b) == want


def _gate(key: str) -> vg.Gate:
    return next(g for g in vg.GATES if g.key == key and g.enforced)


def test_a_distribution_backport_counts() -> None:
    """Debian's runc keeps upstream 1.1.5 but carries the CVE-2024-21626 fix in +deb12u1."""
    runc = _gate("runc@engine")
    assert vg.evaluate(runc, vg.Observation("1.1.5+ds1", "1.1.5+ds1-1+deb12u1")).status == "ok"
    assert vg.evaluate(runc, vg.Observation("1.1.5+ds1", "1.1.5+ds1-1")).status == "violated"
    assert vg.evaluate(runc, vg.Observation("1.1.5")).status == "violated"  # not Debian's
    assert vg.evaluate(runc, vg.Observation("1.1.12")).status == "ok"
    assert vg.evaluate(runc, None).status == "unknown"


def test_cpython_minimum_is_per_branch() -> None:
    cpython = _gate("cpython@image")
    assert vg.evaluate(cpython, vg.Observation("3.11.7")).status == "violated"
    assert vg.evaluate(cpython, vg.Observation("3.12.15")).status == "ok"
    assert vg.evaluate(cpython, vg.Observation("3.9.99")).status == "unknown"
    deb = vg.Observation("3.11.2", "3.11.2-6+deb12u8")
    assert vg.evaluate(cpython, deb).status == "ok"
    assert vg.evaluate(cpython, vg.Observation("3.11.2", "3.11.2-6+deb12u6")).status == "violated"


def test_every_gate_names_its_source_and_advisories_say_why() -> None:
    for gate in vg.GATES:
        assert gate.source
        assert gate.enforced or gate.note, gate.key


GOOD = {"torch@image": vg.Observation("2.13.0+cpu"), "onnx@image": vg.Observation("1.23.2"),
        "cpython@image": vg.Observation("3.11.2", "3.11.2-6+deb12u8"),
        "onnx@host": vg.Observation("1.23.2"),
        "runc@engine": vg.Observation("1.1.5+ds1", "1.1.5+ds1-1+deb12u1"),
        "runsc@engine": vg.Observation("0.0~20221219.0")}


def test_selftest_fails_on_a_violated_or_unreadable_enforced_gate() -> None:
    policy = SandboxPolicy()
    assert all(c.passed for c in version_checks(GOOD, policy))
    old_torch = {**GOOD, "torch@image": vg.Observation("2.5.1")}
    failed = [c.name for c in version_checks(old_torch, policy) if not c.passed]
    assert failed == ["version_torch_image"]
    missing = {k: v for k, v in GOOD.items() if k != "onnx@image"}
    assert [c.name for c in version_checks(missing, policy) if not c.passed] == \
        ["version_onnx_image"]


def test_selftest_judges_only_the_runtime_in_use_and_never_advisory_gates() -> None:
    runc_names = {c.name for c in version_checks(GOOD, SandboxPolicy(runtime="runc"))}
    runsc_names = {c.name for c in version_checks(GOOD, SandboxPolicy(runtime="runsc"))}
    assert "version_runc_engine" in runc_names and "version_runsc_engine" not in runc_names
    assert "version_runsc_engine" in runsc_names and "version_runc_engine" not in runsc_names
    # the host's CPython gate is advisory (the host never opens an archive): not judged
    assert "version_cpython_host" not in runc_names
    old_host = {**GOOD, "cpython@host": vg.Observation("3.11.7")}
    assert all(c.passed for c in version_checks(old_host, SandboxPolicy()))


def test_the_probe_reads_debian_package_versions_from_dpkg_status(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from airlock_sandbox import versions

    status = tmp_path / "status"
    status.write_text(
        "Package: runc\nStatus: install ok installed\nVersion: 1.1.5+ds1-1+deb12u1\n"
        "Description: x\n more text: with colon\n\n"
        "Package: runsc\nStatus: deinstall ok config-files\nVersion: 0.0~20221219.0-2\n")
    assert versions.debian_version("runc", str(status)) == "1.1.5+ds1-1+deb12u1"
    assert versions.debian_version("runsc", str(status)) is None  # removed, config left
    assert versions.debian_version("absent", str(status)) is None
    assert versions.debian_version("runc", str(tmp_path / "missing")) is None


def test_image_probe_output_becomes_observations() -> None:
    found = {"python": "3.11.2", "python-debian": "3.11.2-6+deb12u8", "torch": "2.13.0+cpu",
             "onnx": "1.23.2", "numpy": "2.4.6"}
    seen = vg.from_probe(found, "image")
    assert seen["cpython@image"] == vg.Observation("3.11.2", "3.11.2-6+deb12u8", "sandbox probe")
    assert seen["torch@image"].version == "2.13.0+cpu" and "numpy@image" not in seen

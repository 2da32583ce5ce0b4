"""Finding and setting a container's CPU weight (sandboxes/cpu_weight.py), on a directory tree
laid out like cgroupfs: the real cgroup files are exercised by
tests/integration/test_cpu_weight.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from airlock_broker.sandboxes.cpu_weight import CpuWeight

ID = "0123456789abcdef" * 4


def _control(root: Path, relative: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True)
    path.write_bytes(b"1024\n")
    return path


@pytest.mark.parametrize(("line", "relative", "values"), [
    (f"4:cpu:/docker/{ID}", f"cpu/docker/{ID}/cpu.shares", (b"2", b"1024")),
    (f"4:cpu,cpuacct:/docker/{ID}", f"cpu,cpuacct/docker/{ID}/cpu.shares", (b"2", b"1024")),
    (f"0::/system.slice/docker-{ID}.scope", f"system.slice/docker-{ID}.scope/cpu.weight",
     (b"1", b"100")),
])
def test_the_weight_of_a_container_is_found_and_set_low_then_back(
        tmp_path: Path, line: str, relative: str, values: tuple[bytes, bytes]) -> None:
    control = _control(tmp_path, relative)
    cgroups = f"6:freezer:/docker/{ID}\n{line}\n"
    weight = CpuWeight.of(cgroups, ID, root=tmp_path)
    assert weight is not None and weight.path == control
    weight.lower()
    assert control.read_bytes() == values[0]
    weight.let_import()  # a refill in its import batch: above the lowest, below the default
    assert int(values[0]) < int(control.read_bytes()) < int(values[1])
    weight.restore()
    assert control.read_bytes() == values[1]


def test_a_v1_cpu_controller_mounted_with_cpuacct_is_found_through_its_cpu_name(
        tmp_path: Path) -> None:
    control = _control(tmp_path, f"cpu/docker/{ID}/cpu.shares")
    weight = CpuWeight.of(f"4:cpu,cpuacct:/docker/{ID}\n", ID, root=tmp_path)
    assert weight is not None and weight.path == control


@pytest.mark.parametrize("cgroups", [
    "4:cpu:/docker/someone-else\n",                 # not the container's cgroup
    f"4:cpu:/docker/../{ID}\n",                     # a path that climbs
    f"4:memory:/docker/{ID}\n",                     # no cpu controller
    f"4:cpu:/docker/{ID}-missing\n",                # no control file there
])
def test_no_weight_is_found_where_the_path_is_not_provably_the_containers(
        tmp_path: Path, cgroups: str) -> None:
    _control(tmp_path, f"cpu/docker/{ID}/cpu.shares")
    _control(tmp_path, f"memory/docker/{ID}/cpu.shares")
    assert CpuWeight.of(cgroups, ID, root=tmp_path) is None


def test_a_control_file_replaced_by_a_link_is_not_written(tmp_path: Path) -> None:
    control = _control(tmp_path, f"cpu/docker/{ID}/cpu.shares")
    weight = CpuWeight.of(f"4:cpu:/docker/{ID}\n", ID, root=tmp_path)
    assert weight is not None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    control.unlink()
    control.symlink_to(elsewhere)
    with pytest.raises(OSError):
        weight.lower()
    assert elsewhere.read_bytes() == b"untouched"


def test_a_container_given_the_default_weight_is_never_lowered_again(tmp_path: Path) -> None:
    """``hasten`` (a job's container) forgets the control: a late ``let_import`` from the
    import batches finds nothing to write (docker_sandbox.py)."""
    from airlock_broker.sandboxes.docker_sandbox import DockerSandbox
    from airlock_broker.sandboxes.sandbox import Slot
    from airlock_broker.sandboxes.workspace import JobWorkspace

    control = _control(tmp_path, f"cpu/docker/{ID}/cpu.shares")
    weight = CpuWeight.of(f"4:cpu:/docker/{ID}\n", ID, root=tmp_path)
    slot = Slot(slot_id="s", profile="sklearn", container_id=ID, cpu_weight=weight,
                workspace=JobWorkspace(root=tmp_path / "ws", uid=0, gid=0))
    backend = DockerSandbox.__new__(DockerSandbox)  # the two verbs touch only the slot
    backend.let_import(slot)
    assert control.read_bytes() == b"16"
    backend.hasten(slot)
    assert control.read_bytes() == b"1024"
    backend.let_import(slot)
    assert control.read_bytes() == b"1024"

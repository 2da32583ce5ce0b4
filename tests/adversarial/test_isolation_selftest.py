"""Threat: a sandbox that is not confined the way the policy says (misconfigured engine,
runtime or image). The broker's self-test must see it; here it must pass on each runtime."""

from __future__ import annotations

import json

import pytest

from tests.conftest import BrokerProcess, run_cli

pytestmark = pytest.mark.adversarial

REQUIRED = {"network_none", "read_only_rootfs", "cap_drop_all", "no_new_privileges",
            "non_root_user", "no_capabilities", "read_only_root", "read_only_input",
            "no_network", "no_docker_socket", "tmp_noexec", "no_secrets_in_env",
            "pids_limit", "memory_limit", "no_swap", "only_job_mounts", "no_healthcheck",
            "worker_entrypoint",
            "seccomp_profile", "seccomp_mode", "seccomp_unshare", "seccomp_mount",
            "seccomp_ptrace", "seccomp_bpf", "seccomp_io_uring_setup", "seccomp_keyctl",
            "seccomp_userfaultfd", "seccomp_memfd_create", "seccomp_clone3",
            "version_torch_image", "version_onnx_image", "version_cpython_image",
            "version_onnx_host", "sandbox_ids_unshared", "host_ptrace_scope"}


def test_isolation_selftest_passes_and_covers_the_policy(broker: BrokerProcess) -> None:
    done = run_cli("selftest", "--json", server=broker.unix_address)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is True
    names = {c["name"] for c in report["checks"]}
    assert names >= REQUIRED
    runtime_family = report["runtime"].split("-", 1)[0]
    assert f"version_{runtime_family}_engine" in names  # the OCI runtime's version gate
    for check in report["checks"]:
        assert check["passed"] or check["waived"], check
        # The host's own settings (ptrace_scope, see sandbox_ids) are the host's, not runc's.
        if report["runtime"] == "runc" and check["source"] != "host":
            assert check["passed"], f"no waiver may be needed under runc: {check}"

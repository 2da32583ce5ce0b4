"""Threat class A: an artifact that runs code the moment it is loaded - a reduce payload in
every container Airlock accepts (pickle, compressed joblib, numpy object array, PyTorch zip),
behind scanner-evasion wrappers, in polyglots, and as bait for a fallback to full unpickling.

The payload tries to escape (write a host file, reach the host's listeners, run a shell) and
then proves it *did* run by leaving its marker in the one output the broker validates: code
execution is contained, not prevented, under ``allow_code``; ``safe_only`` refuses it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adversarial import payloads
from tests.adversarial.oracles import (
    Observers,
    assert_contained,
    findings,
    observers,  # noqa: F401  (fixture)
    run_case,
)
from tests.conftest import BrokerProcess

pytestmark = pytest.mark.adversarial

SUFFIX = {"pickle": ".pkl", "joblib": ".joblib", "npy": ".npy", "torch": ".pt"}


def _escape_source(case: str, obs: Observers) -> str:
    return payloads.probe_source(case, payloads.ESCAPE_ATTEMPTS,
                                 canary=str(obs.escape_target), hosts=obs.hosts,
                                 tcp_port=obs.tcp.port, udp_port=obs.udp.port)


def _assert_ran_contained(found: dict[str, str]) -> None:
    escapes = {k: v for k, v in found.items() if k.startswith("escape.") and v.startswith("OK")}
    assert escapes == {}, escapes
    assert found["ran.shell"] == "OK:0", found  # it really ran, and could run a shell


@pytest.mark.parametrize("carrier", ["pickle", "joblib", "npy", "torch"])
def test_reduce_payload_runs_only_inside_the_sandbox(carrier: str, broker: BrokerProcess,
                                                     docker_client,
                                                     observers: Observers,  # noqa: F811
                                                     tmp_path: Path) -> None:
    case_id = f"A-{carrier}"
    artifact = payloads.write_carrier(tmp_path / f"model{SUFFIX[carrier]}", carrier,
                                      _escape_source(case_id, observers))
    case = run_case(broker, artifact, "--timeout", "60")
    _assert_ran_contained(findings(case, case_id))
    assert case.doc["executed_artifact_code"] is True or carrier in {"npy", "torch"}, case.doc
    assert case.doc["assurance"] == "format_safe_only", case.doc
    assert_contained(case, broker, docker_client, observers, tmp_path, "ok")


@pytest.mark.parametrize("variant", ["broken_pickle", "resolve_name_indirection",
                                     "gzip_wrapped"])
def test_scanner_evasion_wrapper_is_contained_like_the_plain_payload(
        variant: str, broker: BrokerProcess, docker_client, observers: Observers,  # noqa: F811
        tmp_path: Path) -> None:
    case_id = f"A11-{variant}"
    artifact = tmp_path / "weights.dat"  # odd extension: the format comes from magic bytes
    artifact.write_bytes(payloads.evasion_variant(variant, _escape_source(case_id, observers)))
    case = run_case(broker, artifact, "--timeout", "60")
    _assert_ran_contained(findings(case, case_id))
    assert_contained(case, broker, docker_client, observers, tmp_path, "ok")


@pytest.mark.parametrize(("variant", "declared", "reason"), [
    ("protocol_0_text", None, "UNSUPPORTED_FORMAT"),
    ("pickle_zip_polyglot", "pytorch", "FORMAT_MISMATCH"),
    ("plain", "safetensors", "FORMAT_MISMATCH"),
    ("plain", "onnx", "FORMAT_MISMATCH"),
])
def test_polyglot_or_misdeclared_payload_is_refused_before_any_loader(
        variant: str, declared: str | None, reason: str, broker: BrokerProcess, docker_client,
        observers: Observers, tmp_path: Path) -> None:  # noqa: F811
    source = _escape_source("A14", observers)
    data = (payloads.reduce_pickle(source) if variant == "plain"
            else payloads.evasion_variant(variant, source))
    artifact = tmp_path / f"model.{declared or 'pkl'}"
    artifact.write_bytes(data)
    args = ("--format", declared) if declared else ()
    case = run_case(broker, artifact, *args)
    assert case.outcome == ("rejected", reason), case.doc
    assert_contained(case, broker, docker_client, observers, tmp_path, "rejected", {reason})


@pytest.mark.parametrize("carrier", ["torch_unsupported_global", "npy", "joblib"])
def test_safe_only_policy_never_falls_back_to_unpickling(carrier: str, broker: BrokerProcess,
                                                         docker_client,
                                                         observers: Observers,  # noqa: F811
                                                         tmp_path: Path) -> None:
    source = _escape_source("A13", observers)
    if carrier == "torch_unsupported_global":
        artifact = tmp_path / "bait.pt"
        artifact.write_bytes(payloads.torch_zip_with_unsupported_global(source))
    else:
        artifact = payloads.write_carrier(tmp_path / f"bait{SUFFIX[carrier]}", carrier, source)
    # Had the payload run, it would have produced a valid output and the job would be "ok".
    case = run_case(broker, artifact, "--policy", "safe_only", "--timeout", "60")
    assert case.outcome == ("rejected", "POLICY_VIOLATION"), case.doc
    assert_contained(case, broker, docker_client, observers, tmp_path, "rejected",
                     {"POLICY_VIOLATION"})

"""Threat: a file that opens like a native booster (the bytes Airlock now converts under
``safe_only``) and carries a pickle reduce payload, hoping the booster path hands it to an
unpickler. Nothing on that path unpickles: the worker refuses a file that does not end as a
booster, and a booster's own parser reads the rest as data and fails on it. Had the payload
run, it would have written its findings as a valid output and the job would be "ok"."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adversarial import payloads
from tests.adversarial.oracles import (
    Observers,
    assert_contained,
    observers,  # noqa: F401  (fixture)
    run_case,
)
from tests.conftest import BrokerProcess

pytestmark = pytest.mark.adversarial

#: variant -> (head, tail, the reason of the refusal)
VARIANTS: dict[str, tuple[bytes, bytes, set[str]]] = {
    # cut short by the worker's check: no parser reads it
    "xgboost_json_head": (b'{"learner":{"attributes":{', b"", {"UNSUPPORTED_FORMAT"}),
    "xgboost_ubj_head": (b"{L\x00\x00\x00\x00\x00\x00\x00\x07learner{L\x00\x00\x00\x00\x00"
                         b"\x00\x00\x0aattributes{", b"", {"UNSUPPORTED_FORMAT"}),
    # the whole disguise: it ends as a booster, so XGBoost's JSON parser reads it and fails
    "xgboost_json_whole": (b'{"learner":{"attributes":{"p":"', b'"}},"version":[3,2,0]}',
                           {"CONVERSION_FAILED"}),
    # LightGBM's parser loops on the pickle's NUL bytes: the worker refuses them first
    "lightgbm_whole": (b"tree\nversion=v4\n", b"\nend of trees\n", {"UNSUPPORTED_FORMAT"}),
}


@pytest.mark.parametrize("policy", ["allow_code", "safe_only"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_booster_disguise_never_reaches_an_unpickler(
        variant: str, policy: str, broker: BrokerProcess, docker_client,
        observers: Observers, tmp_path: Path) -> None:  # noqa: F811
    head, tail, reasons = VARIANTS[variant]
    source = payloads.probe_source(f"B14-{variant}", payloads.ESCAPE_ATTEMPTS,
                                   canary=str(observers.escape_target), hosts=observers.hosts,
                                   tcp_port=observers.tcp.port, udp_port=observers.udp.port)
    artifact = tmp_path / "model.ubj"
    artifact.write_bytes(head + payloads.reduce_pickle(source) + tail)
    case = run_case(broker, artifact, "--policy", policy, "--timeout", "60")
    assert case.doc["status"] in {"rejected", "failed"}, case.doc
    assert_contained(case, broker, docker_client, observers, tmp_path, {"rejected", "failed"},
                     reasons)

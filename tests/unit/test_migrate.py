"""``airlock migrate`` against a fake registry at the ``Registry`` seam: the paging walker, the
resume/idempotence rules, failures that never stop a run, and the exit-code and summary logic.
The real tracking server, broker and sandbox are exercised in tests/integration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.security.keys import SigningKey, create_key
from airlock_client import _lineage as tags
from airlock_client import _migrate_cli, cli
from airlock_client._cli_exits import EXIT_USAGE
from airlock_client._errors import AccessDenied, ServiceUnavailable
from airlock_client._registry import (
    RegistryError,
    model_versions,
    name_filter,
    registered_models,
    walk_pages,
)
from airlock_client.migrate import (
    Migration,
    MigrationAborted,
    Options,
    Outcome,
    SelectionError,
    Status,
    counts,
)
from tests.unit.fake_registry import FakePage, FakeRegistry, FakeVersion
from tests.unit.migrate_helpers import (
    FakeSandbox,
    envelope,
    failed,
    plant_twin,
    rejected,
    tiny_onnx,
)


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return create_key(tmp_path / "state" / "key.pem")


def _migration(registry: FakeRegistry, sandbox: FakeSandbox, **options: Any) -> Migration:
    return Migration(registry, fetch=sandbox.fetch, convert=sandbox.convert,
                     download=registry.download, public_key=sandbox.key.public_pem.encode(),
                     options=Options(**options))


# -- the paging walker -------------------------------------------------------------------------


def test_walker_follows_tokens_until_the_last_page() -> None:
    registry = FakeRegistry()
    for i in range(23):
        registry.add_model(f"m{i:02d}")
    names = [m.name for m in registered_models(registry, page_size=5)]
    assert names == [f"m{i:02d}" for i in range(23)]
    assert registry.searches == [("models", 5)] * 5  # 5 + 5 + 5 + 5 + 3


def test_walker_copes_with_a_server_that_returns_less_than_asked() -> None:
    registry = FakeRegistry(server_cap=2)
    registry.add_model("big", versions=11)
    versions = model_versions(registry, "big", page_size=100)
    assert [v.version for v in versions] == [str(v) for v in range(1, 12)]
    assert len(registry.searches) == 6


def test_walker_refuses_a_token_it_has_seen() -> None:
    pages = iter([FakePage([1], "t1"), FakePage([2], "t2"), FakePage([3], "t1")])
    with pytest.raises(RegistryError, match="same page token"):
        list(walk_pages(lambda token: next(pages), "things"))


def test_model_versions_dedupes_and_sorts_numerically() -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=12)
    registry.versions["m"].reverse()
    registry.versions["m"].append(registry.versions["m"][0])  # a page boundary repeat
    assert [v.version for v in model_versions(registry, "m", page_size=4)] == \
        [str(v) for v in range(1, 13)]


def test_a_name_filter_quotes_the_name_or_matches_what_comes_before_its_quote() -> None:
    assert name_filter("fraud") == "name = 'fraud'"
    assert name_filter("it's") == 'name = "it\'s"'
    assert name_filter("""both ' and " """) == "name LIKE 'both %'"


def test_a_model_named_with_both_quotes_is_migrated_and_stops_no_other(key: SigningKey) -> None:
    """Anyone who may register a model can name it ``evil'"name`` (MLflow refuses only / and
    :). No search filter can name it, and that refusal aborted every ``migrate --all``
    (REGISTRY_UNAVAILABLE) before any model converted."""
    registry = FakeRegistry()
    registry.add_model("""evil'"name""", versions=1)
    registry.add_model("evil", versions=2)  # what its filter (name LIKE 'evil%') also finds
    registry.add_model("fraud", versions=1)
    sandbox = FakeSandbox(key)
    outcomes = _migration(registry, sandbox).run(None)
    assert sorted((o.model, o.version, o.status) for o in outcomes) == [
        ("evil", "1", Status.CONVERTED), ("evil", "2", Status.CONVERTED),
        ("""evil'"name""", "1", Status.CONVERTED), ("fraud", "1", Status.CONVERTED)]
    assert registry.version("""evil'"name-airlock""", 1).tags[tags.SOURCE_MODEL] == \
        """evil'"name"""


# -- migrating -------------------------------------------------------------------------------


def test_every_version_is_converted_and_registered_with_its_lineage(key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("fraud", versions=2)
    registry.add_model("encoder", versions=1)
    sandbox = FakeSandbox(key, plan={("encoder", "1"): "safetensors"})
    outcomes = _migration(registry, sandbox, page_size=1).run(None)

    assert [(o.model, o.version, o.status) for o in outcomes] == [
        ("fraud", "1", Status.CONVERTED), ("fraud", "2", Status.CONVERTED),
        ("encoder", "1", Status.CONVERTED)]
    target = registry.models["fraud-airlock"]
    assert target.tags == {tags.ROLE: tags.ROLE_MIGRATED, tags.SOURCE_MODEL: "fraud"}
    twin = registry.version("fraud-airlock", 2)
    assert twin.tags[tags.SOURCE_MODEL] == "fraud" and twin.tags[tags.SOURCE_VERSION] == "2"
    assert twin.tags[tags.OUTPUT_FORMAT] == "onnx"
    assert twin.tags[tags.OUTPUT_SHA256] == outcomes[1].output_sha256
    assert twin.tags[tags.SOURCE_SHA256] == outcomes[1].source_sha256
    assert twin.tags[tags.VERDICT] == "format_safe_only"
    # exactly the model file and its provenance, nothing MLflow could load
    run = registry.runs[str(twin.run_id)]
    assert sorted(run["artifacts"]) == ["model/model.onnx", "model/model.onnx.provenance.json"]
    assert run["status"] == "FINISHED"
    assert twin.source == f"fake-artifacts:/{twin.run_id}/model"
    assert registry.version("fraud", 2).tags[tags.MIGRATED_TO] == "fraud-airlock/2"
    assert registry.version("encoder", 1).tags[tags.STATUS] == "converted"
    enc_run = registry.runs[str(registry.version("encoder-airlock", 1).run_id)]
    assert "model/model.safetensors" in enc_run["artifacts"]


def test_a_second_run_writes_nothing_and_converts_nothing(key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("fraud", versions=3)
    sandbox = FakeSandbox(key, plan={("fraud", "2"): rejected()})
    first = _migration(registry, sandbox).run(["fraud"])
    writes, converted = len(registry.writes), len(sandbox.converted)

    again = _migration(registry, sandbox).run(["fraud"])
    assert [o.status for o in again] == [Status.ALREADY_MIGRATED, Status.FAILED_EARLIER,
                                         Status.ALREADY_MIGRATED]
    assert again[1].reason == "POLICY_VIOLATION"
    # a skipped version still reports what its twin holds (from the twin's tags)
    assert (again[0].format, again[0].output_sha256, again[0].target) == \
        (first[0].format, first[0].output_sha256, first[0].target) != ("", "", "")
    assert len(registry.writes) == writes and len(sandbox.converted) == converted


def test_dry_run_changes_nothing(key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("fraud", versions=2)
    sandbox = FakeSandbox(key)
    outcomes = _migration(registry, sandbox, dry_run=True, alias="champion").run(["fraud"])
    assert [o.status for o in outcomes] == [Status.WOULD_CONVERT] * 2
    assert registry.writes == [] and sandbox.fetched == [] and sandbox.converted == []
    assert "fraud-airlock" not in registry.models


def test_a_failed_version_never_stops_the_run_and_its_reason_is_recorded(
        key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=3)
    sandbox = FakeSandbox(key, plan={("m", "1"): rejected("POLICY_VIOLATION", "pickle says no"),
                                     ("m", "2"): failed("CONVERSION_FAILED", "skl2onnx: ...")})
    outcomes = _migration(registry, sandbox).run(["m"])
    assert [o.status for o in outcomes] == [Status.REJECTED, Status.FAILED, Status.CONVERTED]
    source = registry.version("m", 1).tags
    assert source[tags.STATUS] == "rejected" and source[tags.REASON] == "POLICY_VIOLATION"
    assert source[tags.MESSAGE] == "pickle says no"
    assert _migrate_cli.exit_code(outcomes) == _migrate_cli.EXIT_FAILED


def test_transient_failures_are_retried_and_refusals_only_on_request(key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=2)
    sandbox = FakeSandbox(key, plan={("m", "1"): failed("SANDBOX_TIMEOUT"),
                                     ("m", "2"): rejected()})
    _migration(registry, sandbox).run(["m"])
    sandbox.plan.clear()  # the machine is quiet now, and the "refusal" would pass
    outcomes = _migration(registry, sandbox).run(["m"])
    assert [o.status for o in outcomes] == [Status.CONVERTED, Status.FAILED_EARLIER]
    assert tags.REASON not in registry.version("m", 1).tags  # stale failure tags removed

    outcomes = _migration(registry, sandbox, retry_failed=True).run(["m"])
    assert [o.status for o in outcomes] == [Status.ALREADY_MIGRATED, Status.CONVERTED]


def test_broker_unavailable_stops_the_run_and_the_next_run_resumes(key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=3)
    sandbox = FakeSandbox(key, plan={("m", "2"): ServiceUnavailable("connection refused")})
    with pytest.raises(MigrationAborted) as info:
        _migration(registry, sandbox).run(["m"])
    assert info.value.reason == "BROKER_UNAVAILABLE"
    assert [o.status for o in info.value.outcomes] == [Status.CONVERTED]
    assert tags.STATUS not in registry.version("m", 2).tags  # not blamed on the artifact

    sandbox.plan.clear()
    outcomes = _migration(registry, sandbox).run(["m"])
    assert [o.status for o in outcomes] == [Status.ALREADY_MIGRATED, Status.CONVERTED,
                                            Status.CONVERTED]
    assert len(registry.versions["m-airlock"]) == 3


@pytest.mark.parametrize("root", ["https://their.host/api/2.0/mlflow-artifacts/artifacts/",
                                  "file:///home/you/.ssh/"])
def test_outputs_are_never_uploaded_where_an_experiment_made_by_someone_else_points(
        key: SigningKey, root: str) -> None:
    """Anyone who may write the registry can make the experiment ``airlock-migrate`` before
    the first run, with an artifact location of their own. On the code before, the outputs
    were logged there (MLflow sends the tracking token with them to an HTTP host; a path is
    written on the client's host) and registered (seen: both log_artifact writes)."""
    registry = FakeRegistry()
    registry.add_model("m", versions=2)
    registry.artifact_root = root
    with pytest.raises(MigrationAborted) as info:
        _migration(registry, FakeSandbox(key)).run(["m"])
    assert info.value.reason == "UNSAFE_ARTIFACT_LOCATION"
    assert root.rstrip("/") in info.value.message
    assert [w for w in registry.writes if w[0] in ("log_artifact", "create_model_version")] == []


def test_a_run_cut_between_registering_and_tagging_finishes_on_the_next(
        key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    sandbox = FakeSandbox(key)
    registry.fail_on["set_model_version_tag"] = ConnectionError("tracking server went away")
    with pytest.raises(MigrationAborted) as info:
        _migration(registry, sandbox).run(["m"])
    assert info.value.reason == "REGISTRY_UNAVAILABLE"
    assert len(registry.versions["m-airlock"]) == 1 and tags.MIGRATED_TO not in \
        registry.version("m", 1).tags

    outcomes = _migration(registry, sandbox).run(["m"])
    assert [o.status for o in outcomes] == [Status.ALREADY_MIGRATED]
    assert registry.version("m", 1).tags[tags.MIGRATED_TO] == "m-airlock/1"
    assert len(registry.versions["m-airlock"]) == 1 and len(sandbox.converted) == 1


def test_selection(key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("a")
    registry.add_model("b")
    registry.add_model("greeting", **{"mlflow.prompt.is_prompt": "true"})
    sandbox = FakeSandbox(key)
    _migration(registry, sandbox).run(["a"])
    migration = _migration(registry, sandbox)
    assert migration.select(None) == ["a", "b"]  # never a-airlock
    assert migration.select(["b", "a", "b"]) == ["b", "a"]
    with pytest.raises(SelectionError, match="no registered model"):
        migration.select(["a", "typo"])
    with pytest.raises(SelectionError, match="migrate its source"):
        migration.select(["a-airlock"])


def test_a_foreign_model_in_the_target_name_is_never_written_to(key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    registry.add_model("m-airlock", versions=1)  # someone's own model, not Airlock's
    sandbox = FakeSandbox(key)
    outcomes = _migration(registry, sandbox).run(["m"])
    assert outcomes[0].status == Status.REJECTED and outcomes[0].reason == "TARGET_CONFLICT"
    assert len(registry.versions["m-airlock"]) == 1 and sandbox.converted == []


def test_versions_still_being_created_are_reported_not_converted(key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    registry.version("m", 1).status = "PENDING_REGISTRATION"
    outcomes = _migration(registry, FakeSandbox(key)).run(["m"])
    assert outcomes[0].status == Status.NOT_READY
    assert _migrate_cli.exit_code(outcomes) == _migrate_cli.EXIT_FAILED


def test_alias_points_at_the_newest_migrated_version(key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=3)
    sandbox = FakeSandbox(key, plan={("m", "3"): rejected()})
    _migration(registry, sandbox, alias="champion").run(["m"])
    assert registry.models["m-airlock"].aliases == {"champion": "2"}
    assert registry.version("m-airlock", 2).tags[tags.SOURCE_VERSION] == "2"
    writes = len(registry.writes)
    _migration(registry, sandbox, alias="champion").run(["m"])
    assert len(registry.writes) == writes  # already pointing there: not even re-set


# -- exit codes and the summary --------------------------------------------------------------


@pytest.mark.parametrize(("statuses", "code"), [
    ([], _migrate_cli.EXIT_NOTHING),
    ([Status.CONVERTED, Status.ALREADY_MIGRATED], _migrate_cli.EXIT_OK),
    ([Status.WOULD_CONVERT], _migrate_cli.EXIT_OK),
    ([Status.CONVERTED, Status.REJECTED], _migrate_cli.EXIT_FAILED),
    ([Status.ALREADY_MIGRATED, Status.FAILED_EARLIER], _migrate_cli.EXIT_FAILED),
    ([Status.FAILED], _migrate_cli.EXIT_FAILED),
])
def test_exit_code(statuses: list[Status], code: int) -> None:
    assert _migrate_cli.exit_code([Outcome("m", str(i), s) for i, s in enumerate(statuses)]) \
        == code


def test_summary_table_and_counts() -> None:
    outcomes = [Outcome("fraud", "1", Status.CONVERTED, target="fraud-airlock/1",
                        format="onnx", assurance="format_safe_only"),
                Outcome("fraud", "2", Status.REJECTED, reason="POLICY_VIOLATION",
                        message="x" * 300)]
    table = _migrate_cli.render_table(outcomes).splitlines()
    assert table[0].split() == ["MODEL", "VERSION", "STATUS", "TARGET", "FORMAT", "VERDICT",
                                "CODE_RAN", "REASON"]
    assert table[1].split()[:7] == ["fraud", "1", "converted", "fraud-airlock/1", "onnx",
                                    "format_safe_only", "-"]
    assert "POLICY_VIOLATION: " in table[2] and len(table[2]) < 200
    tally = counts(outcomes)
    assert tally["converted"] == 1 and tally["rejected"] == 1 and sum(tally.values()) == 2


def _args(**overrides: Any) -> argparse.Namespace:
    argv = ["migrate", *overrides.pop("argv", ["--all"])]
    return cli.build_parser().parse_args(argv)


def test_cli_needs_an_explicit_tracking_server(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert _migrate_cli.run_migrate(_args()) == EXIT_USAGE
    assert "--tracking-uri" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "1001"])
def test_cli_refuses_a_bad_page_size(size: str) -> None:
    args = _args(argv=["--all", "--tracking-uri", "http://127.0.0.1:1", "--page-size", size])
    assert _migrate_cli.run_migrate(args) == EXIT_USAGE


def _broker(sandbox: FakeSandbox, pools: Any = ()) -> _migrate_cli.Broker:
    """The CLI's broker: ``sandbox`` converts; ``pools`` is its pool status (or raises)."""
    def status() -> Any:
        if isinstance(pools, Exception):
            raise pools
        return list(pools)

    return _migrate_cli.Broker(sandbox.convert, lambda: None, status)


def _isolate_env(monkeypatch: pytest.MonkeyPatch, key: SigningKey,
                 registry: FakeRegistry) -> None:
    """run_migrate pins MLflow's URIs in the environment; give them back after the test. The
    broker's key is pinned through AIRLOCK_PUBLIC_KEY."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://fake")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    pub = key.path.parent / "airlock.pub.pem"
    pub.write_text(key.public_pem)
    monkeypatch.setenv("AIRLOCK_PUBLIC_KEY", str(pub))
    monkeypatch.setattr(_migrate_cli, "mlflow_download", lambda uri, _: registry.download)
    monkeypatch.setattr(_migrate_cli, "mlflow_listing", lambda uri, _: registry.listing)


def test_cli_json_summary_and_exit_code(monkeypatch: pytest.MonkeyPatch, key: SigningKey,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=2)
    sandbox = FakeSandbox(key, plan={("m", "2"): rejected()})
    _isolate_env(monkeypatch, key, registry)
    monkeypatch.setattr(_migrate_cli, "open_registry", lambda *a: registry)
    monkeypatch.setattr(_migrate_cli, "_fetch", lambda uri, _: sandbox.fetch)
    monkeypatch.setattr(_migrate_cli, "_converter", lambda *a: _broker(sandbox))
    args = _args(argv=["--model", "m", "--tracking-uri", "http://fake", "--json"])
    assert _migrate_cli.run_migrate(args) == _migrate_cli.EXIT_FAILED
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["status"] == "failed" and doc["exit_code"] == 1
    assert [v["status"] for v in doc["versions"]] == ["converted", "rejected"]
    assert "[2/2] m v2: rejected: POLICY_VIOLATION" in captured.err

    args = _args(argv=["--model", "m", "--tracking-uri", "http://fake"])
    assert _migrate_cli.run_migrate(args) == _migrate_cli.EXIT_FAILED
    out = capsys.readouterr().out
    assert "already_migrated" in out and "failed_earlier" in out


def test_cli_exit_codes_for_unknown_models_and_a_dead_broker(
        monkeypatch: pytest.MonkeyPatch, key: SigningKey,
        capsys: pytest.CaptureFixture[str]) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    sandbox = FakeSandbox(key, plan={("m", "1"): ServiceUnavailable("connection refused")})
    _isolate_env(monkeypatch, key, registry)
    monkeypatch.setattr(_migrate_cli, "open_registry", lambda *a: registry)
    monkeypatch.setattr(_migrate_cli, "_fetch", lambda uri, _: sandbox.fetch)
    monkeypatch.setattr(_migrate_cli, "_converter", lambda *a: _broker(sandbox))
    base = ["--tracking-uri", "http://fake"]
    assert _migrate_cli.run_migrate(_args(argv=["--model", "nope", *base])) == 2
    assert _migrate_cli.run_migrate(_args(argv=["--model", "m", *base])) == 3
    assert "run again to resume" in capsys.readouterr().err
    sandbox.plan[("m", "1")] = AccessDenied("UNAUTHENTICATED", "no token", kind="denied",
                                            code="UNAUTHENTICATED")
    assert _migrate_cli.run_migrate(_args(argv=["--model", "m", *base])) == 4
    assert tags.STATUS not in registry.version("m", 1).tags  # not blamed on the artifact
    registry.models.clear()
    assert _migrate_cli.run_migrate(_args(argv=["--all", *base])) == 5



# -- twins are believed from signed provenance, never from tags --------------------------------

BACKDOOR = tiny_onnx(bias=666.0)


def _forge(registry: FakeRegistry, key: SigningKey, source: str, version: str,
           subject: str | None = None) -> str:
    """A backdoor sent through Airlock (so validly signed, with the subject the attacker
    chose) and registered as a twin of ``source``/``version`` with matching tags."""
    signed = envelope(key, BACKDOOR, "onnx", source=BACKDOOR,
                      subject=subject or f"models:/{source}/{version}")
    return str(plant_twin(registry, key, source, version, BACKDOOR, signed).version)


def test_a_forged_twin_does_not_make_a_version_already_migrated_nor_get_the_alias(
        key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    sandbox = FakeSandbox(key)
    _migration(registry, sandbox, alias="champion").run(["m"])
    registry.versions["m"].append(FakeVersion("m", "2", source="src/m/2"))  # a new version
    forged = _forge(registry, key, "m", "2")
    lines: list[str] = []
    migration = Migration(registry, fetch=sandbox.fetch, convert=sandbox.convert,
                          download=registry.download, public_key=key.public_pem.encode(),
                          options=Options(alias="champion"), progress=lines.append)
    outcomes = migration.run(["m"])

    assert [o.status for o in outcomes] == [Status.ALREADY_MIGRATED, Status.CONVERTED]
    genuine = outcomes[1].target.rpartition("/")[2]
    assert genuine != forged and sandbox.converted[-1] == "models:/m/2"
    assert registry.models["m-airlock"].aliases == {"champion": genuine}
    assert f"m-airlock/{forged} (SOURCE_MISMATCH)" in outcomes[1].message
    assert any("WARNING: m-airlock/" + forged in line for line in lines)
    # and from now on the genuine twin is the one found, the forged one never counts
    again = _migration(registry, sandbox, alias="champion").run(["m"])
    assert [(o.status, o.target) for o in again] == [
        (Status.ALREADY_MIGRATED, outcomes[0].target),
        (Status.ALREADY_MIGRATED, f"m-airlock/{genuine}")]


def test_a_forged_newer_twin_of_a_migrated_version_never_gets_the_alias(
        key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    sandbox = FakeSandbox(key)
    _migration(registry, sandbox, alias="champion").run(["m"])
    registry.models["m-airlock"].aliases["champion"] = _forge(registry, key, "m", "1")
    outcomes = _migration(registry, sandbox, alias="champion").run(["m"])
    assert [(o.status, o.target) for o in outcomes] == [(Status.ALREADY_MIGRATED,
                                                         "m-airlock/1")]
    assert registry.models["m-airlock"].aliases == {"champion": "1"}  # moved back
    assert len(sandbox.converted) == 1


@pytest.mark.parametrize("lie", ["subject", "tags", "key", "output"])
def test_every_kind_of_forged_twin_is_converted_again(key: SigningKey, tmp_path: Path,
                                                      lie: str) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=2)
    sandbox = FakeSandbox(key)
    _migration(registry, sandbox).run(["m"])
    registry.versions["m"].append(FakeVersion("m", "3", source="src/m/3"))
    real = registry.runs[str(registry.version("m-airlock", 1).run_id)]["artifacts"]
    data, signed = real["model/model.onnx"], real["model/model.onnx.provenance.json"]
    signer = key
    if lie == "key":  # a genuine-looking record for m/3, signed by some other key
        signer = create_key(tmp_path / "attacker" / "key.pem")
        signed = envelope(signer, data, "onnx", subject="models:/m/3")
    twin = plant_twin(registry, signer, "m", "3", data, signed)  # m/1's twin, claiming m/3
    if lie == "tags":  # tags that even say so
        twin.tags[tags.SOURCE_VERSION] = "3"
    if lie == "output":  # the right record, another file
        registry.runs[str(twin.run_id)]["artifacts"]["model/model.onnx"] = BACKDOOR
    outcomes = _migration(registry, sandbox).run(["m"])
    assert [o.status for o in outcomes][2] == Status.CONVERTED
    assert sandbox.converted[-1] == "models:/m/3"


def test_twins_registered_before_subjects_still_count(key: SigningKey) -> None:
    """A twin whose record is version 1 (no subject) counts when it is a conversion of the
    source's very bytes: no mass re-conversion after an upgrade."""
    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    sandbox = FakeSandbox(key)
    _migration(registry, sandbox).run(["m"])
    twin = registry.version("m-airlock", 1)
    files = registry.runs[str(twin.run_id)]["artifacts"]
    files["model/model.onnx.provenance.json"] = envelope(
        key, files["model/model.onnx"], "onnx", record_version=1,
        source_sha256=twin.tags[tags.SOURCE_SHA256])
    outcomes = _migration(registry, sandbox).run(["m"])
    assert [o.status for o in outcomes] == [Status.ALREADY_MIGRATED]
    assert len(sandbox.converted) == 1


def test_the_subject_is_the_source_version(key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("fraud", versions=2)
    registry.add_model("odd\u202ename", versions=1)  # a bidi override in a model name
    sandbox = FakeSandbox(key)
    _migration(registry, sandbox).run(None)
    assert sandbox.subjects == ["models:/fraud/1", "models:/fraud/2", "models:/odd\\u202ename/1"]


def test_a_conversion_not_signed_by_the_pinned_key_is_not_registered(
        key: SigningKey, tmp_path: Path) -> None:
    """Whatever key the convert callable trusted (a key fetched from the broker, say)."""
    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    other = create_key(tmp_path / "broker-we-did-not-pin" / "key.pem")
    outcomes = Migration(registry, fetch=FakeSandbox(other).fetch,
                         convert=FakeSandbox(other).convert, download=registry.download,
                         public_key=key.public_pem.encode()).run(["m"])
    assert outcomes[0].status == Status.REJECTED and outcomes[0].reason == "SIGNATURE_INVALID"
    assert "m-airlock" not in registry.models


def test_a_tag_alone_never_takes_a_model_out_of_all(key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("m")
    sandbox = FakeSandbox(key)
    _migration(registry, sandbox).run(["m"])  # m-airlock: Airlock's target of m
    role = {tags.ROLE: tags.ROLE_MIGRATED}
    registry.add_model("risky", **role)  # a pickle hidden behind a tag
    registry.add_model("ghost-airlock", **role, **{tags.SOURCE_MODEL: "ghost"})  # no ghost
    registry.add_model("x-v2", **role, **{tags.SOURCE_MODEL: "m"})  # not m's target name
    migration = _migration(registry, sandbox)
    assert migration.select(None) == ["m", "risky", "ghost-airlock", "x-v2"]
    assert migration.select(["risky"]) == ["risky"]
    with pytest.raises(SelectionError, match="migrate its source"):
        migration.select(["m-airlock"])
    outcomes = migration.run(None)
    assert {(o.model, o.status) for o in outcomes} >= {("risky", Status.CONVERTED),
                                                       ("ghost-airlock", Status.CONVERTED)}


def test_cli_refuses_a_key_it_did_not_pin(monkeypatch: pytest.MonkeyPatch, key: SigningKey,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    sandbox = FakeSandbox(key)
    _isolate_env(monkeypatch, key, registry)
    monkeypatch.delenv("AIRLOCK_PUBLIC_KEY")
    monkeypatch.setattr(_migrate_cli, "open_registry", lambda *a: registry)
    monkeypatch.setattr(_migrate_cli, "_fetch", lambda uri, _: sandbox.fetch)
    monkeypatch.setattr(_migrate_cli, "_converter", lambda *a: _broker(sandbox))
    # (a dry run writes nothing and needs no key: test_a_dry_run_needs_no_pinned_key)
    args = _args(argv=["--model", "m", "--tracking-uri", "http://fake"])
    assert _migrate_cli.run_migrate(args) == EXIT_USAGE
    assert "--public-key" in capsys.readouterr().err
    bad = key.path.parent / "not-a-key.pem"
    bad.write_text("hello")
    args = _args(argv=["--model", "m", "--tracking-uri", "http://fake", "--public-key",
                       str(bad)])
    assert _migrate_cli.run_migrate(args) == EXIT_USAGE
    assert registry.writes == [] and registry.searches == [] and sandbox.converted == []


def test_an_alias_never_moves_back_past_a_twin_that_could_not_be_checked(
        key: SigningKey) -> None:
    registry = FakeRegistry()
    registry.add_model("m", versions=2)
    sandbox = FakeSandbox(key)
    _migration(registry, sandbox, alias="champion").run(["m"])
    assert registry.models["m-airlock"].aliases == {"champion": "2"}
    real = sandbox.fetch

    def flaky(uri: str, dest: Path) -> Path:
        if uri == "models:/m/2":
            raise ConnectionError("artifact store hiccup")
        return real(uri, dest)

    sandbox.fetch = flaky  # type: ignore[method-assign]
    outcomes = _migration(registry, sandbox, alias="champion").run(["m"])
    assert [(o.status, o.reason) for o in outcomes] == [
        (Status.ALREADY_MIGRATED, ""), (Status.FAILED, "DOWNLOAD_FAILED")]
    assert registry.models["m-airlock"].aliases == {"champion": "2"}
    sandbox.fetch = real  # type: ignore[method-assign]
    _migration(registry, sandbox, alias="champion").run(["m"])
    source = registry.version("m", 2).tags
    assert source[tags.STATUS] == "converted" and tags.REASON not in source


def test_a_version_whose_conversion_ran_its_code_says_so_everywhere(
        key: SigningKey, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A hostile version converted under allow_code must not look clean: the outcome, the
    table, --json and the twin's tags say that its code ran in the sandbox (signed)."""
    registry = FakeRegistry()
    registry.add_model("m", versions=2)
    sandbox = FakeSandbox(key, executed={("m", "2")})
    outcomes = _migration(registry, sandbox).run(None)
    assert [o.executed_artifact_code for o in outcomes] == [False, True]
    twins = registry.versions["m-airlock"]
    assert [t.tags[tags.EXECUTED_CODE] for t in twins] == ["false", "true"]
    again = _migration(registry, sandbox).run(None)  # from the twins' signed records
    assert [(o.status, o.executed_artifact_code) for o in again] == [
        (Status.ALREADY_MIGRATED, False), (Status.ALREADY_MIGRATED, True)]
    table = _migrate_cli.render_table(again).splitlines()
    assert "CODE_RAN" in table[0].split()
    column = table[0].split().index("CODE_RAN")
    assert [row.split()[column] for row in table[1:]] == ["no", "yes"]

    _isolate_env(monkeypatch, key, registry)
    monkeypatch.setattr(_migrate_cli, "open_registry", lambda *a: registry)
    monkeypatch.setattr(_migrate_cli, "_fetch", lambda uri, _: sandbox.fetch)
    monkeypatch.setattr(_migrate_cli, "_converter", lambda *a: _broker(sandbox))
    args = _args(argv=["--model", "m", "--tracking-uri", "http://fake", "--json"])
    capsys.readouterr()  # the fake registry's "View run" lines, as MLflow prints them
    assert _migrate_cli.run_migrate(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [v["executed_artifact_code"] for v in doc["versions"]] == [False, True]


def test_a_dry_run_needs_no_pinned_key(monkeypatch: pytest.MonkeyPatch, key: SigningKey,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A dry run converts nothing and writes nothing, so it needs no key; without one it
    cannot verify twins either, and says so instead of believing their tags."""
    registry = FakeRegistry()
    registry.add_model("m", versions=2)
    sandbox = FakeSandbox(key)
    _migration(registry, sandbox).run(["m"])  # both migrated
    registry.add_model("n", versions=1)
    _isolate_env(monkeypatch, key, registry)
    monkeypatch.delenv("AIRLOCK_PUBLIC_KEY")
    monkeypatch.setattr(_migrate_cli, "open_registry", lambda *a: registry)
    monkeypatch.setattr(_migrate_cli, "_fetch", lambda uri, _: sandbox.fetch)
    monkeypatch.setattr(_migrate_cli, "_converter", lambda *a: _broker(sandbox))
    writes = len(registry.writes)
    capsys.readouterr()
    args = _args(argv=["--all", "--tracking-uri", "http://fake", "--dry-run", "--json"])
    assert _migrate_cli.run_migrate(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(v["model"], v["version"], v["status"]) for v in doc["versions"]] == [
        ("m", "1", "unverified"), ("m", "2", "unverified"), ("n", "1", "would_convert")]
    assert "no --public-key" in doc["versions"][0]["message"]
    assert len(registry.writes) == writes and len(sandbox.converted) == 2
    args = _args(argv=["--all", "--tracking-uri", "http://fake"])  # a real run still needs it
    assert _migrate_cli.run_migrate(args) == EXIT_USAGE


def test_a_later_copy_of_a_twin_never_takes_its_place_nor_the_alias(key: SigningKey) -> None:
    """A registry writer copies a genuine twin's two files into a version of its own (with
    an MLmodel of its own beside them, which MLflow's loaders would run), tagged as that
    twin is: the twin the source names, then the oldest, is the one that counts, and the
    alias stays on it. With a verdict tag that lies, the copy does not verify at all."""
    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    sandbox = FakeSandbox(key)
    _migration(registry, sandbox, alias="champion").run(["m"])
    real = registry.runs[str(registry.version("m-airlock", 1).run_id)]["artifacts"]
    data, signed = real["model/model.onnx"], real["model/model.onnx.provenance.json"]
    copy = plant_twin(registry, key, "m", "1", data, signed)
    copy.tags[tags.EXECUTED_CODE] = "false"
    registry.runs[str(copy.run_id)]["artifacts"]["model/MLmodel"] = b"flavors: {pyfunc: {}}"
    outcomes = _migration(registry, sandbox, alias="champion").run(["m"])
    assert [(o.status, o.target) for o in outcomes] == [(Status.ALREADY_MIGRATED,
                                                         "m-airlock/1")]
    assert registry.models["m-airlock"].aliases == {"champion": "1"}
    assert registry.version("m", 1).tags[tags.MIGRATED_TO] == "m-airlock/1"

    registry.version("m", 1).tags.pop(tags.MIGRATED_TO)  # the source names none now
    registry.version("m-airlock", 1).tags[tags.VERDICT] = "integrity_verified"  # a lie
    lines: list[str] = []
    again = Migration(registry, fetch=sandbox.fetch, convert=sandbox.convert,
                      download=registry.download, public_key=key.public_pem.encode(),
                      options=Options(alias="champion"), progress=lines.append).run(["m"])
    assert [(o.status, o.target) for o in again] == [(Status.ALREADY_MIGRATED,
                                                      f"m-airlock/{copy.version}")]
    assert any("m-airlock/1 claims to be its twin but is not" in line
               and "airlock.verdict" in line for line in lines), lines


def _listed(registry: FakeRegistry, sandbox: FakeSandbox, **options: Any) -> Migration:
    """``_migration``, with the fake store's listing: what the CLI runs with MLflow's."""
    return Migration(registry, fetch=sandbox.fetch, convert=sandbox.convert,
                     download=registry.download, listing=registry.listing,
                     public_key=sandbox.key.public_pem.encode(), options=Options(**options))


def test_a_twin_with_a_file_beside_its_own_is_no_twin_and_is_converted_again(
        key: SigningKey) -> None:
    """A registry writer adds an ``MLmodel`` to a genuine twin's folder (MLflow's loaders
    would follow it). Its two files still verify, but the folder is not Airlock's output any
    more: the version is converted again and the alias moves to the new twin. Nothing of the
    folder is downloaded: the listing refuses it first."""
    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    sandbox = FakeSandbox(key)

    def migration() -> Migration:
        return _listed(registry, sandbox, alias="champion")

    assert [o.status for o in migration().run(["m"])] == [Status.CONVERTED]
    assert [o.status for o in migration().run(["m"])] == [Status.ALREADY_MIGRATED]
    genuine = registry.runs[str(registry.version("m-airlock", 1).run_id)]["artifacts"]
    genuine["model/MLmodel"] = b"flavors: {python_function: {loader_module: evil}}"
    (again,) = migration().run(["m"])
    assert (again.status, again.target) == (Status.CONVERTED, "m-airlock/2")
    assert "m-airlock/1 (UNEXPECTED_FILE)" in again.message
    assert registry.models["m-airlock"].aliases == {"champion": "2"}


def test_a_claim_the_store_cannot_list_never_blocks_a_version(key: SigningKey) -> None:
    """Anyone who may register a version can point one at a location the store cannot list,
    tag it as a version's twin, and name it in the source's ``migrated_to``. It is not a
    twin, and it blocks nothing: the genuine twin still counts (found by review: a version
    failed for every run, its alias stuck), and a version with no other claim converts."""
    from tests.unit.fake_registry import FakeVersion

    registry = FakeRegistry()
    registry.add_model("m", versions=2)
    sandbox = FakeSandbox(key)

    def migration() -> Migration:
        return _listed(registry, sandbox, alias="champion")

    migration().run(["m"])  # m/1 and m/2 have their twins
    registry.versions["m"].append(FakeVersion("m", "3", source="src/m/3"))  # not migrated yet

    def unlistable(source_version: str) -> str:
        number = str(len(registry.versions["m-airlock"]) + 1)
        registry.versions["m-airlock"].append(FakeVersion(
            "m-airlock", number, {tags.SOURCE_MODEL: "m", tags.SOURCE_VERSION: source_version,
                                  tags.OUTPUT_FORMAT: "onnx"},
            run_id="nowhere", source="fake-artifacts:/nowhere/model"))
        return f"m-airlock/{number}"

    registry.version("m", 2).tags[tags.MIGRATED_TO] = unlistable("2")
    unlistable("3")
    outcomes = {o.version: o for o in migration().run(["m"])}
    assert (outcomes["2"].status, outcomes["2"].target) == (Status.ALREADY_MIGRATED,
                                                            "m-airlock/2")
    assert outcomes["3"].status == Status.CONVERTED
    assert "ARTIFACT_UNAVAILABLE" in outcomes["3"].message
    assert registry.models["m-airlock"].aliases["champion"] == outcomes["3"].target.split("/")[1]


def test_a_claim_whose_files_cannot_be_located_never_blocks_a_version(
        key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with a claim the registry cannot even say where its files are (MLflow
    raises for a version whose source is a run that does not exist): its exception escaped
    the check and aborted every run as REGISTRY_UNAVAILABLE."""
    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    sandbox = FakeSandbox(key)
    _listed(registry, sandbox).run(["m"])  # m/1 has its twin, m-airlock/1
    registry.versions["m-airlock"].append(FakeVersion(
        "m-airlock", "2", {tags.SOURCE_MODEL: "m", tags.SOURCE_VERSION: "1",
                           tags.OUTPUT_FORMAT: "onnx"},
        run_id="gone", source="runs:/gone/model"))
    registry.version("m", 1).tags[tags.MIGRATED_TO] = "m-airlock/2"
    located = registry.get_model_version_download_uri

    def download_uri(name: str, version: str) -> str:
        if registry.version(name, version).source.startswith("runs:/gone"):
            raise RuntimeError("Run 'gone' not found")
        return located(name, version)

    monkeypatch.setattr(registry, "get_model_version_download_uri", download_uri)
    (outcome,) = _listed(registry, sandbox).run(["m"])
    assert (outcome.status, outcome.target) == (Status.ALREADY_MIGRATED, "m-airlock/1")


def test_a_listing_bounds_a_twins_files_before_any_download(tmp_path: Path,
                                                          key: SigningKey) -> None:
    """A folder whose model file the store lists beyond the cap is refused unread."""
    from airlock_client._errors import SafeLoadError
    from airlock_client._twin import verified_output

    asked: list[str] = []

    def download(uri: str, dest: Path) -> Path:
        asked.append(uri)
        raise AssertionError("nothing should be downloaded")

    for listed, reason in (({"model.onnx": 10**12, "model.onnx.provenance.json": 10},
                            "TOO_LARGE"),
                           ({"model.onnx": 10, "model.onnx.provenance.json": 10,
                             "loader.py": 10}, "UNEXPECTED_FILE"),
                           ({"model.onnx": -1, "model.onnx.provenance.json": 10},
                            "ARTIFACT_UNSAFE"),
                           ({"model.onnx.provenance.json": 10}, "ARTIFACT_MISSING")):
        with pytest.raises(SafeLoadError) as info:
            verified_output(download, "fake-artifacts:/r/model", "onnx",
                            key.public_pem.encode(), "the version",
                            listing=lambda uri, found=listed: found)
        assert info.value.reason == reason, listed
    assert asked == []


def test_a_model_whose_name_cannot_be_signed_is_refused_and_the_walk_goes_on(
        key: SigningKey) -> None:
    """A registered model's name is anyone's to choose: one that escapes past the 1024
    characters a subject may have stopped every run (as REGISTRY_UNAVAILABLE) before the
    models after it; now its versions are refused with the reason, and the rest migrate."""
    registry = FakeRegistry()
    long_name = "a" + "\U000E0001" * 110  # each escapes to 10 characters
    registry.add_model(long_name, versions=1)
    registry.add_model("zgood", versions=1)
    sandbox = FakeSandbox(key)
    outcomes = _migration(registry, sandbox).run(None)
    by_model = {o.model: o for o in outcomes}
    assert by_model[long_name].status == Status.REJECTED
    assert by_model[long_name].reason == "SUBJECT_TOO_LONG"
    assert by_model["zgood"].status == Status.CONVERTED


def test_a_source_mark_writes_its_status_last_and_a_failure_forgets_the_twin(
        key: SigningKey) -> None:
    """Killed between two tag writes, a run must not leave a new status without its reason
    (a transient failure would then count as final); and a version whose twin no longer
    verifies and whose conversion then fails must not keep naming that twin."""
    from airlock_client._migrate_register import Registrar

    registry = FakeRegistry()
    registry.add_model("m", versions=1)
    written: list[str] = []
    real = registry.set_model_version_tag

    def noting(name: str, version: str | None = None, key: str = "", value: Any = "") -> None:
        written.append(key)
        real(name, version, key, value)

    registry.set_model_version_tag = noting  # type: ignore[method-assign]
    registrar = Registrar(registry, "airlock-migrations")
    registrar.mark_source("m", "1", Status.CONVERTED, migrated_to="m-airlock/1")
    assert written[-1] == tags.STATUS
    written.clear()
    registrar.mark_source("m", "1", Status.FAILED, reason="SANDBOX_TIMEOUT", message="slow")
    assert written == [tags.REASON, tags.MESSAGE, tags.STATUS]
    assert tags.MIGRATED_TO not in registry.version("m", 1).tags

"""``airlock migrate --jobs N`` against the fake registry: N versions in flight (never more),
the same outcomes, tags, twins and aliases as one at a time, a failure that stops nothing, an
abort or an interrupt that leaves no version half done, and a re-run that converts nothing
twice. Real threads; conversions are held at a gate instead of timed."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.security.keys import SigningKey, create_key
from airlock_client import _lineage as tags
from airlock_client import _migrate_cli, cli
from airlock_client._batch_jobs import SHARDS_PROFILE
from airlock_client._errors import AccessDenied, ServiceUnavailable
from airlock_client._types import ConversionResult, PoolStatus
from airlock_client.migrate import (
    MAX_DEFAULT_JOBS,
    Migration,
    MigrationAborted,
    Options,
    Outcome,
    Status,
    default_jobs,
)
from tests.unit.fake_registry import FakeRegistry
from tests.unit.migrate_helpers import FakeSandbox, failed, rejected

#: How long a held conversion waits for the others before the test gives up on it.
DEADLINE = 30.0
#: source version -> what its conversion does; unlisted versions convert to ONNX
PLAN: dict[tuple[str, str], Any] = {
    ("churn", "3"): rejected(), ("churn", "4"): failed(),
    ("encoder", "1"): "safetensors", ("encoder", "2"): "safetensors",
}


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return create_key(tmp_path / "state" / "key.pem")


def _registry() -> FakeRegistry:
    registry = FakeRegistry()
    registry.add_model("fraud", versions=5)
    registry.add_model("churn", versions=4)
    registry.add_model("encoder", versions=3)
    return registry


class Gate:
    """A ``convert`` that counts the conversions in flight and holds each until ``width`` of
    them have been in flight together (so a run is shown to reach that width), and holds a
    version listed in ``after`` until the conversion of the version it names has ended (so
    conversions end out of the walk's order). ``done`` counts successful conversions per
    subject, ``ended`` every attempt."""

    def __init__(self, convert: Callable[[Path, Path, str], ConversionResult], width: int,
                 after: dict[str, str] | None = None) -> None:
        self.convert = convert
        self.width = width
        self.after = after or {}
        self.now = self.peak = 0
        self.done: Counter[str] = Counter()
        self.ended: Counter[str] = Counter()
        self.cond = threading.Condition()

    def __call__(self, model_dir: Path, output: Path, subject: str) -> ConversionResult:
        with self.cond:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.cond.notify_all()
            wide = self.cond.wait_for(lambda: self.peak >= self.width, timeout=DEADLINE)
            first = self.after.get(subject)
            ordered = first is None or self.cond.wait_for(lambda: self.ended[first] > 0,
                                                          timeout=DEADLINE)
        assert wide, f"never {self.width} conversions in flight (at most {self.peak})"
        assert ordered, f"{subject} waited for {first} in vain"
        ok = False
        try:
            result = self.convert(model_dir, output, subject)
            ok = True
        finally:
            with self.cond:
                self.now -= 1
                self.ended[subject] += 1
                self.done[subject] += ok
                self.cond.notify_all()
        return result


def _run(registry: FakeRegistry, sandbox: FakeSandbox, convert: Any = None,
         progress: Callable[[str], None] | None = None, **options: Any) -> list[Outcome]:
    return Migration(registry, fetch=sandbox.fetch, convert=convert or sandbox.convert,
                     download=registry.download, public_key=sandbox.key.public_pem.encode(),
                     options=Options(**options), progress=progress).run(None)


def _same(outcome: Outcome) -> tuple[Any, ...]:
    """An outcome without what depends on timing (the twin's number, the seconds)."""
    return (outcome.model, outcome.version, outcome.status, outcome.format,
            outcome.assurance, outcome.source_sha256, outcome.output_sha256, outcome.reason,
            outcome.message)


def _lineage(registry: FakeRegistry) -> dict[tuple[str, str], Any]:
    """Every source version's tags, with ``migrated_to`` replaced by what the twin it names
    says of itself (its source and output), plus each target's aliases likewise."""
    state: dict[tuple[str, str], Any] = {}
    for name, versions in registry.versions.items():
        if name.endswith("-airlock"):
            for alias, number in registry.models[name].aliases.items():
                twin = registry.version(name, number).tags
                state[(name, f"@{alias}")] = (twin[tags.SOURCE_MODEL], twin[tags.SOURCE_VERSION])
            continue
        for mv in versions:
            found = dict(mv.tags)
            if tags.MIGRATED_TO in found:
                target, _, number = found.pop(tags.MIGRATED_TO).rpartition("/")
                twin = registry.version(target, number).tags
                assert (twin[tags.SOURCE_MODEL], twin[tags.SOURCE_VERSION]) == (name, mv.version)
                found["twin"] = {k: v for k, v in twin.items() if k != tags.JOB_ID}
            state[(name, mv.version)] = found
    return state


def _tag_writes(registry: FakeRegistry) -> Counter[tuple[Any, ...]]:
    return Counter(w[1:] for w in registry.writes if w[0] == "set_model_version_tag")


def test_four_at_a_time_reach_four_in_flight_and_end_as_one_at_a_time(
        key: SigningKey) -> None:
    one, four = _registry(), _registry()
    serial = FakeSandbox(key, plan=dict(PLAN))
    expected = _run(one, serial, alias="champion")

    sandbox = FakeSandbox(key, plan=dict(PLAN))
    # fraud v1 ends after fraud v2 and v3: out of the walk's order
    gate = Gate(sandbox.convert, width=4, after={"models:/fraud/1": "models:/fraud/3",
                                                 "models:/fraud/3": "models:/fraud/2"})
    lines: list[str] = []
    got = _run(four, sandbox, gate, lines.append, alias="champion", jobs=4)

    assert gate.peak == 4  # four in flight, never more
    assert [_same(o) for o in got] == [_same(o) for o in expected]  # the walk's order
    assert [o.status for o in got].count(Status.CONVERTED) == 10
    assert _lineage(four) == _lineage(one)  # tags, twins and aliases
    assert _tag_writes(four) == _tag_writes(one)
    assert max(_tag_writes(four).values()) == 1  # each tag written once
    assert sorted(sandbox.converted) == sorted(serial.converted)  # each version once
    assert len(set(sandbox.converted)) == len(sandbox.converted) == 12
    assert [line for line in lines if "done" in line][-1].startswith("12/12 done (2 failed), ")
    assert lines[0] == "12 version(s) in 3 registered model(s), 4 at a time"


def test_a_failed_version_stops_nothing_with_four_at_a_time(key: SigningKey) -> None:
    registry = _registry()
    sandbox = FakeSandbox(key, plan={**PLAN, ("fraud", "1"): rejected("NO_HANDLER", "nope")})
    outcomes = _run(registry, sandbox, jobs=4)
    problems = {(o.model, o.version): o.reason for o in outcomes if o.status != "converted"}
    assert problems == {("fraud", "1"): "NO_HANDLER", ("churn", "3"): "POLICY_VIOLATION",
                        ("churn", "4"): "SANDBOX_TIMEOUT"}
    assert registry.version("fraud", 1).tags[tags.REASON] == "NO_HANDLER"


def test_an_abort_lets_the_versions_in_flight_finish_and_a_rerun_converts_the_rest_once(
        key: SigningKey) -> None:
    registry = _registry()
    sandbox = FakeSandbox(key, plan={**PLAN, ("fraud", "4"): ServiceUnavailable("gone")})
    # fraud v1-v3 are in flight beside v4 and convert only once v4 has failed
    gate = Gate(sandbox.convert, width=4, after={f"models:/fraud/{v}": "models:/fraud/4"
                                                 for v in (1, 2, 3)})
    with pytest.raises(MigrationAborted) as info:
        _run(registry, sandbox, gate, jobs=4)
    assert info.value.reason == "BROKER_UNAVAILABLE"
    first = [(o.model, o.version, o.status) for o in info.value.outcomes]
    assert first[:3] == [("fraud", v, Status.CONVERTED) for v in ("1", "2", "3")]
    assert all(status == Status.CONVERTED for _, _, status in first)
    assert tags.STATUS not in registry.version("fraud", 4).tags  # not blamed on the artifact
    _assert_whole(registry)

    sandbox.plan.pop(("fraud", "4"))
    again = Gate(sandbox.convert, width=4)
    outcomes = _run(registry, sandbox, again, jobs=4)
    assert [o.status for o in outcomes[:3]] == [Status.ALREADY_MIGRATED] * 3
    assert sum(gate.done.values()) + sum(again.done.values()) == 12 - 2  # churn v3, v4 fail
    assert not +gate.done & +again.done  # nothing converted twice
    assert max(_tag_writes(registry).values()) == 1


def test_an_interrupt_leaves_no_version_half_done_and_a_rerun_converts_the_rest_once(
        key: SigningKey) -> None:
    registry = _registry()
    sandbox = FakeSandbox(key, plan=dict(PLAN))
    gate = Gate(sandbox.convert, width=4)
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        if threading.current_thread() is threading.main_thread() and "1/12 done" in line:
            raise KeyboardInterrupt  # Ctrl-C as the first version ends, three in flight

    with pytest.raises(KeyboardInterrupt):
        _run(registry, sandbox, gate, progress, jobs=4)
    assert sum(gate.done.values()) == 4  # the three in flight were let finish
    assert any(line.startswith("interrupted: ") for line in lines)
    _assert_whole(registry)

    again = Gate(sandbox.convert, width=4)
    outcomes = _run(registry, sandbox, again, jobs=4)
    assert [o.status for o in outcomes].count(Status.ALREADY_MIGRATED) == 4
    assert sum(again.done.values()) == 12 - 4 - 2  # churn v3, v4 fail
    assert not +gate.done & +again.done
    assert max(_tag_writes(registry).values()) == 1
    assert len(registry.versions["fraud-airlock"]) == 5


def _assert_whole(registry: FakeRegistry) -> None:
    """Every version is untouched or done: tagged and, when converted, with a finished twin
    that names it; no run was left open or without its version."""
    twins = {(mv.tags[tags.SOURCE_MODEL], mv.tags[tags.SOURCE_VERSION]): mv
             for name, versions in registry.versions.items() if name.endswith("-airlock")
             for mv in versions}
    for name, versions in registry.versions.items():
        if name.endswith("-airlock"):
            continue
        for mv in versions:
            status = mv.tags.get(tags.STATUS)
            assert (status == "converted") == ((name, mv.version) in twins), (name, mv)
            if status == "converted":
                twin = twins[(name, mv.version)]
                assert mv.tags[tags.MIGRATED_TO] == f"{twin.name}/{twin.version}"
    assert {r["status"] for r in registry.runs.values()} <= {"FINISHED"}
    assert len(registry.runs) == len(twins)


# -- the CLI -----------------------------------------------------------------------------------


def _pool(profile: str, warm: int, starting: int = 0, **kw: Any) -> PoolStatus:
    return PoolStatus(profile=profile, warm=warm, busy=1, starting=starting, failed_starts=0,
                      served_warm=0, served_cold=0, oldest_warm_seconds=0.0, image_id="",
                      runtime="runc", draining=kw.get("draining", False),
                      unavailable=kw.get("unavailable", ""))


@pytest.mark.parametrize(("pools", "jobs"), [
    ([], 1),
    ([_pool("sklearn", 0)], 1),
    ([_pool("sklearn", 2, 1), _pool("torch", 3), _pool("light", 2)], 3),
    ([_pool("sklearn", 9)], MAX_DEFAULT_JOBS),
    ([_pool("sklearn", 3, draining=True)], 1),
    ([_pool("sklearn", 3, unavailable="engine down")], 1),
])
def test_the_default_jobs_are_the_warm_sklearn_sandboxes(pools: list[PoolStatus],
                                                         jobs: int) -> None:
    assert default_jobs(pools) == jobs  # a broker that does not say what it runs at once


@pytest.mark.parametrize(("pools", "runs", "jobs"), [
    ([_pool("sklearn", 1)], 2, 2),  # a fresh broker: one warm, two run slots
    ([_pool("sklearn", 4)], 2, 2),  # more warm than run slots: the rest would queue
    ([_pool("sklearn", 1)], 16, MAX_DEFAULT_JOBS),
    ([_pool("sklearn", 3, draining=True)], 2, 1),
])
def test_the_default_jobs_are_what_the_broker_runs_at_once(pools: list[PoolStatus], runs: int,
                                                           jobs: int) -> None:
    assert default_jobs(pools, runs) == jobs


def test_a_directorys_shards_count_the_torch_sandboxes() -> None:
    """``convert DIR`` asks for its shards' pool: a drained sklearn pool does not hold it to
    one shard at a time, a drained torch pool does."""
    pools = [_pool("sklearn", 3, draining=True), _pool("torch", 2)]
    assert default_jobs(pools, 2) == 1
    assert default_jobs(pools, 2, SHARDS_PROFILE) == 2
    assert default_jobs([_pool("sklearn", 3), _pool("torch", 2, draining=True)], 2,
                        SHARDS_PROFILE) == 1


def _cli(monkeypatch: pytest.MonkeyPatch, key: SigningKey, registry: FakeRegistry,
         sandbox: FakeSandbox, pools: Any, *argv: str) -> int:
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    pub = key.path.parent / "airlock.pub.pem"
    pub.write_text(key.public_pem)
    monkeypatch.setenv("AIRLOCK_PUBLIC_KEY", str(pub))
    monkeypatch.setattr(_migrate_cli, "mlflow_download", lambda uri, _: registry.download)
    monkeypatch.setattr(_migrate_cli, "mlflow_listing", lambda uri, _: registry.listing)
    monkeypatch.setattr(_migrate_cli, "open_registry", lambda *a: registry)
    monkeypatch.setattr(_migrate_cli, "_fetch", lambda uri, _: sandbox.fetch)

    def status() -> list[PoolStatus]:
        if isinstance(pools, Exception):
            raise pools
        return list(pools)

    monkeypatch.setattr(_migrate_cli, "_converter", lambda *a: _migrate_cli.Broker(
        sandbox.convert, lambda: None, status))
    args = cli.build_parser().parse_args(["migrate", "--tracking-uri", "http://fake", *argv])
    return _migrate_cli.run_migrate(args)


def test_cli_jobs_default_json_and_whole_progress_lines(
        monkeypatch: pytest.MonkeyPatch, key: SigningKey,
        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    registry = _registry()
    sandbox = FakeSandbox(key, plan=dict(PLAN))
    code = _cli(monkeypatch, key, registry, sandbox, [_pool("sklearn", 2, 1)], "--all",
                "--json")
    assert code == _migrate_cli.EXIT_FAILED  # churn v3 and v4
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["jobs"] == 3 and doc["versions_per_minute"] > 0
    assert [(v["model"], v["version"]) for v in doc["versions"]] == [
        (m, str(v)) for m, n in (("fraud", 5), ("churn", 4), ("encoder", 3))
        for v in range(1, n + 1)]
    lines = [line for line in captured.err.splitlines()
             if not line.startswith("🏃 View run")]  # the fake registry prints as MLflow does
    assert all(line.startswith("airlock migrate: ") for line in lines), lines
    assert "airlock migrate: --jobs not given: 3, the broker's warm sklearn sandboxes " \
           "(ready or starting)" in lines
    done = [line for line in lines if " done" in line and "/min" in line]
    assert len(done) == 12 and done[-1].startswith("airlock migrate: 12/12 done (2 failed), ")


def test_cli_jobs_fall_back_to_a_default_brokers_and_refuse_nonsense(
        monkeypatch: pytest.MonkeyPatch, key: SigningKey,
        capsys: pytest.CaptureFixture[str]) -> None:
    registry = _registry()
    sandbox = FakeSandbox(key, plan=dict(PLAN))
    denied = AccessDenied("PERMISSION_DENIED", "not an admin", kind="denied",
                          code="PERMISSION_DENIED")
    assert _cli(monkeypatch, key, registry, sandbox, denied, "--model", "fraud") == 0
    assert ("--jobs not given and the broker's pool status cannot be read "
            "(PERMISSION_DENIED; it needs the observe or admin role): 2 versions at a time") in \
        capsys.readouterr().err
    for bad in ("0", "65"):
        assert _cli(monkeypatch, key, registry, sandbox, [], "--all", "--jobs", bad) == 2
        assert "--jobs: jobs must be between 1 and 64" in capsys.readouterr().err
    gone = ServiceUnavailable("no broker")
    assert _cli(monkeypatch, key, registry, sandbox, gone, "--model", "fraud") == 0
    assert ("pool status cannot be read (UNAVAILABLE): 2 versions at a time, what a default "
            "broker runs at once (--jobs N to choose)") in capsys.readouterr().err
    # an explicit --jobs never asks the broker; a dry run does not either
    broken = ServiceUnavailable("no broker")
    assert _cli(monkeypatch, key, registry, sandbox, broken, "--all", "--jobs", "2",
                "--dry-run") == 0
    assert "pool status" not in capsys.readouterr().err


def test_rate_and_time_left_count_conversions_not_skipped_versions(key: SigningKey) -> None:
    """The review's "19/30 done, 1974.7/min, about 0s left" with 11 conversions ahead: the
    versions already migrated took no conversion and must not make the rest look done."""
    registry = FakeRegistry()
    registry.add_model("a", versions=3)
    sandbox = FakeSandbox(key)
    _run(registry, sandbox)
    registry.add_model("b", versions=2)
    lines: list[str] = []
    _run(registry, sandbox, progress=lines.append)
    done = [line for line in lines if " done" in line and "/min" in line]
    assert done[2] == "3/5 done (3 skipped), 0.0/min", done  # no conversion yet: no ETA
    assert done[3].startswith("4/5 done (3 skipped), ") and ", about " in done[3]


def test_a_directory_versions_files_take_the_lanes_the_other_versions_leave(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--jobs 3``: a transformers version's files are converted three at a time, not one
    by one, and with whole versions converting beside them the run never has more than
    three conversions in flight."""
    width = 3
    lock = threading.Lock()
    in_flight = [0, 0]  # now, peak
    everyone_in = threading.Event()  # never set unless three run at once

    class Broker:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def convert(self, artifact: Any, output: Any, **options: Any) -> str:
            with lock:
                in_flight[0] += 1
                in_flight[1] = max(in_flight)
                if in_flight[0] == width:
                    everyone_in.set()
            try:
                everyone_in.wait(timeout=30)  # the first ones wait for the others
                return str(options["subject"])
            finally:
                with lock:
                    in_flight[0] -= 1

        def close(self) -> None:
            pass

        pool_status = max_concurrent_jobs = close

    files_jobs: list[int] = []

    def convert_directory(client: Any, model_dir: Path, output: Path, *, jobs: int,
                          subject: str, **options: Any) -> list[str]:
        files_jobs.append(jobs)
        with ThreadPoolExecutor(8) as pool:  # more threads than lanes: the lanes bound them
            return list(pool.map(lambda i: client.convert(model_dir, output,
                                                          subject=f"{subject}/f{i}"),
                                 range(8)))

    import airlock_client.model_dir

    monkeypatch.setattr(_migrate_cli, "Client", Broker)
    monkeypatch.setattr(airlock_client.model_dir, "convert_directory", convert_directory)
    args = cli.build_parser().parse_args(["migrate", "--all", "--tracking-uri", "http://x",
                                          "--server", "unix:/nowhere", "--jobs", str(width)])
    broker = _migrate_cli._converter(args, None)
    broker.lanes.size(width)
    with ThreadPoolExecutor(3) as versions:
        directory = versions.submit(broker.convert_directory, Path("lm"), Path("out"),
                                    "models:/lm/1")
        wholes = [versions.submit(broker.convert, Path(f"m{i}"), Path("o"), f"models:/m/{i}")
                  for i in range(2)]
        assert len(directory.result(timeout=60)) == 8  # type: ignore[arg-type]
        assert [w.result(timeout=60) for w in wholes] == ["models:/m/0", "models:/m/1"]
    assert files_jobs == [width]
    assert everyone_in.is_set() and in_flight == [0, width]


def test_a_directory_versions_files_waiting_for_a_lane_are_not_converted_after_a_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: a transformers version's files wait for the run's lanes inside their
    conversion; once one failed (which fails the version), the others still went through
    the broker when a lane came free, many-GiB shards maybe, only to be thrown away."""
    from airlock_client import ConversionError
    from airlock_client._errors import FileSkipped

    files = 4
    asked: list[str] = []
    entered = threading.Semaphore(0)

    class Broker:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def convert(self, artifact: Any, output: Any, **options: Any) -> str:
            asked.append(str(options["subject"]))
            for _ in range(files if len(asked) == 1 else 0):  # every file under way: the
                assert entered.acquire(timeout=30)  # others wait for the lane this one holds
            raise ConversionError("POLICY_VIOLATION", "the loader would run code",
                                  kind="rejected", code="FAILED_PRECONDITION")

        def close(self) -> None:
            pass

        pool_status = max_concurrent_jobs = close

    def convert_directory(client: Any, model_dir: Path, output: Path, *, jobs: int,
                          subject: str, **options: Any) -> list[Exception]:
        def one(i: int) -> Exception:
            entered.release()
            try:
                client.convert(model_dir, output, subject=f"{subject}/f{i}")
            except Exception as exc:  # what each file ended with
                return exc
            raise AssertionError("no file converts here")

        with ThreadPoolExecutor(files) as pool:
            return list(pool.map(one, range(files)))

    import airlock_client.model_dir

    monkeypatch.setattr(_migrate_cli, "Client", Broker)
    monkeypatch.setattr(airlock_client.model_dir, "convert_directory", convert_directory)
    args = cli.build_parser().parse_args(["migrate", "--all", "--tracking-uri", "http://x",
                                          "--server", "unix:/nowhere", "--jobs", "1"])
    broker = _migrate_cli._converter(args, None)
    broker.lanes.size(1)
    ended = broker.convert_directory(Path("lm"), Path("out"), "models:/lm/1")
    assert len(asked) == 1, asked
    assert sorted(type(e).__name__ for e in ended) == ["ConversionError"] + ["FileSkipped"] * 3
    assert all("another file of its version failed first" in str(e)
               for e in ended if isinstance(e, FileSkipped))
    # A whole version is never skipped: its client is the run's, not a directory's.
    with pytest.raises(ConversionError):
        broker.convert(Path("m"), Path("o"), "models:/m/1")

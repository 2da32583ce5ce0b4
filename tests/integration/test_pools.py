"""Warm single-use sandbox pools against the real engine and image (issue 3, "Tests").

Each test is named after the property it proves. Most share one dedicated broker (every profile
one warm container, fast sweep); the others start their own. Every check looks only at the
containers of the brokers started here (``airlock.broker`` label): other test sessions may use
the same Docker engine at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file

from airlock_client import Client, ConversionError, ConversionResult, ServiceUnavailable
from tests.conftest import IMAGE, run_cli, spool_dirs
from tests.fixtures import models
from tests.integration import pool_helpers as ph
from tests.integration.pool_helpers import PoolBroker

pytestmark = pytest.mark.integration

ALL = ("sklearn", "torch", "light")
#: Bound on how long a pool may take to get back to min_warm on this loaded 2-core machine.
REFILL_SECONDS = 45.0


@pytest.fixture(scope="module")
def image(docker_client: Any) -> Iterator[str]:
    """A private tag of the sandbox image for this module's brokers: a ``make image`` run
    meanwhile (by another session) retags IMAGE, and the brokers would rightly roll their pools
    onto the new one in the middle of a test."""
    repo = f"airlock-pooltest-{os.urandom(4).hex()}"
    docker_client.api.tag(IMAGE, repo, "latest")
    yield f"{repo}:latest"
    with contextlib.suppress(Exception):  # only an untag, or the image if nothing else uses it
        docker_client.api.remove_image(f"{repo}:latest")


@pytest.fixture(scope="module")
def pool_broker(docker_client: Any, image: str, tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[PoolBroker]:
    """Every profile keeps one warm container; the sweep runs every 2 s."""
    tmp = tmp_path_factory.mktemp("pool-broker")
    config = ph.write_config(tmp, {"min_warm": 1, "max_warm": 2, "max_starting": 2,
                                   "sweep_seconds": 2}, sandbox={"image": image})
    broker = ph.launch(tmp, config)
    try:
        ph.wait_settled(broker, 1, ALL)
        yield broker
    finally:
        ph.stop_cleanly(broker, docker_client)


@pytest.fixture
def ready(pool_broker: PoolBroker) -> PoolBroker:
    """The shared broker, resumed, with every pool back at one warm container."""
    pool_broker.client.resume_pools()
    ph.wait_settled(pool_broker, 1, ALL, timeout=REFILL_SECONDS)
    return pool_broker


def convert(broker: PoolBroker, artifact: Path, output: Path, **kwargs: Any,
            ) -> ConversionResult | ConversionError:
    """The result, or the ConversionError the broker answered with."""
    try:
        return broker.client.convert(artifact, output, **kwargs)
    except ConversionError as exc:
        return exc


# -- 5 (first, while no other broker of this module runs) -------------------------------------


def test_orphans_left_by_a_killed_broker_are_reaped_on_the_next_start(
        docker_client: Any, image: str, tmp_path: Path) -> None:
    profiles = ("sklearn", "light")
    pools = {"min_warm": 1, "max_starting": 2, "profiles": profiles}
    first = ph.launch(tmp_path / "first", ph.write_config(
        tmp_path / "first", {**pools, "sweep_seconds": 2}, sandbox={"image": image}))
    second: PoolBroker | None = None
    try:
        ph.wait_settled(first, 1, profiles)
        orphans = {c.id: c.labels[ph.LABEL_SLOT]
                   for c in ph.containers_of(docker_client, first.identity)}
        assert len(orphans) == len(profiles), orphans

        first.proc.process.send_signal(signal.SIGKILL)
        first.proc.process.wait(30)  # as its supervisor would: no zombie left to look alive
        first.client.close()
        assert {c.id for c in ph.containers_of(docker_client, first.identity)} == set(orphans), \
            "the killed broker's warm containers should outlive it"
        slots = spool_dirs(first.spool, "slots")
        assert {p.name for d in slots for p in d.iterdir()} >= set(orphans.values())
        assert ph.slot_mounts(first.spool), "the killed broker's output tmpfs mounts should remain"

        # Same spool, and a sweep too slow to matter. (This test runs first so that the shared
        # broker's 2 s sweep cannot reap the orphans; another session's broker still might.)
        second = ph.launch(tmp_path / "second",
                           ph.write_config(tmp_path / "second", {**pools, "sweep_seconds": 3600},
                                           sandbox={"image": image}),
                           spool=first.spool)
        survivors = [c[:12] for c in orphans if ph.exists(docker_client, c)]
        assert survivors == [], f"orphans still there once the new broker serves:\n" \
                                f"{second.log_tail()}"
        stale = set(orphans.values()) & {p.name for d in slots if d.is_dir()
                                         for p in d.iterdir()}
        assert stale == set(), f"stale slot directories left: {stale}"
        old_mounts = [m for m in ph.slot_mounts(first.spool)
                      if any(slot in m for slot in orphans.values())]
        assert old_mounts == [], f"stale output tmpfs mounts left: {old_mounts}"
        # The new broker carries on with pools of its own.
        ph.wait_settled(second, 1, profiles)
        assert set(orphans).isdisjoint(ph.idle_warm_ids(docker_client, second))
    finally:
        first.stop()
        if second is not None:
            ph.stop_cleanly(second, docker_client)



# -- 1 -----------------------------------------------------------------------------------------


def test_a_job_never_gets_a_container_that_served_another_job(
        ready: PoolBroker, docker_client: Any, tmp_path: Path) -> None:
    token = os.urandom(8).hex()
    writer = ph.payload_pickle(tmp_path / "writer.pkl", ph.marker_writer_source(token))
    seeker = ph.payload_pickle(tmp_path / "seeker.pkl", ph.marker_seeker_source())

    # Job 1 takes the one warm sklearn container and leaves markers wherever it can write.
    before = ready.status()["sklearn"]
    (first_container,) = ph.idle_warm_ids(docker_client, ready, "sklearn")
    first = convert(ready, writer, tmp_path / "first.safetensors")
    assert isinstance(first, ConversionError), f"the marker job should fail: {first}"
    assert first.reason == "CONVERSION_FAILED"
    exited = re.search(r"exited with code (\d+)", first.message)
    assert exited, f"the marker payload did not run to its end: {first.message}"
    first_exit = int(exited.group(1))
    marked, others = ph.decode_marker_exit(first_exit)
    assert marked == set(ph.KEY_PLACES), f"markers reached only {marked}: {first.message}"
    after_first = ready.status()["sklearn"]
    assert after_first.served_warm == before.served_warm + 1, "job 1 was not served warm"
    assert after_first.served_cold == before.served_cold
    assert ph.removed(docker_client, first_container), "job 1's container survived its job"

    # Job 2 takes the next warm container (started while job 1 ran) and looks for any marker.
    ph.wait_settled(ready, 1, ("sklearn",), timeout=REFILL_SECONDS)
    (second_container,) = ph.idle_warm_ids(docker_client, ready, "sklearn")
    assert second_container != first_container
    second = convert(ready, seeker, tmp_path / "second.safetensors")
    if isinstance(second, ConversionResult):
        found = load_file(str(second.output))
        pytest.fail(f"job 2 saw job 1's markers (tensors {sorted(found)}): "
                    f"{second.report}")
    assert second.reason == "CONVERSION_FAILED"
    assert f"exited with code {ph.EXIT_NO_MARKER}" in second.message, (
        f"the seeker did not run to its verdict (43 = its self-test failed): {second.message}")
    after_second = ready.status()["sklearn"]
    assert after_second.served_warm == before.served_warm + 2, "job 2 was not served warm"
    assert after_second.served_cold == before.served_cold
    assert ph.removed(docker_client, second_container)

    # Docker's own record: each container started once, died with its one job's exit code.
    life = ph.container_events(docker_client, ready.identity, ready.started_at)
    assert life.get(first_container, [])[-3:] == ["start", f"die:{first_exit}", "destroy"], \
        life.get(first_container)
    assert life.get(second_container, [])[-3:] == ["start", f"die:{ph.EXIT_NO_MARKER}",
                                                   "destroy"], life.get(second_container)
    for container in (first_container, second_container):
        assert life[container].count("start") == 1, (container[:12], life[container])
    print(f"job 1 left markers in {sorted(marked)} and {others} other place(s)")


# -- 2 -----------------------------------------------------------------------------------------


def test_the_pool_refills_to_min_warm_after_jobs(
        ready: PoolBroker, docker_client: Any, tmp_path: Path) -> None:
    jobs = 4
    artifact = ph.payload_pickle(tmp_path / "quick.pkl", ph.sleep_then_succeed_source(0.0))
    before = ready.status()["sklearn"]
    warm_before = ph.idle_warm_ids(docker_client, ready)
    results: list[ConversionResult | ConversionError] = []

    def worker(n: int) -> None:
        for i in range(n, jobs, 2):
            results.append(convert(ready, artifact, tmp_path / f"out{i}.safetensors"))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert [r for r in results if not isinstance(r, ConversionResult)] == []
    assert len(results) == jobs

    started = time.monotonic()
    status = ph.wait_settled(ready, 1, ALL, timeout=REFILL_SECONDS)
    refill = time.monotonic() - started
    sk = status["sklearn"]
    assert sk.served_warm + sk.served_cold == before.served_warm + before.served_cold + jobs
    assert sk.served_warm > before.served_warm, "no job was served warm"
    # Docker agrees: exactly min_warm idle containers per profile, none of them used before.
    warm_after = ph.idle_warm_ids(docker_client, ready)
    # The last job's container is removed in the background right after its RPC; the pool may
    # already be full by then (max_warm 2), so give the removal its moment (bounded).
    ph.wait_for(lambda: ph.count_by_profile(docker_client, ready.identity)
                == dict.fromkeys(ALL, 1), 60, "one container per profile",
                lambda: str(ph.count_by_profile(docker_client, ready.identity)))
    reused = ph.idle_warm_ids(docker_client, ready, "sklearn") & warm_before
    assert reused == set(), "the sklearn warm container is one that existed before the jobs"
    assert len(warm_after) == len(ALL)
    print(f"refilled {refill:.1f} s after the last job")


# -- 3 -----------------------------------------------------------------------------------------


def test_restart_replaces_every_warm_container_while_a_job_in_flight_completes(
        ready: PoolBroker, docker_client: Any, tmp_path: Path) -> None:
    artifact = ph.payload_pickle(tmp_path / "slow.pkl",
                                 ph.wait_then_succeed_source(150.0, tensor="survived"))
    outcome: list[ConversionResult | ConversionError] = []
    job = threading.Thread(target=lambda: outcome.append(
        convert(ready, artifact, tmp_path / "slow.safetensors", job_timeout=180)))
    job.start()
    try:
        # The job holds one container; its pool has started a replacement meanwhile.
        # The spare's start is deferred for defer_max_seconds (2 s) of a job this long.
        ph.wait_for(lambda: (s := ready.status()["sklearn"]).busy == 1 and s.warm == 1
                    and s.starting == 0, 60, "the slow job to run with a warm spare",
                    lambda: str(ready.status()))
        in_flight = [c for c in ph.containers_of(docker_client, ready.identity)
                     if not ph.is_idle(c, ready.spool)]
        assert len(in_flight) == 1, in_flight
        warm_before = ph.idle_warm_ids(docker_client, ready)
        assert len(warm_before) == len(ALL), warm_before

        replaced = ready.client.restart_pools()

        # At least those; on a busy machine a spare may have become warm in between.
        assert replaced >= len(ALL)
        ph.wait_for(lambda: not ph.idle_warm_ids(docker_client, ready) & warm_before, 60,
                    "every warm container of before the restart to be gone",
                    lambda: str(ph.idle_warm_ids(docker_client, ready) & warm_before))
        assert outcome == [], f"the slow job ended before the restart was tested: {outcome}"
        assert ready.status()["sklearn"].busy == 1
        in_flight[0].reload()
        assert in_flight[0].status == "running", "restart touched the job's container"
    finally:
        # The job runs until released: the restart above must find it in flight.
        ph.release_and_join(ready, job, 240)
    (result,) = outcome
    assert isinstance(result, ConversionResult), f"the job in flight failed: {result}"
    assert list(load_file(str(result.output))) == ["survived"]

    ph.wait_settled(ready, 1, ALL, timeout=REFILL_SECONDS)
    warm_after = ph.idle_warm_ids(docker_client, ready)
    assert len(warm_after) == len(ALL)
    assert warm_after.isdisjoint(warm_before), "a warm container survived the restart"
    assert [c[:12] for c in warm_before if ph.exists(docker_client, c)] == []
    assert ph.removed(docker_client, in_flight[0].id), "the job's container was not removed"


def test_restart_of_one_profile_replaces_that_profiles_warm_containers_only(
        ready: PoolBroker, docker_client: Any, tmp_path: Path) -> None:
    began = time.time()
    warm = {p: ph.idle_warm_ids(docker_client, ready, p) for p in ALL}
    artifact = ph.payload_pickle(tmp_path / "job.pkl", ph.sleep_then_succeed_source(3.0))
    outcome: list[ConversionResult | ConversionError] = []
    job = threading.Thread(target=lambda: outcome.append(
        convert(ready, artifact, tmp_path / "job.safetensors")))
    job.start()
    try:
        # The job took the sklearn container; restart "light" while sklearn's replacement is
        # still starting: that start has nothing to do with the restart and must survive it.
        ph.wait_for(lambda: ready.status()["sklearn"].starting == 1, 60,
                    "sklearn's replacement to be starting", interval=0.005)
        assert ready.client.restart_pools("light") == 1
    finally:
        job.join(60)
    assert isinstance(outcome[0], ConversionResult), outcome

    ph.wait_settled(ready, 1, ALL, timeout=REFILL_SECONDS)
    assert ph.idle_warm_ids(docker_client, ready, "torch") == warm["torch"]
    assert ph.idle_warm_ids(docker_client, ready, "light").isdisjoint(warm["light"])
    life = ph.container_events(docker_client, ready.identity, began)
    sklearn_created = {c[:12]: events for c, events in life.items()  # after the job's own
                       if events[0] == "profile=sklearn" and "create" in events
                       and c not in warm["sklearn"]}
    assert len(sklearn_created) == 1, (
        "restarting the light pool destroyed a sklearn container that was starting (exit 137, "
        f"never served a job), so sklearn started another: {sklearn_created}")

    # The same from the command line; an unknown profile is refused.
    done = run_cli("pool", "restart", "--profile", "light", "--json", server=ready.unix_address,
                   timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"action": "restart", "replaced": 1}
    bad = run_cli("pool", "restart", "--profile", "nosuch", server=ready.unix_address, timeout=60)
    assert bad.returncode == 1 and "BAD_REQUEST" in bad.stderr, bad.stdout + bad.stderr
    assert "this broker's pools: " in bad.stderr and "light" in bad.stderr, bad.stderr


# -- 4 -----------------------------------------------------------------------------------------


def test_drain_refuses_new_jobs_unavailable_and_resume_serves_them(
        ready: PoolBroker, docker_client: Any, tmp_path: Path) -> None:
    artifact, _ = models.make_sklearn_pickle(tmp_path)
    before = ready.status()["sklearn"]
    warm_before = ph.idle_warm_ids(docker_client, ready)
    try:
        done = run_cli("pool", "drain", "--json", server=ready.unix_address, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"action": "drain"}
        assert all(s.draining for s in ready.status().values())

        refused = run_cli("convert", str(artifact), "-o", str(tmp_path / "m.onnx"), "--json",
                          server=ready.address, timeout=120)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        doc = json.loads(refused.stdout)
        assert (doc["status"], doc["reason"]) == ("failed", "SANDBOX_UNAVAILABLE"), doc
        assert "drain" in doc["message"], doc
        assert not (tmp_path / "m.onnx").exists()

        with pytest.raises(ServiceUnavailable) as info:
            ready.client.convert(artifact, tmp_path / "m.onnx")
        assert info.value.reason == "SANDBOX_UNAVAILABLE"

        # Refused without spending a sandbox: the warm containers are still there, unused.
        during = ready.status()["sklearn"]
        assert (during.served_warm, during.served_cold) == (before.served_warm,
                                                            before.served_cold)
        assert ph.idle_warm_ids(docker_client, ready) == warm_before
    finally:
        done = run_cli("pool", "resume", "--json", server=ready.unix_address, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not any(s.draining for s in ready.status().values())

    served = run_cli("convert", str(artifact), "-o", str(tmp_path / "m.onnx"), "--json",
                     server=ready.address, timeout=180)
    assert served.returncode == 0, served.stdout + served.stderr
    assert json.loads(served.stdout)["status"] == "ok"
    assert (tmp_path / "m.onnx").stat().st_size > 0
    after = ready.status()["sklearn"]
    assert after.served_warm == before.served_warm + 1, "the resumed pool did not serve warm"


# -- 5, the periodic path --------------------------------------------------------------------


def test_orphans_of_a_killed_broker_are_reaped_by_a_running_brokers_sweep(
        ready: PoolBroker, docker_client: Any, image: str, tmp_path: Path) -> None:
    from airlock_broker.sandboxes.workspace import reap_stale

    doomed = ph.launch(tmp_path, ph.write_config(tmp_path, {"min_warm": 1, "profiles": ("light",)},
                                                 sandbox={"image": image}))
    try:
        ph.wait_settled(doomed, 1, ("light",))
        orphans = {c.id for c in ph.containers_of(docker_client, doomed.identity)}
        assert len(orphans) == 1
        doomed.proc.process.send_signal(signal.SIGKILL)
        doomed.proc.process.wait(30)
        # The shared broker sweeps every 2 s (any other live broker's sweep may win the race).
        ph.wait_for(lambda: not any(ph.exists(docker_client, c) for c in orphans), 60,
                    "a sweep to reap the dead broker's containers", ready.log_tail)
        assert ready.status()["light"].warm == 1, "the sweep touched a live broker's pool"
    finally:
        doomed.stop()
        reap_stale(doomed.spool)  # its output tmpfs mounts: only a broker on that spool would


# -- 6 -----------------------------------------------------------------------------------------


def _status_json(broker: PoolBroker) -> dict[str, dict[str, Any]]:
    done = run_cli("pool", "status", "--json", server=broker.unix_address, timeout=60)
    assert done.returncode == 0, done.stderr
    return {p["profile"]: p for p in json.loads(done.stdout)["pools"]}


def _agreeing_snapshot(broker: PoolBroker, docker_client: Any, busy: int,
                       ) -> tuple[dict[str, dict[str, Any]], dict[str, int]] | None:
    """Status, Docker's counts, status again: returned only if no number moved in between, no
    container is half-started (counted by the broker before Docker may have it) and the
    sklearn pool has ``busy`` jobs."""
    def numbers(status: dict[str, dict[str, Any]]) -> dict[str, tuple[int, ...]]:
        return {k: (p["warm"], p["busy"], p["starting"], p["served_warm"], p["served_cold"])
                for k, p in status.items()}

    first = _status_json(broker)
    counts = ph.count_by_profile(docker_client, broker.identity)
    again = _status_json(broker)
    if numbers(first) != numbers(again) or any(p["starting"] for p in first.values()) \
            or first["sklearn"]["busy"] != busy:
        return None
    return first, counts


def test_the_status_commands_numbers_match_what_docker_reports(
        ready: PoolBroker, docker_client: Any, image: str, tmp_path: Path) -> None:
    image_id = docker_client.api.inspect_image(image)["Id"]

    def check(expect_busy: int) -> None:
        status, counts = ph.wait_for(
            lambda: _agreeing_snapshot(ready, docker_client, expect_busy), 120,
            f"a stable status snapshot with {expect_busy} busy", lambda: str(ready.status()))
        for profile, p in status.items():
            assert p["warm"] + p["starting"] + p["busy"] == counts.get(profile, 0), (
                profile, p, counts)
            assert p["image_id"] == image_id and p["runtime"] == "runc"
            assert p["draining"] is False and p["warm"] == 1
        running = {c.labels[ph.LABEL_PROFILE]
                   for c in ph.containers_of(docker_client, ready.identity, running_only=True)}
        assert running == set(ALL)
        # The age of the oldest warm container, against Docker's start time: a container is
        # warm only once started and ready, and Docker's age is read after the snapshot, so
        # Docker's age is the larger by its start-up plus the time since the snapshot (both
        # seconds, tens on a busy machine) and never the smaller beyond clock rounding.
        for container in ph.containers_of(docker_client, ready.identity):
            if ph.is_idle(container, ready.spool):
                age = ph.seconds_since(container.attrs["State"]["StartedAt"])
                oldest = status[container.labels[ph.LABEL_PROFILE]]["oldest_warm_seconds"]
                assert -1 < age - oldest < 90, (container.short_id, age, oldest)

    check(expect_busy=0)
    artifact = ph.payload_pickle(tmp_path / "slow.pkl", ph.wait_then_succeed_source(150.0))
    outcome: list[ConversionResult | ConversionError] = []
    job = threading.Thread(target=lambda: outcome.append(
        convert(ready, artifact, tmp_path / "slow.safetensors", job_timeout=180)))
    job.start()
    try:
        # The spare's start is deferred for defer_max_seconds (2 s) of a job this long.
        ph.wait_for(lambda: (s := ready.status()["sklearn"]).busy == 1 and s.warm == 1
                    and s.starting == 0, 60, "the job to run with a warm spare")
        check(expect_busy=1)
        human = run_cli("pool", "status", server=ready.unix_address, timeout=60)
        assert human.returncode == 0 and "sklearn" in human.stdout and "runc" in human.stdout
    finally:
        # The job runs until released: the checks above need it busy, however long they take.
        ph.release_and_join(ready, job, 240)
    assert isinstance(outcome[0], ConversionResult), outcome


# -- 7 -----------------------------------------------------------------------------------------


def test_with_pools_off_a_job_takes_the_cold_path_and_no_warm_container_exists(
        docker_client: Any, image: str, tmp_path: Path) -> None:
    config = ph.write_config(tmp_path, {"min_warm": 0, "sweep_seconds": 2},
                             sandbox={"image": image})
    artifact, _ = models.make_sklearn_pickle(tmp_path / "in")
    with ph.running_broker(tmp_path, config, docker_client) as broker:
        with Client(broker.address, retry_attempts=1) as client:
            result = client.convert(artifact, tmp_path / "model.onnx")
        assert result.format == "onnx" and result.output.stat().st_size > 0
        status = broker.status()
        assert status["sklearn"].served_cold == 1 and status["sklearn"].served_warm == 0
        assert all(s.warm == 0 and s.starting == 0 and s.busy == 0 for s in status.values())
        # Proof that a sweep ran after the job (and a replenisher pass after it: each sweep
        # wakes the replenisher): it removes a stray carrying this broker's label.
        stray = docker_client.containers.create(image, labels={
            "airlock.managed": "true", ph.LABEL_BROKER: broker.identity,
            ph.LABEL_SLOT: "no-slot-of-this-broker", ph.LABEL_PROFILE: "stray"})
        assert ph.removed(docker_client, stray.id, timeout=60), "no sweep removed the stray"
        ph.wait_for(lambda: ph.containers_of(docker_client, broker.identity) == [], 30,
                    "the cold job's container to be removed")
        # Docker's record of every container this broker made: the isolation self-test's
        # probe (in the light profile) and the cold job's, both gone; nothing warm.
        life = ph.container_events(docker_client, broker.identity, broker.started_at)
        made = sorted(events[0] for cid, events in life.items() if cid != stray.id
                      and "create" in events)
        assert made == ["profile=light", "profile=sklearn"], life
        assert all("destroy" in events for events in life.values()), life


# -- beyond the list: unhealthy warm containers and a rebuilt image ----------------------------


def _kill(docker_client: Any, container_id: str) -> None:
    docker_client.api.kill(container_id)
    ph.wait_for(lambda: not docker_client.api.inspect_container(container_id)["State"]["Running"],
                60, f"{container_id[:12]} to die")


def test_a_warm_container_that_died_is_replaced_and_counted_by_the_sweep(
        ready: PoolBroker, docker_client: Any) -> None:
    before = ready.status()["light"]
    (victim,) = ph.idle_warm_ids(docker_client, ready, "light")
    _kill(docker_client, victim)

    def replaced() -> set[str]:
        status = ready.status()["light"]
        fresh = ph.idle_warm_ids(docker_client, ready, "light") - {victim}
        return fresh if status.warm == 1 and status.starting == 0 and fresh else set()

    ph.wait_for(replaced, REFILL_SECONDS, "the dead warm container to be replaced",
                lambda: f"{ready.status()['light']}\n{ready.log_tail()}")
    after = ready.status()["light"]
    assert after.failed_starts == before.failed_starts + 1
    assert (after.served_warm, after.served_cold) == (before.served_warm, before.served_cold)
    assert not ph.exists(docker_client, victim), "the dead container was not removed"


def test_a_warm_container_that_died_is_never_handed_to_a_job_and_is_counted(
        docker_client: Any, image: str, tmp_path: Path) -> None:
    # No sweep within the test: only the job's own liveness check can notice the death.
    config = ph.write_config(tmp_path, {"min_warm": 1, "profiles": ("sklearn",),
                                        "sweep_seconds": 3600}, sandbox={"image": image})
    artifact = ph.payload_pickle(tmp_path / "quick.pkl", ph.sleep_then_succeed_source(0.0))
    with ph.running_broker(tmp_path, config, docker_client) as broker:
        ph.wait_settled(broker, 1, ("sklearn",))
        (victim,) = ph.idle_warm_ids(docker_client, broker, "sklearn")
        _kill(docker_client, victim)

        result = convert(broker, artifact, tmp_path / "out.safetensors")

        assert isinstance(result, ConversionResult), f"the job failed: {result}"
        status = broker.status()["sklearn"]
        # The job waited for the replacement started for it (pool_settings
        # wait_for_starting_seconds), never the dead one.
        assert (status.served_warm, status.served_cold) == (1, 0), status
        assert not ph.exists(docker_client, victim), "the dead container was not removed"
        ph.wait_settled(broker, 1, ("sklearn",), timeout=REFILL_SECONDS)
        assert broker.status()["sklearn"].failed_starts == 1, (
            "a warm container found dead by a job was replaced but its failure not counted: "
            f"{broker.status()['sklearn']}")


def test_a_rebuilt_image_rolls_the_pool_onto_it(docker_client: Any, image: str,
                                                tmp_path: Path) -> None:
    import io

    repo = f"airlock-pooltest-{os.urandom(4).hex()}"
    tag = f"{repo}:latest"
    docker_client.api.tag(image, repo, "latest")
    old_id = docker_client.api.inspect_image(tag)["Id"]
    config = ph.write_config(tmp_path, {"min_warm": 1, "profiles": ("light",),
                                        "sweep_seconds": 2}, sandbox={"image": tag})
    artifact, _ = models.make_npy(tmp_path / "in")
    try:
        with ph.running_broker(tmp_path, config, docker_client) as broker:
            status = ph.wait_settled(broker, 1, ("light",))
            assert status["light"].image_id == old_id
            warm_before = ph.idle_warm_ids(docker_client, broker)

            # "make image": the same tag now names a different image.
            new_image, _ = docker_client.images.build(
                fileobj=io.BytesIO(f"FROM {tag}\nLABEL airlock.pooltest={repo}\n".encode()),
                tag=tag, network_mode="none", rm=True, pull=False)
            assert new_image.id != old_id

            def rolled() -> set[str]:
                light = broker.status()["light"]
                fresh = ph.idle_warm_ids(docker_client, broker) - warm_before
                return fresh if light.image_id == new_image.id and light.warm == 1 \
                    and light.starting == 0 and fresh else set()

            (fresh,) = ph.wait_for(rolled, REFILL_SECONDS, "the pool to roll onto the new image",
                                   lambda: f"{broker.status()}\n{broker.log_tail()}")
            assert docker_client.api.inspect_container(fresh)["Image"] == new_image.id
            assert [c[:12] for c in warm_before if ph.exists(docker_client, c)] == []

            result = broker.client.convert(artifact, tmp_path / "out.safetensors")
            assert result.format == "safetensors"
            assert broker.status()["light"].served_warm == 1
    finally:
        docker_client.api.remove_image(tag)


def test_a_rebuilt_image_that_fails_the_self_test_takes_no_new_job(docker_client: Any,
                                                                   image: str,
                                                                   tmp_path: Path) -> None:
    """"make image" made an image with a ``VOLUME`` (every sandbox would get a writable
    anonymous volume): the sweep used to serve it at once. It is self-tested first, as the
    first image was at start-up, and new jobs are refused with the reason."""
    import io

    repo = f"airlock-pooltest-{os.urandom(4).hex()}"
    tag = f"{repo}:latest"
    docker_client.api.tag(image, repo, "latest")
    config = ph.write_config(tmp_path, {"min_warm": 1, "profiles": ("light",),
                                        "sweep_seconds": 2}, sandbox={"image": tag})
    artifact, _ = models.make_npy(tmp_path / "in")
    try:
        with ph.running_broker(tmp_path, config, docker_client) as broker:
            ph.wait_settled(broker, 1, ("light",))
            docker_client.images.build(
                fileobj=io.BytesIO(f"FROM {tag}\nVOLUME /data\n".encode()),
                tag=tag, network_mode="none", rm=True, pull=False)

            def refused() -> str:
                try:
                    broker.client.convert(artifact, tmp_path / "out.safetensors")
                except ServiceUnavailable as exc:
                    return exc.message if "failed the isolation self-test" in exc.message \
                        else ""
                return ""

            # A sweep (2 s), then the new image's self-test: a probe container started on a
            # machine the suite keeps busy, so twice a refill's bound.
            why = ph.wait_for(refused, 2 * REFILL_SECONDS, "new jobs to be refused",
                              lambda: f"{broker.status()}\n{broker.log_tail()}")
            assert "only_job_mounts" in why or "/data" in why, why
    finally:
        docker_client.api.remove_image(tag, force=True)


def test_a_job_cancelled_while_taking_a_warm_container_does_not_leak_it(
        docker_client: Any, image: str, tmp_path: Path) -> None:
    """A caller can go away (disconnect, deadline) while its job is in ``Pools.acquire``: the
    warm container it had taken off the pool must not be left behind, running and counted
    nowhere (status says one container less than Docker has, until the broker stops).

    In-process on the real engine, so the cancellation lands exactly at acquire's first await
    (the taken container's liveness check). Through gRPC the same happens when a client's
    cancellation races that Docker call."""
    import asyncio

    from airlock_broker.sandboxes.docker_sandbox import DockerSandbox
    from airlock_broker.sandboxes.pools import Pools, PoolSettings
    from airlock_broker.sandboxes.workspace import reap_stale
    from airlock_sandbox.policy import SandboxPolicy

    min_warm = 1

    (tmp_path / "spool").mkdir(mode=0o700)  # a state root, as the broker makes it

    async def scenario() -> tuple[list[str], dict[str, int]]:
        backend = DockerSandbox(SandboxPolicy(image=image), tmp_path / "spool")
        await backend.check()
        pools = Pools(backend, PoolSettings(min_warm=min_warm, profiles=("light",),
                                            sweep_seconds=3600),
                      image_id=backend.image_id, runtime="runc")
        pools.start()
        light = pools.pools["light"]
        try:
            async with asyncio.timeout(120):
                while not (len(light.warm) == min_warm and light.starting == 0):
                    await asyncio.sleep(0.05)

            task = asyncio.create_task(pools.acquire("light"))
            await asyncio.sleep(0)  # acquire runs to its first await, a Docker call
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

            # The cancelled acquire has destroyed (or leaked) the container it took: warm is
            # 0 until the replenisher's replacement is ready.
            async with asyncio.timeout(120):
                while not (len(light.warm) == min_warm and light.starting == 0):
                    await asyncio.sleep(0.05)
            (status,) = pools.status()
            counted = {"warm": status.warm, "busy": status.busy, "starting": status.starting}
            mine = [f"{c.short_id} ({c.status})"
                    for c in ph.containers_of(docker_client, backend.identity)]
            return mine, counted
        finally:
            await pools.close()
            await backend.close()

    try:
        mine, counted = asyncio.run(scenario())
    finally:
        reap_stale(tmp_path / "spool")  # a leaked slot's output tmpfs is still mounted
    assert len(mine) == sum(counted.values()), (
        f"Docker has {mine} for this pool, its status counts {counted}: the container the "
        "cancelled job was taking is left behind")

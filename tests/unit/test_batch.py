"""The client's bounded batch runner: never more than asked in flight, every item's outcome
reported once, failures kept per item, and an early stop that abandons nothing."""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from airlock_client.batch import MAX_CONCURRENCY, Throughput, run_bounded


def test_at_most_the_concurrency_runs_at_once_and_every_item_ends_once() -> None:
    lock = threading.Lock()
    now, peak = [0], [0]

    def work(item: int) -> int:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.01)
        with lock:
            now[0] -= 1
        return item * 2

    outcomes = list(run_bounded(range(40), work, concurrency=4))
    assert sorted(d.item for d in outcomes) == list(range(40))
    assert all(d.ok and d.result == d.item * 2 for d in outcomes)
    assert peak[0] == 4


def test_a_failure_is_that_items_outcome_and_the_rest_go_on() -> None:
    def work(item: int) -> int:
        if item == 3:
            raise RuntimeError("refused")
        return item

    outcomes = {d.item: d for d in run_bounded(range(6), work, concurrency=2)}
    assert len(outcomes) == 6
    assert isinstance(outcomes[3].error, RuntimeError) and outcomes[3].result is None
    assert all(outcomes[i].ok for i in (0, 1, 2, 4, 5))


def test_items_are_taken_lazily_and_a_stop_starts_nothing_new() -> None:
    taken: list[int] = []

    def items() -> Iterator[int]:
        for i in itertools.count():
            taken.append(i)
            yield i

    outcomes = list(run_bounded(items(), lambda i: i, concurrency=3, stop=lambda d: d.item >= 5))
    # Whatever was started is finished and reported; nothing beyond a few more was taken.
    assert {d.item for d in outcomes} == set(taken)
    assert len(taken) < 5 + 3 + 1


def test_an_interrupt_waits_for_what_is_in_flight() -> None:
    finished: list[int] = []

    def work(item: int) -> int:
        time.sleep(0.05)
        finished.append(item)
        return item

    batch = run_bounded(range(100), work, concurrency=3)
    next(batch)
    batch.close()  # the consumer stops: the two still running end before close returns
    assert len(finished) == 3


@pytest.mark.parametrize("concurrency", [0, MAX_CONCURRENCY + 1])
def test_the_concurrency_is_bounded(concurrency: int) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        list(run_bounded([1], lambda i: i, concurrency=concurrency))


def test_throughput_says_rate_and_time_left() -> None:
    meter = Throughput(total=10)
    meter.began -= 60  # one minute ago
    for ok in (True, True, False, True, True):
        meter.add(ok)
    assert meter.per_minute() == pytest.approx(5.0, rel=0.01)
    assert meter.eta_seconds() == pytest.approx(60.0, rel=0.01)
    assert meter.line().startswith("5/10 done (1 failed), 5.0/min, about 1m00s left")
    assert "left" not in Throughput().line()


@pytest.mark.usefixtures("ctrl_c_raises")
def test_a_second_interrupt_abandons_what_is_in_flight() -> None:
    """The first Ctrl-C waits for the items in flight; a second one calls ``abandon``
    (the client cancels its calls), and the batch ends once they have returned."""
    release = threading.Event()
    started = threading.Barrier(3)
    abandoned: list[float] = []

    def work(item: int) -> int:
        started.wait(timeout=60)
        release.wait(timeout=120)  # a conversion that only a cancellation ends early
        return item

    def abandon() -> None:
        abandoned.append(time.monotonic())
        release.set()

    main = threading.main_thread().ident
    assert main is not None

    def interrupt_twice() -> None:
        started.wait(timeout=60)
        for _ in range(2):
            time.sleep(1.0)  # each lands while the main thread waits in the batch (two
            # within one bytecode of a starved main thread would be handled as one)
            signal.pthread_kill(main, signal.SIGINT)

    began = time.monotonic()
    threading.Thread(target=interrupt_twice, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        list(run_bounded(range(10), work, concurrency=2, abandon=abandon))
    assert len(abandoned) == 1
    assert time.monotonic() - began < 60  # not the 120 s the items would have taken


def test_a_halt_starts_nothing_new_and_yields_what_was_in_flight() -> None:
    """A command's first Ctrl-C sets ``halt``: the items in flight finish and are reported
    like any other (their outputs are kept), nothing new starts, and no exception is raised."""
    halt = threading.Event()
    gate = threading.Event()
    started: list[int] = []
    lock = threading.Lock()

    def work(item: int) -> int:
        with lock:
            started.append(item)
        gate.wait(timeout=60)
        return item

    batch = run_bounded(range(100), work, concurrency=3, halt=halt)
    threading.Timer(0.2, lambda: (halt.set(), gate.set())).start()
    outcomes = list(batch)
    assert sorted(d.item for d in outcomes) == sorted(started)
    assert all(d.ok for d in outcomes)
    assert len(started) < 100


@pytest.mark.usefixtures("ctrl_c_raises")
def test_an_interrupt_after_a_halt_abandons_at_once() -> None:
    """The second Ctrl-C of a command that halted on the first: ``abandon`` runs at once."""
    halt = threading.Event()
    release = threading.Event()
    abandoned: list[int] = []

    def work(item: int) -> int:
        release.wait(timeout=120)
        return item

    def abandon() -> None:
        abandoned.append(1)
        release.set()

    batch = run_bounded(range(10), work, concurrency=2, halt=halt, abandon=abandon)
    main = threading.main_thread().ident
    assert main is not None

    def second_press() -> None:
        time.sleep(0.3)
        halt.set()
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=second_press, daemon=True).start()
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        list(batch)
    assert abandoned == [1]
    assert time.monotonic() - began < 60

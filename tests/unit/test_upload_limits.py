"""An upload's pace: the minimum average rate after the grace period, and the total deadline."""

from __future__ import annotations

from pathlib import Path

import pytest

from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.upload_limits import MiB, Pace, UploadLimits, human_rate
from airlock_broker.errors import AirlockError, Reason


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pace(clock: Clock, **kw: float) -> Pace:
    limits = UploadLimits(**{"min_bytes_per_second": 1000, "grace_seconds": 10.0, **kw})  # type: ignore[arg-type]
    return Pace(limits, max_artifact_bytes=100_000, clock=clock)


def test_the_grace_period_is_free_then_the_average_must_keep_up() -> None:
    clock = Clock()
    pace = _pace(clock)
    assert pace.remaining(0) == pytest.approx(10.0)  # nothing needed before the grace ends
    clock.now += 9.9
    assert pace.check(0) == pytest.approx(0.1)
    clock.now += 5
    # 14.9 s in: 4.9 s past the grace at 1000 B/s: 4900 bytes needed.
    assert pace.remaining(5000) == pytest.approx(0.1)
    with pytest.raises(AirlockError) as slow:
        pace.check(4800)
    assert slow.value.reason is Reason.UPLOAD_TOO_SLOW
    message = slow.value.message
    assert "4800 bytes in 14.9 s" in message and "322.1 B/s" in message
    assert "at least 1000.0 B/s (1000 bytes/s) after the first 10 s" in message


def test_a_client_that_stops_is_cut_off_when_it_falls_behind_not_later() -> None:
    clock = Clock()
    pace = _pace(clock)
    clock.now += 12
    left = pace.check(20_000)  # 20 s worth of bytes at the minimum: 18 s of credit left
    assert left == pytest.approx(18.0)
    clock.now += left
    with pytest.raises(AirlockError, match="too slow"):
        pace.check(20_000)


def test_the_total_deadline_binds_even_a_fast_enough_upload() -> None:
    clock = Clock()
    pace = _pace(clock, deadline_seconds=30.0)
    clock.now += 29
    assert pace.check(10**9) == pytest.approx(1.0)
    clock.now += 1
    with pytest.raises(AirlockError) as late:
        pace.check(10**9)
    assert late.value.reason is Reason.UPLOAD_TOO_SLOW
    assert "took over 30 s" in late.value.message and "1000000000 bytes" in late.value.message


def test_the_default_deadline_lets_the_largest_artifact_arrive_at_the_minimum_rate() -> None:
    limits = UploadLimits()
    assert limits.deadline_for(4 * 1024**3) == pytest.approx(10 + 4096)
    assert UploadLimits(deadline_seconds=60).deadline_for(4 * 1024**3) == 60
    no_rate = UploadLimits(min_bytes_per_second=0)  # the rate check off: the deadline stays
    assert no_rate.deadline_for(MiB) == pytest.approx(11)
    clock = Clock()
    pace = Pace(no_rate, MiB, clock=clock)
    clock.now += 10.5
    assert pace.check(0) == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [
    {"min_bytes_per_second": -1}, {"grace_seconds": 0}, {"deadline_seconds": 0},
    {"spool_min_free_bytes": -1}, {"spool_min_free_ratio": 1.0},
])
def test_limits_check_themselves(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        UploadLimits(**bad)  # type: ignore[arg-type]


def test_the_upload_section_loads_and_rejects_unknown_keys(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[upload]\nmin_bytes_per_second = 4096\ngrace_seconds = 2.5\n"
                    "deadline_seconds = 90\nspool_min_free_bytes = 0\n")
    cfg = BrokerConfig.load(good)
    assert cfg.upload == UploadLimits(min_bytes_per_second=4096, grace_seconds=2.5,
                                      deadline_seconds=90, spool_min_free_bytes=0)
    assert BrokerConfig().upload == UploadLimits()
    bad = tmp_path / "bad.toml"
    bad.write_text("[upload]\nmax_rate = 1\n")
    with pytest.raises(ValueError, match="upload"):
        BrokerConfig.load(bad)


def test_rates_read_as_people_write_them() -> None:
    assert human_rate(0.5) == "0.5 B/s"
    assert human_rate(2048) == "2.0 KiB/s"
    assert human_rate(3 * MiB) == "3.0 MiB/s"

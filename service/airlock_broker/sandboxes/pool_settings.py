"""The warm pools' sizes and rates (``[pools]`` in the broker's configuration)."""

from __future__ import annotations

from dataclasses import dataclass

from airlock_sandbox.formats import PROFILES


@dataclass(frozen=True)
class PoolSettings:
    """Sizes and rates of the warm pools. ``min_warm = 0`` turns pools off (all cold)."""

    min_warm: int = 1
    max_warm: int = 4
    #: Containers being started at once, across all profiles (bounds the start rate).
    max_starting: int = 1
    #: A warm container older than this is replaced (the worker itself gives up after an hour).
    max_age_seconds: float = 1800.0
    sweep_seconds: float = 15.0
    #: How often the engine is pinged (an outage is noticed and its end is, within this).
    engine_check_seconds: float = 2.0
    #: Start the replacement for a warm container a job took only once that job is done (or
    #: after ``defer_max_seconds``, whichever comes first). On a small machine the start
    #: (about a CPU-second of imports) would otherwise compete with the job it replaces.
    defer_replacement: bool = True
    defer_max_seconds: float = 2.0
    #: A job that finds no warm container waits this long for one being started (its own
    #: start would take as long, and the CPU of the one under way) before it takes the cold
    #: path; each waiting job adds one to the pool's target, up to ``max_warm``. 0: never wait.
    wait_for_starting_seconds: float = 10.0
    profiles: tuple[str, ...] = PROFILES

    def __post_init__(self) -> None:
        if not 0 <= self.min_warm <= self.max_warm:
            raise ValueError("need 0 <= min_warm <= max_warm")
        if self.wait_for_starting_seconds < 0:
            raise ValueError("wait_for_starting_seconds must not be negative")
        if self.max_starting < 1 or self.sweep_seconds <= 0 or self.max_age_seconds <= 0 \
                or self.engine_check_seconds <= 0 or self.defer_max_seconds <= 0:
            raise ValueError("max_starting, sweep_seconds, max_age_seconds, "
                             "engine_check_seconds and defer_max_seconds must be positive")
        unknown = set(self.profiles) - set(PROFILES)
        if unknown:
            raise ValueError(f"unknown profiles: {sorted(unknown)}")

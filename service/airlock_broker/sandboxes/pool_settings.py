"""The warm pools' sizes and rates (``[pools]`` in the broker's configuration)."""

from __future__ import annotations

from dataclasses import dataclass

from airlock_sandbox.formats import PROFILE_LIGHT, PROFILE_SKLEARN, PROFILE_TORCH, PROFILES

#: What an idle warm container of each profile holds in memory (MiB), as the memory budget
#: counts it. Measured in the sandbox image on this project's machine (cgroup v1, runc), each
#: container warm and idle, its libraries imported and primed: the cgroup's usage sklearn
#: 117.5, torch 146, light 16 (resident anonymous memory 113 / 143 / 15, no page cache: the
#: image's files are cached once for all), plus its containerd shim's own anonymous memory,
#: 2.4 each; rounded up to a multiple of 32. The budget's 1024 MiB are 8 sklearn containers,
#: 6 torch or 32 light. An idle container waits for its job spec (contract.py) asleep on its
#: doorbell under runc (0.01 % of a core; 0.4 % when it looked every 5 ms), looking every
#: 50 ms under runsc (4 %): the only CPU it takes until a job does.
WARM_MEMORY_MIB = {PROFILE_SKLEARN: 128, PROFILE_TORCH: 160, PROFILE_LIGHT: 32}


@dataclass(frozen=True)
class PoolSettings:
    """Sizes and rates of the warm pools. ``min_warm = 0`` turns pools off (all cold)."""

    min_warm: int = 1
    #: A cap per profile; what bounds the stock a stream adds is ``stream_memory_budget_mib``
    #: (with the defaults, 8 sklearn containers beyond ``min_warm``). At 4 the cap bound it
    #: instead: a burst of 20 back to back after one like it waited +271-286 ms (p50, bench
    #: S1b2) against +113-123 ms here.
    max_warm: int = 16
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
    #: Keep enough warm containers for the stream of jobs (pool_demand.py): the arrival rate
    #: over this window times the refill time (learned), on top of ``min_warm``, up to
    #: ``max_warm``. 0: always ``min_warm`` (plus one per job waiting for a start).
    stream_window_seconds: float = 60.0
    #: Also keep, for that window, the stock the busiest refill time needed: the jobs that
    #: came within one refill time of each other, less one (a burst after a quiet spell
    #: averages to almost nothing over the window). False: the rate alone.
    stream_bursts: bool = True
    #: Memory the warm containers the stream adds (beyond every pool's ``min_warm``) may hold
    #: together, counted at ``WARM_MEMORY_MIB`` each. Waiting containers use hardly any CPU (see
    #: there); each one's start costs a few CPU-seconds once, and ``max_starting`` bounds how
    #: many run at once.
    stream_memory_budget_mib: int = 1024
    #: Refills import their libraries in batches (import_batches.py): one started while a
    #: batch imports waits at the lowest CPU weight for the next, unless it was started
    #: within ``batch_join_seconds`` of the batch's first. It changes anything only where
    #: warm containers wait at a low weight (``[sandbox] warm_low_priority``, runc). False:
    #: all import at once, evenly.
    import_in_batches: bool = True
    batch_join_seconds: float = 0.5
    profiles: tuple[str, ...] = PROFILES

    def __post_init__(self) -> None:
        if not 0 <= self.min_warm <= self.max_warm:
            raise ValueError("need 0 <= min_warm <= max_warm")
        if self.wait_for_starting_seconds < 0 or self.stream_window_seconds < 0 \
                or self.stream_memory_budget_mib < 0 or self.batch_join_seconds < 0:
            raise ValueError("wait_for_starting_seconds, stream_window_seconds, "
                             "stream_memory_budget_mib and batch_join_seconds must not be "
                             "negative")
        if self.max_starting < 1 or self.sweep_seconds <= 0 or self.max_age_seconds <= 0 \
                or self.engine_check_seconds <= 0 or self.defer_max_seconds <= 0:
            raise ValueError("max_starting, sweep_seconds, max_age_seconds, "
                             "engine_check_seconds and defer_max_seconds must be positive")
        unknown = set(self.profiles) - set(PROFILES)
        if unknown:
            raise ValueError(f"unknown profiles: {sorted(unknown)}")

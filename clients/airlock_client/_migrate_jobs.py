"""How many versions ``airlock migrate`` migrates at once when ``--jobs`` is not given: what
the broker says it can run now, from its pool status. Imports nothing (``airlock migrate
--help`` quotes these numbers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airlock_client._types import PoolStatus

#: The worker profile whose sandboxes convert what registries mostly hold: pickled and
#: sklearn-flavoured models (an MLflow bundle goes there unless its flavour says pytorch).
JOBS_PROFILE = "sklearn"
#: The most versions at once that ``default_jobs`` asks for, however many sandboxes are warm
#: (the broker queues the rest; a default broker runs two jobs at a time).
MAX_DEFAULT_JOBS = 4
#: When the pool status cannot be read (it needs the admin role): what a default broker runs
#: at once (``[broker] max_concurrent_jobs``). More would only wait in its queue.
FALLBACK_JOBS = 2


def default_jobs(pools: Sequence[PoolStatus]) -> int:
    """The warm sandboxes (ready or starting) of the broker's ``JOBS_PROFILE`` pool, at least
    1, at most ``MAX_DEFAULT_JOBS``: more versions at once would wait for containers started
    cold, or in the broker's queue."""
    warm = sum(p.warm + p.starting for p in pools
               if p.profile == JOBS_PROFILE and not p.draining and not p.unavailable)
    return max(1, min(MAX_DEFAULT_JOBS, warm))

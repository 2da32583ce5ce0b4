"""How many conversions a batch keeps in flight when not told (``airlock migrate`` without
``--jobs``, ``airlock convert FILE FILE ...``, ``Client.convert_many``, the shards of
``airlock convert DIR``): what the broker says it runs at once, from its pool status.
Imports nothing (``airlock migrate --help`` quotes these numbers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airlock_client._types import PoolStatus

#: The worker profile whose sandboxes convert what registries mostly hold: pickled and
#: sklearn-flavoured models (an MLflow bundle goes there unless its flavour says pytorch).
JOBS_PROFILE = "sklearn"
#: The profile whose sandboxes convert a model directory's shards (PyTorch weights).
SHARDS_PROFILE = "torch"
#: The most versions at once that ``default_jobs`` asks for, however many sandboxes are warm
#: (the broker queues the rest; a default broker runs two jobs at a time).
MAX_DEFAULT_JOBS = 4
#: When the pool status cannot be read (it needs the observe or admin role): what a default
#: broker runs at once (``[broker] max_concurrent_jobs``). More would only wait in its queue.
FALLBACK_JOBS = 2


def default_jobs(pools: Sequence[PoolStatus], max_concurrent_jobs: int = 0,
                 profile: str = JOBS_PROFILE) -> int:
    """What the broker runs at once (``max_concurrent_jobs``, from its pool status): more
    versions at once would wait in its queue, fewer would leave a run slot idle. A broker
    that does not say: the warm sandboxes (ready or starting) of its ``profile`` pool (the
    one the batch's conversions go to). At least 1 (1 when that pool is drained or its
    engine down), at most ``MAX_DEFAULT_JOBS``."""
    usable = [p for p in pools if p.profile == profile
              and not p.draining and not p.unavailable]
    if pools and not usable:
        return 1
    if max_concurrent_jobs > 0:
        return max(1, min(MAX_DEFAULT_JOBS, max_concurrent_jobs))
    return max(1, min(MAX_DEFAULT_JOBS, sum(p.warm + p.starting for p in usable)))

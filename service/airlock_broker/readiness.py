"""Whether the broker may take a job now, and if not, why: one object for health, admission
and the pools.

Each reason to refuse is a ``Hold`` with a sentence for the caller. Holds are independent (an
operator may drain the pools while the engine is down) and ordered: the first one held is the
one a refusal names. Who sets what:

    STOPPING     the server, on SIGTERM / ``Broker.stop`` (for good)
    SELFTEST     the server, from start until the isolation self-test passes (until the end
                 of start-up when the self-test is off); for good if it fails
    DRAINED      an operator (AdminService DrainPools / ResumePools)
    ENGINE_DOWN  the pools' engine watch, while the sandbox engine does not answer

Who asks what:

    admission (before the upload is read)  ``refusal()``: every hold
    the pools (before a sandbox is handed out)  ``refusal(*JOB_HOLDS)``: a job admitted before
        a shutdown, a failed self-test or a drain still gets its sandbox (during the grace
        period of a shutdown)
    the pools' refills  ``refusal(*POOL_HOLDS)``: none while drained or the engine is down
    gRPC health  ``serving``: SERVING unless a hold other than DRAINED is held (an operator
        drain stops new jobs, it does not take the broker out of a load balancer)
"""

from __future__ import annotations

import asyncio
import enum

from airlock_broker.errors import AirlockError, Reason, error


class Hold(enum.Enum):
    """A reason to refuse new jobs, in the order a refusal names them."""

    STOPPING = "stopping"
    SELFTEST = "selftest"
    DRAINED = "drained"
    ENGINE_DOWN = "engine_down"


#: What stops the pools' refills: the holds that concern sandboxes, not the broker's life cycle.
POOL_HOLDS = (Hold.DRAINED, Hold.ENGINE_DOWN)
#: What refuses an admitted job its sandbox: an engine that does not answer. A job admitted
#: before a shutdown, a failed self-test or a drain has its upload read: it runs.
JOB_HOLDS = (Hold.ENGINE_DOWN,)

#: Holds that leave gRPC health SERVING.
_STILL_SERVING = frozenset({Hold.DRAINED})

STOPPING_WHY = "the broker is shutting down"
DRAINED_WHY = "the sandbox pools are drained by an operator; retry later"


class Readiness:
    """The broker's serving state: a set of holds, each with its sentence."""

    def __init__(self) -> None:
        self._holds: dict[Hold, str] = {}
        self._changed = asyncio.Event()

    def hold(self, kind: Hold, why: str) -> None:
        """Refuse for ``why`` until ``release(kind)`` (a second hold replaces the sentence)."""
        self._holds[kind] = why
        self._changed.set()

    def release(self, kind: Hold) -> None:
        if self._holds.pop(kind, None) is not None:
            self._changed.set()

    def held(self, kind: Hold) -> bool:
        return kind in self._holds

    def why(self, kind: Hold) -> str:
        """The sentence of ``kind``'s hold, or "" when it is not held."""
        return self._holds.get(kind, "")

    def refusal(self, *kinds: Hold) -> AirlockError | None:
        """SANDBOX_UNAVAILABLE for the first hold of ``kinds`` (all when none are named), or
        None when a job may go ahead."""
        for kind in kinds or tuple(Hold):
            if kind in self._holds:
                return error(Reason.SANDBOX_UNAVAILABLE, self._holds[kind])
        return None

    def check(self, *kinds: Hold) -> None:
        """Raise ``refusal(*kinds)`` if there is one."""
        refused = self.refusal(*kinds)
        if refused is not None:
            raise refused

    @property
    def serving(self) -> bool:
        """What gRPC health says: SERVING unless a hold other than an operator drain is held."""
        return not set(self._holds) - _STILL_SERVING

    async def until_serving_is_not(self, serving: bool) -> None:
        """Return once ``self.serving`` differs from ``serving`` (at once if it already does)."""
        while self.serving == serving:
            self._changed.clear()
            await self._changed.wait()

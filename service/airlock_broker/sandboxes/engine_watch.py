"""The engine watch's one ping: is the sandbox engine there, and did it just come back?

While the engine does not answer, the broker's readiness holds ENGINE_DOWN with the reason
(jobs are refused with it, health says NOT_SERVING). The hold stays when the engine answers
again: the pools first clear out what the outage killed, then release it (pools.py).
"""

from __future__ import annotations

import logging

from airlock_broker.readiness import Hold, Readiness
from airlock_broker.sandboxes.sandbox import SandboxBackend, SandboxUnavailable

log = logging.getLogger(__name__)


async def engine_back(backend: SandboxBackend, readiness: Readiness) -> bool:
    """Ping the engine; hold ENGINE_DOWN while it fails. True when it answers after an outage
    (ENGINE_DOWN still held: the caller releases it once the outage is cleared up)."""
    try:
        await backend.check()
    except SandboxUnavailable as exc:
        why = f"the sandbox engine is unavailable: {exc}"
        if not readiness.held(Hold.ENGINE_DOWN):
            log.error("%s; refusing jobs until it is back", why)
        readiness.hold(Hold.ENGINE_DOWN, why)
        return False
    except Exception as exc:  # a bug here must not stop the watch
        log.warning("engine check failed unexpectedly: %s", exc)
        return False
    return readiness.held(Hold.ENGINE_DOWN)

"""How the broker writes a moment into what it keeps or signs (audit lines, provenance
records): UTC, to the second, ISO 8601 with ``Z``. One place decides it, so that an audit
line and the record of the same job read alike."""

from __future__ import annotations

import time


def utc_second(seconds: float) -> str:
    """``seconds`` since the epoch as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))

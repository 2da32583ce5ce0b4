"""Futures whose outcome no one may await."""

from __future__ import annotations

import asyncio
from typing import Any


def retrieved(future: asyncio.Future[Any]) -> None:
    """Mark ``future``'s exception as seen (a done-callback, or once it is done): asyncio
    logs "exception was never retrieved" when such a future is collected."""
    if not future.cancelled():
        future.exception()

"""The worker's one exception type: a failure with the exit code the broker will see."""

from __future__ import annotations

from airlock_sandbox.contract import WorkerExit

#: The broker logs a capped copy of stderr; keep our own line short.
MAX_MESSAGE_CHARS = 400


class WorkerError(Exception):
    """A job outcome other than success. ``exit`` is what the process exits with."""

    def __init__(self, exit: WorkerExit, message: str) -> None:
        super().__init__(message)
        self.exit = exit
        self.message = one_line(message)


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Collapse whitespace (tracebacks, multi-line library errors) and cap the length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """``TypeName: message`` for an exception raised by a library."""
    return one_line(f"{type(exc).__name__}: {exc}")

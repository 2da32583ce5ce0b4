"""The two ways an integrity extraction (:mod:`.extract`) ends without weights."""

from __future__ import annotations

from airlock_sandbox.contract import WorkerExit

from .errors import WorkerError

NOT_EXTRACTABLE = "weights cannot be extracted without executing the artifact"


class Unextractable(WorkerError):
    """Only code could produce these weights: the result stays format-safe only."""

    def __init__(self, message: str) -> None:
        super().__init__(WorkerExit.UNSUPPORTED_MODEL, message)


class Refused(WorkerError):
    """The archive is broken or hostile (bounds, sizes, bombs, missing records)."""

    def __init__(self, message: str) -> None:
        super().__init__(WorkerExit.CONVERSION_FAILED, f"integrity extraction refused: {message}")

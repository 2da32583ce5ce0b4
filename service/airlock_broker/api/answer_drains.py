"""The bound on how long an answer may take to reach its caller (``answer_drain_seconds``).

The answer itself (a broker file, the sandboxes already released) is conversion/answers.py's;
this is the gRPC side: cancelling the call's task and sending the status behind the messages
already queued.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc


class AnswerDrains:
    """The bound on how long an answer may take to reach its caller.

    When ``seconds`` pass before the last message is written (the caller reads too slowly or
    not at all), the call's handler task is cancelled: everything it holds (admission place,
    answer file, the caller's descriptors) is released at once. The caller is sent
    DEADLINE_EXCEEDED with the reason; gRPC can only deliver that status behind the messages
    already queued, so it is sent from a task of its own that ends when the caller reads on,
    goes away or hits its own deadline, or when the connection reaches its maximum age
    (``[rpc]``, rpc_limits.py) - whichever comes first.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        #: Abort tasks that outlive their handler (see above); held so they are not collected.
        self._aborts: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def deadline(self, context: grpc.aio.ServicerContext[Any, Any],
                 expired: Callable[[], grpc.Status]) -> Iterator[None]:
        """Arm the deadline for the answer sent inside this block (by the current task).

        ``expired`` is called once, on the event loop, when it passes: it records why and
        returns the status for the caller.
        """
        task = asyncio.current_task()
        assert task is not None, "an answer is sent from its RPC's task"
        loop = asyncio.get_running_loop()

        def expire() -> None:
            abort = loop.create_task(_abort(context, expired()), name="airlock-answer-abort")
            self._aborts.add(abort)
            abort.add_done_callback(self._aborts.discard)
            task.cancel()

        timer = loop.call_later(self.seconds, expire)
        try:
            yield
        finally:
            timer.cancel()


async def _abort(context: grpc.aio.ServicerContext[Any, Any],
                 status: grpc.Status) -> None:
    # AbortError when the status went out; an error when the call was gone first.
    with contextlib.suppress(Exception):
        await context.abort_with_status(status)

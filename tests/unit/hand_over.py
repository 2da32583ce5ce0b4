"""The client's side of a same-host hand-over, as tests drive it by hand (the broker's
fast-path socket, fastpath/local_transfer.py): the ticket alone, then the descriptors."""

from __future__ import annotations

import contextlib
import json
import socket

from airlock_client._local_transfer import read_reply


def two_steps(ours: socket.socket, message: bytes, fds: list[int]) -> dict[str, object] | None:
    """Up to the descriptors: the ticket (``message``) alone, then, once the broker is ready,
    ``fds``. The broker's reply if it refused at the first step; None when the descriptors
    were sent (its reply is the caller's to read)."""
    with contextlib.suppress(BrokenPipeError):  # it may answer and hang up first
        ours.send(message)
    reply = json.loads(read_reply(ours))
    if reply.get("ready") is not True:
        return dict(reply)
    with contextlib.suppress(BrokenPipeError):
        socket.send_fds(ours, [b"descriptors"], fds)
    return None


def hand_over(ours: socket.socket, message: bytes, fds: list[int]) -> dict[str, object]:
    """Both steps and the broker's last reply."""
    reply = two_steps(ours, message, fds)
    return reply if reply is not None else dict(json.loads(read_reply(ours)))

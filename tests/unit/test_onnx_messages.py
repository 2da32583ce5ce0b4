"""The broker reads a validator's messages as ``Connection.send_bytes`` writes them, and
within one deadline for all of a message's bytes."""

from __future__ import annotations

import socket
import threading
import time
from multiprocessing.connection import Connection

import pytest

from airlock_broker.validation.onnx_messages import LENGTH, BadLength, Late, read_message


@pytest.mark.parametrize("payload", [b"", b"ready", bytes(range(256)) * 5000])
def test_reads_what_connection_send_bytes_writes(payload: bytes) -> None:
    ours, theirs = socket.socketpair()
    with ours, Connection(theirs.detach()) as writer:
        # From a thread: a message larger than the socket's buffer waits for its reader.
        sender = threading.Thread(target=lambda: [writer.send_bytes(m) for m in (payload, b"x")])
        sender.start()
        try:
            deadline = time.monotonic() + 60
            assert read_message(ours.fileno(), deadline, len(payload)) == payload
            assert read_message(ours.fileno(), deadline, 1) == b"x"
        finally:
            sender.join(60)


def test_end_of_file_before_or_within_a_message_is_none() -> None:
    for sent in (b"", LENGTH.pack(100) + b"x" * 10):
        ours, theirs = socket.socketpair()
        with ours:
            theirs.sendall(sent)
            theirs.close()
            assert read_message(ours.fileno(), time.monotonic() + 60, 100) is None


@pytest.mark.parametrize(("length", "words"), [
    (101, "announced a message of 101 bytes, over the 100-byte limit"),
    (-1, "announced a message of 2 GiB or more, over the 100-byte limit"),
    (-7, "announced a message of -7 bytes"),
])
def test_a_bad_length_is_refused_unread(length: int, words: str) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(LENGTH.pack(length))
        with pytest.raises(BadLength, match=words):
            read_message(ours.fileno(), time.monotonic() + 60, 100)


@pytest.mark.parametrize(("sent", "words"), [
    (b"", "no message had begun"),
    (LENGTH.pack(1 << 20) + b"x" * 10, "10 of a 1048576-byte message had come"),
])
def test_the_deadline_covers_the_whole_message(sent: bytes, words: str) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(sent)  # and then nothing, the connection open
        began = time.monotonic()
        with pytest.raises(Late, match=words):
            read_message(ours.fileno(), began + 0.5, 2 << 20)
        assert time.monotonic() - began < 30  # generous: a busy machine

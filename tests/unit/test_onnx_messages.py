"""The broker reads a validator's messages as ``Connection.send_bytes`` writes them, and
within one deadline for all of a message's bytes."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import pytest

from airlock_broker.validation.onnx_messages import (
    BLOCK_BYTES,
    LENGTH,
    BadLength,
    Late,
    read_message,
    read_message_into,
)


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


def test_a_message_read_into_a_sink_is_handed_over_a_block_at_a_time() -> None:
    # The broker holds one block of a validator's canonical model, never the model.
    payload = bytes(range(256)) * (3 * BLOCK_BYTES // 256 + 1000)
    ours, theirs = socket.socketpair()
    blocks: list[int] = []
    digest = hashlib.sha256()
    announced: list[int] = []

    def begin(size: int) -> Callable[[memoryview], None]:
        announced.append(size)

        def sink(block: memoryview) -> None:
            blocks.append(len(block))
            digest.update(block)
        return sink

    with ours, Connection(theirs.detach()) as writer:
        sender = threading.Thread(target=lambda: writer.send_bytes(payload))
        sender.start()
        try:
            got = read_message_into(ours.fileno(), time.monotonic() + 60, len(payload), begin)
        finally:
            sender.join(60)
    assert got == len(payload) and announced == [len(payload)]
    assert sum(blocks) == len(payload) and max(blocks) <= BLOCK_BYTES
    assert digest.digest() == hashlib.sha256(payload).digest()


def test_a_message_over_the_limit_begins_nothing() -> None:
    ours, theirs = socket.socketpair()
    begun: list[int] = []

    def begin(size: int) -> Callable[[memoryview], None]:
        begun.append(size)
        return lambda block: None

    with ours, theirs:
        theirs.sendall(LENGTH.pack(101))
        with pytest.raises(BadLength):
            read_message_into(ours.fileno(), time.monotonic() + 60, 100, begin)
    assert begun == []

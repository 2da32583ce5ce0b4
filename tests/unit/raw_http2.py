"""A bare HTTP/2 client for the tests that need what a gRPC client never does: set its stream
windows to 0 (so the broker cannot send it a byte of any answer), open calls on one connection
as fast as frames can be written. Enough of HTTP/2 and HPACK for that, nothing more."""

from __future__ import annotations

import socket
import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0, 1, 3, 4, 6, 7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing, new name (no Huffman)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


class Http2Caller:
    """One connection to ``port`` whose streams never let the server send data: every
    stream's window is 0 (SETTINGS_INITIAL_WINDOW_SIZE) and no WINDOW_UPDATE is ever sent.
    A thread reads what the server sends, acknowledges its settings and pings, and counts
    the streams it ended (trailers or RST_STREAM)."""

    def __init__(self, port: int, window: int = 0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self._lock = threading.Lock()
        self.ended: set[int] = set()
        self.closed = threading.Event()
        self._next = 1
        self._send(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", INITIAL_WINDOW_SIZE,
                                                                  window)))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _send(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def unary(self, path: str, message: bytes = b"") -> int:
        """Open a call of ``path`` and send its one request (and end the stream): its id."""
        stream, self._next = self._next, self._next + 2
        block = b"".join(_literal(k, v) for k, v in (
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
            (b":authority", b"localhost"), (b"content-type", b"application/grpc"),
            (b"te", b"trailers")))
        body = b"\x00" + struct.pack(">I", len(message)) + message
        self._send(frame(HEADERS, END_HEADERS, stream, block)
                   + frame(DATA, END_STREAM, stream, body))
        return stream

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, flags = buffer[3], buffer[4]
                    stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                    payload, buffer = buffer[9:9 + length], buffer[9 + length:]
                    if kind == SETTINGS and not flags & ACK:
                        self._send(frame(SETTINGS, ACK, 0))
                    elif kind == PING and not flags & ACK:
                        self._send(frame(PING, ACK, 0, payload))
                    elif kind == RST_STREAM or (kind == HEADERS and flags & END_STREAM):
                        self.ended.add(stream)
        except OSError:
            return
        finally:
            self.closed.set()

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            self._reader.join(10)

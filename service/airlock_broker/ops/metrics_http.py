"""The metrics endpoint's HTTP server: prometheus_client's WSGI app, served with bounds.

prometheus_client's own ``start_http_server`` serves each connection on a thread of its own,
with no timeout and no cap: a local user opening a thousand connections that send nothing
(or a request line and then nothing) held a thousand threads and descriptors of the broker's
for good. Here a connection gets ``REQUEST_SECONDS`` for its request and its answer together
(a scraper sends one at once): a timeout on each read alone let eight connections that sent a
byte every four seconds hold every place for as long as they liked, and no scrape got through
(found by review). At most ``MAX_CONNECTIONS`` are served at once (one beyond is closed
unanswered: a scraper tries again at its next interval), and a connection that fails
mid-request is one debug line, not a traceback on the broker's stderr.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)

#: Connections served at once; scrapers use one each.
MAX_CONNECTIONS = 8
#: Seconds a connection may take to send its request and take its answer, all together.
REQUEST_SECONDS = 5.0


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_SECONDS  # each read's too (StreamRequestHandler.setup)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape is not news; the gRPC log says what matters


class _Deadlines:
    """Shuts each connection down at its deadline, whatever it is waiting for: one thread for
    all of them."""

    def __init__(self) -> None:
        self._due: dict[socket.socket, float] = {}
        self._changed = threading.Condition()
        self._closed = False
        threading.Thread(target=self._cut_until_closed, name="airlock-metrics-deadlines",
                         daemon=True).start()

    def close(self) -> None:
        """End the thread (the server is closed: no connection is served any more)."""
        with self._changed:
            self._closed = True
            self._changed.notify()

    def add(self, sock: socket.socket, seconds: float) -> None:
        with self._changed:
            self._due[sock] = time.monotonic() + seconds
            self._changed.notify()

    def remove(self, sock: socket.socket) -> None:
        with self._changed:
            self._due.pop(sock, None)

    def _cut_until_closed(self) -> None:
        with self._changed:
            while not self._closed:
                now = time.monotonic()
                for sock, due in list(self._due.items()):
                    if due <= now:
                        del self._due[sock]
                        with contextlib.suppress(OSError):  # its reads and writes end at once
                            sock.shutdown(socket.SHUT_RDWR)
                self._changed.wait(min(self._due.values(), default=now + 60.0) - now)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler]) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._deadlines = _Deadlines()
        self._seconds = REQUEST_SECONDS
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # beyond the cap: closed, unanswered
            return
        try:
            super().process_request(request, client_address)  # its thread gives it back
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        self._deadlines.add(request, self._seconds)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._deadlines.remove(request)
            self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        self._deadlines.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: a connection from %s failed mid-request", client_address,
                  exc_info=True)


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """Serve ``registry`` at ``http://host:port/metrics`` on a daemon thread; the server (its
    ``shutdown()`` and ``server_close()`` end it)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(_Server):
        address_family = family

    server = make_server(host, port, make_wsgi_app(registry), Server, _Handler)
    threading.Thread(target=server.serve_forever, name="airlock-metrics", daemon=True).start()
    return server

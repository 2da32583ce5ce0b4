"""The metrics endpoint's HTTP server: prometheus_client's WSGI app, served with bounds.

prometheus_client's own ``start_http_server`` serves each connection on a thread of its own,
with no timeout and no cap: a local user opening a thousand connections that send nothing
(or a request line and then nothing) held a thousand threads and descriptors of the broker's
for good. Here a connection gets ``REQUEST_SECONDS`` for its request and its answer (a
scraper sends one at once), at most ``MAX_CONNECTIONS`` are served at once (one beyond is
closed unanswered: a scraper tries again at its next interval), and a connection that fails
mid-request is one debug line, not a traceback on the broker's stderr.
"""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)

#: Connections served at once; scrapers use one each.
MAX_CONNECTIONS = 8
#: Seconds a connection may take to send its request (each read) and take its answer.
REQUEST_SECONDS = 5.0


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_SECONDS  # the connection's socket timeout (StreamRequestHandler.setup)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape is not news; the gRPC log says what matters


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler]) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
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
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

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

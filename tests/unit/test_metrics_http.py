"""The metrics endpoint's server is bounded (ops/metrics_http.py).

Found by review: prometheus_client's ``start_http_server`` served each connection on a thread
of its own with no timeout, so a local user's idle connections each held a broker thread and
descriptor for good. Now a connection gets a few seconds, a few are served at once, and a
scrape still gets through."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from airlock_broker.ops import metrics_http
from airlock_broker.ops.metrics_http import MAX_CONNECTIONS, serve_metrics


def _scrape(port: int, deadline: float) -> str:
    """The page, once a scrape gets through (one beyond the cap is closed unanswered)."""
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
                return page.read().decode()
        except OSError:
            assert time.monotonic() < deadline, "no scrape got through"
            time.sleep(0.1)


def test_idle_connections_are_few_and_short_and_a_scrape_gets_through(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(metrics_http._Handler, "timeout", 1.0)
    registry = CollectorRegistry()
    Counter("airlock_test_scrapes", "a counter to find in the page", registry=registry).inc()
    server = serve_metrics("127.0.0.1", 0, registry)
    port = server.server_address[1]
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3 * MAX_CONNECTIONS)]
    try:
        idle[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        # Serving threads are bounded, whatever the connections.
        time.sleep(0.5)  # (an absence: gives the server the time to start too many)
        assert threading.active_count() - before <= MAX_CONNECTIONS
        # Each idle connection is closed: at once beyond the cap, after its timeout within.
        for sock in idle:
            sock.settimeout(30)
            while sock.recv(4096):
                pass
        assert "airlock_test_scrapes_total 1.0" in _scrape(port, time.monotonic() + 30)
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()
        server.server_close()


def test_connections_that_trickle_their_request_cannot_keep_scrapes_out(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Found by review: the timeout was each read's, so eight connections sending a byte every
    # four seconds held every place for as long as they kept it up, and no scrape got in.
    monkeypatch.setattr(metrics_http._Handler, "timeout", 2.0)
    monkeypatch.setattr(metrics_http, "REQUEST_SECONDS", 2.0)
    registry = CollectorRegistry()
    Counter("airlock_test_scrapes", "a counter to find in the page", registry=registry).inc()
    server = serve_metrics("127.0.0.1", 0, registry)
    port = server.server_address[1]
    stop = threading.Event()
    cut: list[float] = []

    def trickle() -> None:
        """One connection sending a header byte every half second, well within each read's
        timeout, until the server cuts it (or the test ends)."""
        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            try:
                sock.sendall(b"GET /metrics HTTP/1.1\r\n")
                while not stop.wait(0.5):
                    sock.sendall(b"X")
            except OSError:
                cut.append(time.monotonic() - began)

    tricklers = [threading.Thread(target=trickle) for _ in range(MAX_CONNECTIONS)]
    try:
        for thread in tricklers:
            thread.start()
        # Each is cut at its deadline, and a scrape gets through while they go on trying.
        assert "airlock_test_scrapes_total 1.0" in _scrape(port, time.monotonic() + 60)
        deadline = time.monotonic() + 60
        while len(cut) < MAX_CONNECTIONS:
            assert time.monotonic() < deadline, f"only {len(cut)} trickling connections cut"
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in tricklers:
            thread.join(30)
        server.shutdown()
        server.server_close()


def test_a_closed_server_leaves_no_thread_behind() -> None:
    def deadline_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "airlock-metrics-deadlines"}

    before = deadline_threads()  # an earlier test's may still be ending
    server = serve_metrics("127.0.0.1", 0, CollectorRegistry())
    ours = deadline_threads() - before
    assert len(ours) == 1
    server.shutdown()
    server.server_close()
    deadline = time.monotonic() + 30
    while any(t.is_alive() for t in ours):
        assert time.monotonic() < deadline, "the deadlines' thread outlived its server"
        time.sleep(0.05)

"""The broker's gRPC face: the server that wires the broker together, the conversion and admin
services, the wire's messages, authentication, per-RPC limits, listeners, the answer's drain
deadline and the signed provenance.

The top layer: it may import every other subpackage; only ``__main__`` imports it. Its
settings (the Unix socket, the server's bounds) are data in security/exposure.py, so that
config.py, which every layer reads, stays below it.
"""

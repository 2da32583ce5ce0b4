"""The broker's gRPC face: the server that wires the broker together, the conversion and admin
services, the wire's messages, authentication, per-RPC limits, listeners, streamed answers and
their signed provenance.

The top layer: it may import every other subpackage; only config and ``__main__`` import it.
"""

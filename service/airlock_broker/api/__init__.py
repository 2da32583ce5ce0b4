"""The broker's gRPC face: the server that wires the broker together, the conversion and admin
services, the wire's messages, authentication, per-RPC limits, listeners, the answer's drain
deadline and the signed provenance.

The top layer: it may import every other subpackage; only ``__main__``, config (the settings
of rpc_limits and local_listeners) and ops.logs (auth's PrincipalFilter) import it.
"""

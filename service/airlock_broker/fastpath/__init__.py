"""The same-host fast path: a local client hands the broker file descriptors over a Unix socket
instead of streaming bytes; the peer's identity, I/O on its descriptors on the fast path's own
threads, the filesystems it may use, and the descriptors as a conversion's ``Transfer``
(``peer_transfer``).

May import errors, tracing, security, validation, conversion's intake (intake, spool_space,
upload_limits) and its answers (peer_transfer); never api or ops.
"""

"""The same-host fast path: a local client hands the broker file descriptors over a Unix socket
instead of streaming bytes; the peer's identity, I/O on its descriptors on the fast path's own
threads, the filesystems it may use.

May import errors, security, validation and conversion's intake (intake, spool_space,
upload_limits); never api or ops.
"""

"""One conversion job, from admission to a validated output: admission and wait estimates, the
upload's intake and spool space, the format decision, the sandbox run, output validation and
integrity, idempotent replays, the audit log.

May import errors, readiness, security, sandboxes and validation; never api or ops (outputs
writes its file through fastpath.local_io, the one arrow to fastpath).
"""

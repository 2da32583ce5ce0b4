"""One conversion job, from admission to its answer: the pipeline that runs a Convert call top
to bottom (``pipeline``), admission and wait estimates, the upload's intake and spool space, the
format decision, the sandbox run, output validation and integrity, idempotent replays, the
answer on its way out (``answers``), the audit log.

May import errors, readiness, tracing, security, sandboxes and validation; never api or ops
(outputs writes its file through fastpath.local_io, the one arrow to fastpath). What the
pipeline needs from above (the wire's reading of a request, the signature, the fast path's
descriptors) it is given as objects that fit its protocols (``Edge``, ``Tickets``,
``Transfer``).
"""

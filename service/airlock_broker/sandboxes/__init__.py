"""Running a job in a sandbox: the backend protocol (``sandbox``), the Docker backend and the
engine's version gates, warm pools, a job's workspace on disk, exit watching, sandbox ids.

May import errors, tracing and security; never api, conversion, fastpath or ops.
"""

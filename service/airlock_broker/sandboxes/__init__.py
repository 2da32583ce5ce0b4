"""Running a job in a sandbox: the backend protocol (``sandbox``) and the confinement it reports,
the Docker backend (``docker_sandbox``, ``docker_hardening``, ``owners``; chosen in
``backends``), the engine's version gates, warm pools and the engine watch, a job's workspace
on disk, exit watching, sandbox ids.

May import errors, readiness, tracing and security; never api, conversion, fastpath or ops.
"""

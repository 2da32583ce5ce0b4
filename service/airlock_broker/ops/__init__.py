"""Operating the broker: the start-up self-test, the version audit (``make audit``), Prometheus
metrics, logging set-up, the public signing key's export (``airlock-broker keys export``).

May import config, conversion, sandboxes, security and validation (api imports metrics and
selftest); logs takes api.auth's PrincipalFilter, the one arrow to api.
"""

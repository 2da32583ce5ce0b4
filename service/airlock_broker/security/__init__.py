"""The broker's secrets and private state: bearer tokens (``auth_config``, ``token_command``),
the provenance signing key (``keys``), the state root's directories and their modes
(``state_dirs``).

The bottom layer: imports nothing of the broker outside this package; anything may import it.
"""

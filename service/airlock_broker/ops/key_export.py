"""``airlock-broker keys export``: the broker's public signing key, read where ``serve``
reads it.

It loads the broker's whole configuration, so it lives above config.py; security/keys.py, which
config.py imports, knows nothing of the configuration.
"""

from __future__ import annotations

from pathlib import Path

from airlock_broker.config import BrokerConfig
from airlock_broker.security.keys import SigningKeyError, load_or_create
from airlock_broker.security.state_dirs import StateDirError, prepare_key_dir


def export_public(config_path: Path | None = None) -> tuple[str, str, bool]:
    """``airlock-broker keys export``: the broker's public key PEM, its fingerprint, and whether the
    key had to be created (the same path and rules as ``airlock-broker serve``)."""
    config = BrokerConfig.load(config_path)
    try:
        prepare_key_dir(config.provenance_key_path, config.state_root)
        key, created = load_or_create(config.provenance_key_path)
    except StateDirError as exc:
        raise SigningKeyError(f"refusing the provenance key's directory: {exc}") from None
    except OSError as exc:
        raise SigningKeyError(f"cannot create the provenance key "
                              f"{config.provenance_key_path}: {exc}") from exc
    return key.public_pem, key.fingerprint, created

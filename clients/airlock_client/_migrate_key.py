"""The idempotency key ``airlock migrate`` converts a source version under.

A random key per call (``Client.convert``'s default) lets a run that was killed after the
broker converted a version, but before the twin was registered, convert it again when the run
is resumed: a second sandbox for the same version. Derived from what is converted instead, the
resumed run's request carries the key of the killed one, and within the broker's idempotency
TTL (600 s by default) it is answered with the stored result, without a sandbox. A
transformers version's files are converted one by one, each under the key of its own subject
(``models:/NAME/VERSION/FILE``) and kind. Imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json

#: Marks the key as migrate's in the broker's audit log; the digest follows.
PREFIX = "airlock-migrate-"


def conversion_key(registry_uri: str, subject: str, *, policy: str, target: str,
                   job_timeout: int, declared: str = "") -> str:
    """The key for converting ``subject`` (``models:/NAME/VERSION``, or one of its files) of
    the registry at ``registry_uri`` with these options (``declared``: a data file's kind):
    the same inputs always give the same key, and any change of them another key (the broker
    refuses a key reused with other options). ``PREFIX`` and 64 hex digits: 80 characters,
    under the broker's 128."""
    options = {"registry": registry_uri.rstrip("/"), "subject": subject, "policy": policy,
               "target": target, "job_timeout": job_timeout}
    if declared:  # absent otherwise: a version's key stays what earlier runs sent
        options["declared"] = declared
    what = json.dumps(options, sort_keys=True)
    return PREFIX + hashlib.sha256(what.encode()).hexdigest()

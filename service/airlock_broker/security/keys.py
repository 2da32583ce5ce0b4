"""The broker's provenance signing key: where it lives, how it is made, how it is checked.

One ECDSA P-256 key per broker installation, kept in the broker's state root
(``/var/lib/airlock`` for root, ``$XDG_STATE_HOME/airlock`` otherwise, ``AIRLOCK_STATE_DIR``
to override: state_dirs.py; ``[provenance] key_path`` or ``AIRLOCK_PROVENANCE_KEY`` name the
file itself). The first start creates it 0600 in that 0700 directory. A key file that others
may read is refused, as ssh does: a leaked key signs anything; and so is one owned by another
user, who could have planted a key of their own and so sign anything the broker vouches for.

The key is unencrypted on disk: the broker must sign unattended. Protect the host; keep the
*public* half wherever consumers pin it (``airlock-broker keys export``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from airlock_broker.security.state_dirs import Problem, StateDirError, open_private_file

KEY_FILE_NAME = "provenance-signing-key.pem"
#: Signature scheme named in the API and the README.
ALGORITHM = "ecdsa-p256-sha256"


class SigningKeyError(Exception):
    """The key file is missing, unreadable, of the wrong kind, or exposed."""


#: The reason codes a refused key file is reported with.
_KEY_PROBLEMS = {Problem.WRONG_OWNER: "KEY_WRONG_OWNER", Problem.OPEN_MODE: "KEY_OPEN_MODE",
                 Problem.SYMLINK: "KEY_IS_SYMLINK", Problem.HARD_LINKED: "KEY_HARD_LINKED",
                 Problem.NOT_REGULAR: "KEY_NOT_REGULAR"}
_REPLACED = " (if it is removed, a new key is made and consumers must pin its public half again)"


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """Lower-case hex sha256 of the PEM SubjectPublicKeyInfo: the key's stable name.

    The same value OpenSSF model-signing puts in a bundle as the key ``hint`` and checks.
    """
    pem = public_key.public_bytes(serialization.Encoding.PEM,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


@dataclass(frozen=True)
class SigningKey:
    """A loaded private key and the names of its public half."""

    private_key: ec.EllipticCurvePrivateKey
    path: Path

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    @property
    def public_pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """A DER-encoded ECDSA P-256 / SHA-256 signature over ``message``."""
        return self.private_key.sign(message, ec.ECDSA(hashes.SHA256()))


def load_key(path: Path) -> SigningKey:
    """Load an existing key, refusing a link, a hard-linked file, one that another user owns,
    or one that group or others can read or write (``state_dirs.open_private_file``)."""
    try:
        fd = open_private_file(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SigningKeyError(f"no provenance key at {path}") from None
    except StateDirError as exc:
        code = _KEY_PROBLEMS.get(exc.problem, exc.problem.value)
        raise SigningKeyError(f"{code}: the provenance key {path}: {exc.detail}; {exc.todo}"
                              + _REPLACED) from None
    except OSError as exc:
        raise SigningKeyError(f"cannot open the provenance key {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(64 * 1024)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"the provenance key {path} is not an unencrypted PEM private key: "
                        f"{exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve,
                                                                         ec.SECP256R1):
        raise SigningKeyError(f"the provenance key {path} is not an ECDSA P-256 key")
    return SigningKey(private_key=key, path=path)


def create_key(path: Path) -> SigningKey:
    """Generate a P-256 key at ``path`` (0600, parent 0700); never overwrites a file.

    Written to a temp file in the same directory and hard-linked into place, so two brokers
    starting at once cannot both win, and nobody ever reads a half-written key.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd, tmp = tempfile.mkstemp(prefix=".key-", dir=path.parent)  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # FileExistsError if another process got there first
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return SigningKey(private_key=key, path=path)


def load_or_create(path: Path) -> tuple[SigningKey, bool]:
    """The key at ``path``, created if there is none; the flag says whether it was created."""
    if not path.exists() and not path.is_symlink():
        try:
            return create_key(path), True
        except FileExistsError:
            pass  # a concurrent start created it: load that one
    return load_key(path), False


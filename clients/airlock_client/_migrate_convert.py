"""One conversion for ``airlock migrate``, and whether its output may be registered.

The broker converts a source version's files with ``models:/NAME/VERSION`` signed into the
provenance; the record is then verified with the pinned key, whatever key ``convert`` verified
with, because what passes goes into a registry: signature, the output's sha256 and size, this
very subject and source bytes. A conversion the broker refused or failed, or an output that
does not verify, is a :class:`Failure`; only the broker or the credentials going away raise
(see ``_migrate_version``). No registry calls here.

A version holding a Hugging Face model directory (an MLflow transformers model with PyTorch
weights) is converted file by file (``convert_directory_verified``); the output directory is
verified as a whole with the pinned key and against the source's own files (``_twin_dir``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from airlock_client._errors import (
    CLIENT_ERROR,
    AccessDenied,
    AirlockError,
    ConversionError,
    IntegrityError,
    ModelSourceError,
    ServiceUnavailable,
)
from airlock_client._migrate_options import Convert, ConvertDirectory
from airlock_client._migrate_report import Status
from airlock_client._twin_dir import check_directory_source, source_files
from airlock_client._types import ConversionResult
from airlock_client.model_dir import DATA_FILE_REFUSED
from airlock_client.provenance import (
    ProvenanceError,
    ProvenanceRecord,
    check_output,
    check_source,
    verify_envelope,
)
from airlock_client.verify_dir import VerifiedDirectory, verify_directory


@dataclass(frozen=True)
class Failure:
    """Why a conversion's output is not registered: what the source version is tagged with."""

    status: Status
    reason: str
    message: str


def convert_verified(convert: Convert, model_dir: Path, output: Path, subject: str,
                     public_key: EllipticCurvePublicKey, *, source_sha256: str | None,
                     ) -> tuple[ConversionResult, ProvenanceRecord] | Failure:
    """Convert ``model_dir`` into ``output`` as ``subject``; the result and its signed record
    once they verify with ``public_key``. ``source_sha256``: what the signed input must be,
    when the caller hashed the source (else the one the broker answered with)."""
    try:
        result = convert(model_dir, output, subject)
    except (ServiceUnavailable, AccessDenied):
        raise
    except ConversionError as exc:
        status = Status.REJECTED if exc.kind == "rejected" else Status.FAILED
        return Failure(status, exc.reason, exc.message)
    except AirlockError as exc:  # provenance or stream integrity: refuse the output
        status = Status.REJECTED if isinstance(exc, IntegrityError) else Status.FAILED
        return Failure(status, getattr(exc, "reason", "") or CLIENT_ERROR, str(exc))
    except OSError as exc:
        return Failure(Status.FAILED, CLIENT_ERROR, f"{type(exc).__name__}: {exc}")
    if not result.provenance:
        return Failure(Status.FAILED, "PROVENANCE_MISSING",
                       "the broker returned no signed provenance")
    try:  # with the pinned key, whatever key ``convert`` used: this goes into a registry
        record = verify_envelope(result.provenance, public_key)
        check_output(record, sha256=result.sha256, size=result.size)
        check_source(record, subject=subject, sha256=source_sha256 or result.input_sha256)
    except ProvenanceError as exc:
        return Failure(Status.REJECTED, exc.reason, exc.message)
    return result, record


def convert_directory_verified(convert: ConvertDirectory, model_dir: Path, output: Path,
                               subject: str, public_key: EllipticCurvePublicKey,
                               ) -> VerifiedDirectory | Failure:
    """Convert the model directory in ``model_dir`` into the new directory ``output`` as
    ``subject``; the output, once it verifies as a whole with ``public_key`` and as the
    conversion of ``model_dir``'s own files (``_twin_dir``)."""
    try:
        source = source_files(model_dir)
        result = convert(model_dir, output, subject)
    except (ServiceUnavailable, AccessDenied):
        raise
    except ModelSourceError as exc:  # refused before anything was sent
        return Failure(Status.REJECTED, exc.reason, exc.message)
    except AirlockError as exc:  # a shard or data file's refusal (its name is in the message)
        rejected = getattr(exc, "kind", "") == "rejected" or isinstance(exc, IntegrityError)
        return Failure(Status.REJECTED if rejected else Status.FAILED,
                       getattr(exc, "reason", "") or CLIENT_ERROR, exc.message)
    except OSError as exc:
        return Failure(Status.FAILED, CLIENT_ERROR, f"{type(exc).__name__}: {exc}")
    refused = [s for s in result.skipped if s.name.rpartition("/")[2] in source.data
               and s.name.rpartition("/")[2] not in result.carried]
    if refused:  # its twin would miss it (a converter without all_data_files left it out)
        return Failure(Status.REJECTED, DATA_FILE_REFUSED,
                       f"{len(refused)} data file(s) are not what their names say, such as "
                       f"{refused[0].name}: {refused[0].why}")
    try:  # with the pinned key, whatever key ``convert`` used: this goes into a registry
        verified = verify_directory(output, public_key)
        check_directory_source(verified, source, subject)
    except ProvenanceError as exc:
        return Failure(Status.REJECTED, exc.reason, exc.message)
    return verified

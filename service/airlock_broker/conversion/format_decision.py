"""What an upload is and which sandbox profile converts it: decided once, on the host, from
the leading bytes and the caller's declaration, before any sandbox is involved.

No archive parser runs here (DESIGN §1.1, issue 11 §2). A zip's central directory is attacker
data (a Zip64 record can claim millions of entries behind a classic record that claims one),
so what is inside a zip is the sandbox's business: a zip is an MLflow bundle only because the
caller declared ``mlflow`` (the client does for the directories it packs), and the bundle's
flavor, which picks the warm sandbox, is the caller's hint. The worker decides what the file
really is and refuses a bundle that is not what was declared, with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from airlock_broker.errors import Reason, error
from airlock_sandbox.formats import (
    MLFLOW_FLAVOR_PROFILES,
    ArtifactFormat,
    admits,
    detect_prefix,
    profile_for,
)


@dataclass(frozen=True)
class Decision:
    """The host's view of an artifact, carried through the job (never recomputed)."""

    format: ArtifactFormat
    #: The worker profile (airlock_sandbox.formats.PROFILES) whose sandbox converts it.
    profile: str


def check_flavor_hint(declared: str | None, flavor: str) -> str | None:
    """The caller's MLflow flavor hint, checked for form (not truth); None when not given."""
    if not flavor:
        return None
    if declared != ArtifactFormat.MLFLOW:
        raise error(Reason.BAD_REQUEST, f"mlflow_flavor {flavor[:20]!r} is only meaningful with "
                                        "declared_format MLFLOW")
    if flavor not in MLFLOW_FLAVOR_PROFILES:
        raise error(Reason.BAD_REQUEST, f"mlflow_flavor {flavor[:20]!r} is not one of "
                                        f"{', '.join(sorted(MLFLOW_FLAVOR_PROFILES))}")
    return flavor


def decide(prefix: bytes, size: int, declared: str | None,
           mlflow_flavor: str | None = None) -> Decision:
    """Format by magic bytes and declaration; raise UNSUPPORTED_FORMAT or FORMAT_MISMATCH.

    ``prefix`` is the upload's first bytes (airlock_sandbox.formats.PREFIX_BYTES); nothing
    else of the file is read.
    """
    detected = detect_prefix(prefix, size)
    if detected is ArtifactFormat.UNKNOWN:
        raise error(Reason.UNSUPPORTED_FORMAT,
                    "the artifact's leading bytes match no supported format (pickle, joblib, "
                    "PyTorch, numpy, ONNX, safetensors, a zip declared as an MLflow bundle)")
    if detected is ArtifactFormat.ZIP and declared == ArtifactFormat.MLFLOW:
        detected = ArtifactFormat.MLFLOW
    if declared is not None and not admits(declared, detected):
        hint = " (an MLflow bundle is a zip)" if declared == ArtifactFormat.MLFLOW else ""
        raise error(Reason.FORMAT_MISMATCH,
                    f"declared {declared}, but the leading bytes say {detected}{hint}")
    if detected is ArtifactFormat.MLFLOW and mlflow_flavor is not None:
        return Decision(detected, MLFLOW_FLAVOR_PROFILES[mlflow_flavor])
    return Decision(detected, profile_for(detected))

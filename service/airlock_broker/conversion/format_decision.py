"""What an upload is, which sandbox profile converts it and whether a second sandbox checks
its weights: decided once, on the host, from the leading bytes and the caller's declaration,
before any sandbox is involved, and carried through the job (``JobSpec.artifact_format``).
The worker re-checks the bytes against this decision; it does not decide again.

No archive parser runs here (DESIGN §1.1, issue 11 §2). A zip's central directory is attacker
data (a Zip64 record can claim millions of entries behind a classic record that claims one),
so what is inside a zip is the sandbox's business. The host narrows a zip only by what it is
told and what its first bytes say: a zip is an MLflow bundle only because the caller declared
``mlflow`` (the client does for the directories it packs), and the bundle's flavor, which
picks the warm sandbox, is the caller's hint; a zip is an ``.npz`` when the caller declared
``numpy`` or its first member's name, in its local header, ends in ``.npy``
(``formats.leads_with_npy``); a skops file, whose first member may be an array too, only
because the caller declared ``skops`` (the client does for a ``.skops`` file). The worker
lists the members and refuses a zip that is not what was decided, with a reason.

The table (``decide``; UNKNOWN and a declaration the bytes contradict are refused here)::

    leading bytes   declared                  format           profile           integrity
    pickle          -, pickle, joblib         pickle           sklearn           sklearn
    pickle          cloudpickle               pickle           sklearn           no
    compressed      -, joblib                 joblib           sklearn           sklearn
    torch legacy    -, pytorch                pytorch_legacy   torch             light
    zip             -, pytorch                zip              torch             light
    zip             torchscript               torchscript      torch             no
    zip             torch_export              torch_export     torch             no
    zip             numpy                     numpy_npz        light             no
    zip, 1st .npy   -, numpy                  numpy_npz        light             no
    zip             skops                     skops            sklearn           no
    zip             mlflow                    mlflow           by flavor hint    no
                                                               (sklearn if none)
    .npy            -, numpy                  numpy            light             no
    ONNX            -, onnx                   onnx             light             no
    safetensors     -, safetensors            safetensors      light             no
    XGBoost JSON    -                         xgboost_json     sklearn           no
    XGBoost UBJ     -                         xgboost_ubj      sklearn           no
    LightGBM text   -                         lightgbm_text    sklearn           no
    none of these   json, text, sentencepiece json, text, ...  light             no

The integrity column is the profile of the second sandbox, which reads the artifact without
executing it (conversion.integrity): the checkpoint reader needs no torch (light starts
fastest); the estimator policy loader needs scikit-learn. A pickle declared ``cloudpickle``
carries functions by value, which the policy loader never reads: no second sandbox.

A booster file has no declared format of its own (declaring any other is FORMAT_MISMATCH): its
bytes say which it is, and it is read as data, never unpickled, so no declaration narrows or
gates anything. XGBoost's old binary format (removed in xgboost 3.1) matches nothing.

A model directory's data file (airlock_sandbox.data_files) has no magic bytes: it is what its
declaration says when its leading bytes match no format, and FORMAT_MISMATCH when they match
one (a pickle named ``config.json`` is a pickle). Its sandbox checks it; its output must be
the input itself (Target.DATA, conversion/outputs.py).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from airlock_broker.errors import Reason, error
from airlock_sandbox.bundle import PICKLED_FORMATS, SERIALIZATION_HINTS
from airlock_sandbox.contract import Target
from airlock_sandbox.data_files import MAX_DATA_BYTES
from airlock_sandbox.formats import (
    DATA_FORMATS,
    MLFLOW_FLAVOR_PROFILES,
    PROFILE_LIGHT,
    PROFILE_SKLEARN,
    ArtifactFormat,
    admits,
    candidates,
    declared_data,
    detect_prefix,
    leads_with_npy,
    profile_for,
)

#: The formats a second sandbox reads without executing them (JobMode.EXTRACT_WEIGHTS), and
#: the profile it needs: PyTorch checkpoints, zip and legacy layouts (an unnarrowed zip may be
#: one), by the checkpoint reader; pickles by the estimator policy loader.
_INTEGRITY_PROFILES: dict[ArtifactFormat, str] = {
    ArtifactFormat.ZIP: PROFILE_LIGHT,
    ArtifactFormat.PYTORCH_ZIP: PROFILE_LIGHT,
    ArtifactFormat.PYTORCH_LEGACY: PROFILE_LIGHT,
    ArtifactFormat.PICKLE: PROFILE_SKLEARN,
    ArtifactFormat.JOBLIB: PROFILE_SKLEARN,
    ArtifactFormat.MLFLOW: PROFILE_SKLEARN,
}
#: MLflow flavors (the caller's hint) whose model file is a pickled estimator (or a booster
#: file, which the worker reads the same way in both sandboxes).
_VERIFIED_FLAVORS = frozenset({"sklearn", "lightgbm"})
#: A checkpoint's reading writes tensors only: it can check a safetensors output, not ONNX.
_TENSOR_READINGS = frozenset({PROFILE_LIGHT})
#: Formats whose reading goes first: a pickle or joblib file the policy loader reads whole, or
#: a checkpoint the tensor reader reads whole (nothing refused), is converted by that reading
#: alone. An MLflow bundle's reading goes first only when its client says the estimator is
#: pickled (``mlflow_serialization``, in ``decide``); without that hint it stays beside the
#: conversion (the bundle may hold a skops or booster file).
_READ_FIRST = frozenset({ArtifactFormat.PICKLE, ArtifactFormat.JOBLIB, ArtifactFormat.ZIP,
                         ArtifactFormat.PYTORCH_ZIP, ArtifactFormat.PYTORCH_LEGACY})


@dataclass(frozen=True)
class Decision:
    """The host's view of an artifact, carried through the job (never recomputed)."""

    format: ArtifactFormat
    #: The worker profile (airlock_sandbox.formats.PROFILES) whose sandbox converts it.
    profile: str
    #: Whether a second sandbox reads the artifact without executing anything, to be compared
    #: with the conversion (conversion.integrity; the operator can turn it off).
    integrity: bool
    #: Whether that reading runs before the conversion (estimator pickles and checkpoints:
    #: when the reading refuses nothing, its output is the answer and no conversion runs); an
    #: unhinted MLflow bundle's runs beside it.
    reading_first: bool = False

    @property
    def integrity_profile(self) -> str:
        """The profile of the second sandbox (when ``integrity``)."""
        return _INTEGRITY_PROFILES.get(self.format, PROFILE_LIGHT)

    @property
    def reads_tensors(self) -> bool:
        """Whether the second sandbox reads a checkpoint's tensors: its output is then a
        safetensors file, whatever the target (``AUTO`` too)."""
        return self.integrity_profile in _TENSOR_READINGS

    @property
    def reading_settles_failures(self) -> bool:
        """Whether a reading that goes first and fails (or refuses a global under
        ``safe_only``) is the job's answer: for an estimator pickle, whose every global the
        policy loader allows, a full load would fail the same way. A checkpoint's reading
        knows fewer layouts than torch (a zip that is no checkpoint, a pickled module): when
        it does not convert the whole file, the conversion runs and is compared with it."""
        return not self.reads_tensors

    def reads_first(self, outputs_on_disk: bool) -> bool:
        """Whether the reading goes first in a job whose sandboxes write to disk or not. On
        disk a checkpoint's reading reports only its data's digest (JobSpec.data_digest_only:
        a shard then costs the disk N bytes, not 2 N), which cannot be an answer: it stays
        beside the conversion."""
        return self.reading_first and (self.reading_settles_failures or not outputs_on_disk)

    def target_for(self, requested: Target) -> Target:
        """The output the job may produce for a caller that asked for ``requested``: a data
        file's is the file itself (``AUTO`` means it), and nothing else's is; BAD_REQUEST for
        the other combinations."""
        data = self.format in DATA_FORMATS
        if data and requested in (Target.AUTO, Target.DATA):
            return Target.DATA
        if data or requested is Target.DATA:
            raise error(Reason.BAD_REQUEST,
                        f"target {requested.value} does not apply to {self.format.value}: a "
                        "data file (json, text, sentencepiece) is carried as it is (target "
                        "data or auto), and nothing else has target data")
        return requested

    def verifies(self, target: Target) -> bool:
        """Whether the second sandbox can check an output of ``target``."""
        if not self.integrity:
            return False
        return not self.reads_tensors or target in (Target.AUTO, Target.SAFETENSORS)


def check_flavor_hint(declared: str | None, flavor: str) -> str | None:
    """The caller's MLflow flavor hint, checked for form (not truth); None when not given."""
    return _hint("mlflow_flavor", flavor, declared == ArtifactFormat.MLFLOW,
                 "declared_format MLFLOW", MLFLOW_FLAVOR_PROFILES)


def check_serialization_hint(flavor: str | None, serialization: str) -> str | None:
    """The caller's hint of how an MLflow estimator is stored, checked for form (not truth);
    None when not given."""
    return _hint("mlflow_serialization", serialization, flavor in _VERIFIED_FLAVORS,
                 "mlflow_flavor sklearn or lightgbm", SERIALIZATION_HINTS)


def _hint(field: str, value: str, applies: bool, needs: str,
          allowed: Collection[str]) -> str | None:
    if not value:
        return None
    if not applies:
        raise error(Reason.BAD_REQUEST,
                    f"{field} {value[:20]!r} is only meaningful with {needs}")
    if value not in allowed:
        raise error(Reason.BAD_REQUEST,
                    f"{field} {value[:20]!r} is not one of {', '.join(sorted(allowed))}")
    return value


def decide(prefix: bytes, size: int, declared: str | None,
           mlflow_flavor: str | None = None,
           mlflow_serialization: str | None = None) -> Decision:
    """Format by magic bytes and declaration; raise UNSUPPORTED_FORMAT or FORMAT_MISMATCH.

    ``prefix`` is the upload's first bytes (airlock_sandbox.formats.PREFIX_BYTES); nothing
    else of the file is read.
    """
    detected = detect_prefix(prefix, size)
    data = declared_data(declared)
    if data is not None:
        return _data_file(detected, size, declared or "", data)
    if detected is ArtifactFormat.UNKNOWN:
        raise error(Reason.UNSUPPORTED_FORMAT,
                    "the artifact's leading bytes match no supported format (pickle, joblib, "
                    "PyTorch, numpy, ONNX, safetensors, XGBoost JSON or UBJ, LightGBM text, "
                    "a zip declared as an MLflow bundle)")
    if detected is ArtifactFormat.ZIP and declared == ArtifactFormat.MLFLOW:
        detected = ArtifactFormat.MLFLOW
    if declared is not None and not admits(declared, detected):
        hint = " (an MLflow bundle is a zip)" if declared == ArtifactFormat.MLFLOW else ""
        raise error(Reason.FORMAT_MISMATCH,
                    f"declared {declared}, but the leading bytes say {detected}{hint}")
    if detected is ArtifactFormat.ZIP:
        detected = _narrow_zip(prefix, declared)
    if detected is ArtifactFormat.MLFLOW:
        # The pickled estimator of a bundle is read a second time; only the caller's hints
        # say what the bundle holds (the host does not open it). A wrong hint can only fail
        # the job (a reading that finds no pickle) or lower its assurance (no reading).
        pickled = mlflow_serialization in PICKLED_FORMATS
        integrity = mlflow_flavor in _VERIFIED_FLAVORS and (mlflow_serialization is None
                                                            or pickled)
        return Decision(detected, MLFLOW_FLAVOR_PROFILES.get(mlflow_flavor or "", PROFILE_SKLEARN),
                        integrity=integrity, reading_first=integrity and pickled)
    integrity = detected in _INTEGRITY_PROFILES and declared != "cloudpickle"
    return Decision(detected, profile_for(detected), integrity=integrity,
                    reading_first=integrity and detected in _READ_FIRST)


def _data_file(detected: ArtifactFormat, size: int, declared: str,
               kind: ArtifactFormat) -> Decision:
    if detected is not ArtifactFormat.UNKNOWN:
        raise error(Reason.FORMAT_MISMATCH,
                    f"declared {declared}, but the leading bytes say {detected}")
    if size > MAX_DATA_BYTES:
        raise error(Reason.TOO_LARGE, f"the data file is {size} bytes; a data file is carried "
                                      f"up to {MAX_DATA_BYTES} bytes")
    return Decision(kind, PROFILE_LIGHT, integrity=False)


def _narrow_zip(prefix: bytes, declared: str | None) -> ArtifactFormat:
    """A zip's format when the declaration leaves one candidate, or the first member says
    ``.npz`` and the declaration allows it; else ZIP, for the sandbox to tell apart."""
    possible = candidates(ArtifactFormat.ZIP, declared)
    if len(possible) == 1:
        (only,) = possible
        return only
    if ArtifactFormat.NUMPY_NPZ in possible and leads_with_npy(prefix):
        return ArtifactFormat.NUMPY_NPZ
    return ArtifactFormat.ZIP

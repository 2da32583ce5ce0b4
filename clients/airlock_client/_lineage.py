"""The MLflow tags that tie a migrated model version to its source, in one place.

``airlock migrate`` writes them; the next run reads them to find which versions claim to be
twins, and ``load_verified`` reads them to find the file. They are bookkeeping, not trust:
anyone with write access to the registry can set them, so both believe only the signed
provenance (``_twin``), and a tag that disagrees with it is refused.
"""

from __future__ import annotations

from typing import Final, Literal

#: On the target registered model: marks it as Airlock's output, so ``--all`` never migrates it.
ROLE: Final = "airlock.role"
ROLE_MIGRATED: Final = "migrated"

# On every migrated (target) model version.
SOURCE_MODEL: Final = "airlock.source_model"
SOURCE_VERSION: Final = "airlock.source_version"
#: sha256 of the bytes Airlock converted for the source version (as signed in the provenance).
SOURCE_SHA256: Final = "airlock.source_sha256"
OUTPUT_SHA256: Final = "airlock.output_sha256"
OUTPUT_FORMAT: Final = "airlock.output_format"
OUTPUT_FILE: Final = "airlock.output_file"
PROVENANCE_FILE: Final = "airlock.provenance_file"
#: "format_safe_only" or "integrity_verified" (the signed record's assurance).
VERDICT: Final = "airlock.verdict"
#: "true" when the conversion ran the artifact's own code in the sandbox (a pickle loaded
#: under allow_code), else "false": the signed record's ``executed_artifact_code`` (the
#: sandbox's claim). A hostile version converted that way must not look like a clean one.
EXECUTED_CODE: Final = "airlock.executed_artifact_code"
VALIDATION: Final = "airlock.validation"
JOB_ID: Final = "airlock.job_id"
PROVENANCE_KEY: Final = "airlock.provenance_key"

# On the source model version.
MIGRATED_TO: Final = "airlock.migrated_to"
STATUS: Final = "airlock.migration_status"
REASON: Final = "airlock.migration_reason"
MESSAGE: Final = "airlock.migration_message"

#: Where a migrated version's files live under its run's artifacts.
ARTIFACT_DIR: Final = "model"
#: The one model file a migrated version holds, by format.
OUTPUT_FILES: Final[dict[str, str]] = {"onnx": "model.onnx", "safetensors": "model.safetensors"}
PROVENANCE_SUFFIX: Final = ".provenance.json"
#: MLflow caps tag values (5000 characters for model version tags); messages are cut well below.
MAX_MESSAGE: Final = 1000

OutputFormat = Literal["onnx", "safetensors"]


#: The default ``target_name`` suffix (``airlock migrate --target-suffix``).
TARGET_SUFFIX: Final = "-airlock"


def target_name(source: str, suffix: str) -> str:
    """The registered model that holds ``source``'s migrated versions."""
    return f"{source}{suffix}"


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"

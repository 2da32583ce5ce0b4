"""The MLflow tags that tie a migrated model version to its source, in one place.

``airlock migrate`` writes them; the next run reads them to find which versions claim to be
twins, and ``load_verified`` reads them to find the file. They are bookkeeping, not trust:
anyone with write access to the registry can set them, so both believe only the signed
provenance (``_twin``), and a tag that disagrees with it is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from airlock_client.provenance import ProvenanceRecord

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
#: "directory" on a twin that holds a safetensors model directory (the conversion of an MLflow
#: transformers version, file by file; see ``_twin_dir``); absent on a one-file twin, whose
#: ``OUTPUT_FILE`` is its model.
OUTPUT_LAYOUT: Final = "airlock.output_layout"
LAYOUT_DIRECTORY: Final = "directory"
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


def twin_tags(name: str, version: str, record: ProvenanceRecord,
              file_name: str) -> dict[str, str]:
    """The tags of a twin (and of its run), from the signed record of its conversion: what
    ``migrate`` writes, and what a twin's tags must say when it is checked (``_twin``)."""
    return {
        SOURCE_MODEL: name, SOURCE_VERSION: version,
        SOURCE_SHA256: record.input_sha256, OUTPUT_SHA256: record.output_sha256,
        OUTPUT_FORMAT: record.output_format, OUTPUT_FILE: file_name,
        PROVENANCE_FILE: file_name + PROVENANCE_SUFFIX,
        VERDICT: record.assurance, VALIDATION: record.validation,
        JOB_ID: record.job_id, PROVENANCE_KEY: record.key_fingerprint,
        EXECUTED_CODE: "true" if executed_code(record) else "false",
    }


def executed_code(record: ProvenanceRecord) -> bool:
    """Whether the signed record says the conversion ran the artifact's code (the sandbox's
    claim, signed: a record that does not say counts as no, as ``airlock verify`` shows it)."""
    return record.conversion.get("executed_artifact_code") is True

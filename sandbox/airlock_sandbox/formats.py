"""Artifact formats, recognised by magic bytes and never by file name (DESIGN §1.7).

``detect_prefix`` looks only at the first ``PREFIX_BYTES`` of a file, so the broker can run it
on the host: it parses nothing. A zip archive is reported as ``ZIP`` here. The broker decides
once what a job's artifact is (``airlock_broker.conversion.format_decision``) and writes that
into the job spec; the worker, inside the sandbox, lists a zip's members
(``refine_zip_names``) and checks that what it finds is among the ``candidates`` of that
decision. The host never lists an archive (DESIGN §1.1).
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterable

PREFIX_BYTES = 64
#: ``MAX_HEADER_SIZE`` of the reference safetensors parser: the largest header any consumer
#: reads (the broker's cap may not exceed it; a client reads whatever the broker allowed).
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000


class ArtifactFormat(enum.StrEnum):
    UNKNOWN = "unknown"
    PICKLE = "pickle"
    JOBLIB = "joblib"  # a compressed joblib stream (an uncompressed one is a pickle)
    ZIP = "zip"  # not refined yet (host side)
    PYTORCH_ZIP = "pytorch_zip"
    PYTORCH_LEGACY = "pytorch_legacy"
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch_export"
    NUMPY = "numpy"
    NUMPY_NPZ = "numpy_npz"
    ONNX = "onnx"
    SAFETENSORS = "safetensors"
    #: An MLflow model directory packed by the client (airlock_sandbox.bundle).
    MLFLOW = "mlflow"
    #: Native booster files: data, read without running any of the artifact's code.
    XGBOOST_JSON = "xgboost_json"
    XGBOOST_UBJ = "xgboost_ubj"  # MLflow's xgboost flavor default (model.ubj)
    LIGHTGBM_TEXT = "lightgbm_text"  # Booster.save_model; MLflow's lightgbm flavor's model.lgb
    #: skops.io.dump: a zip of ``schema.json`` and arrays, loaded with skops' trusted types.
    SKOPS = "skops"
    #: A model directory's data files (airlock_sandbox.data_files): named by the caller's
    #: declaration alone, never detected, and carried unchanged once checked.
    DATA_JSON = "json"
    DATA_TEXT = "text"
    DATA_SENTENCEPIECE = "sentencepiece"


#: The formats read as data by their library's own parser: no unpickling, no imports.
BOOSTER_FORMATS = frozenset({
    ArtifactFormat.XGBOOST_JSON, ArtifactFormat.XGBOOST_UBJ, ArtifactFormat.LIGHTGBM_TEXT,
})


#: The formats of data files: no magic bytes name them, a declaration does (format_decision).
DATA_FORMATS = frozenset({
    ArtifactFormat.DATA_JSON, ArtifactFormat.DATA_TEXT, ArtifactFormat.DATA_SENTENCEPIECE,
})


#: What a caller may declare, and which detected formats each declaration admits.
DECLARABLE: dict[str, frozenset[ArtifactFormat]] = {
    "pickle": frozenset({ArtifactFormat.PICKLE}),
    "cloudpickle": frozenset({ArtifactFormat.PICKLE}),
    "joblib": frozenset({ArtifactFormat.JOBLIB, ArtifactFormat.PICKLE}),
    "pytorch": frozenset({
        ArtifactFormat.PYTORCH_ZIP, ArtifactFormat.PYTORCH_LEGACY,
        ArtifactFormat.TORCHSCRIPT, ArtifactFormat.TORCH_EXPORT,
    }),
    "torchscript": frozenset({ArtifactFormat.TORCHSCRIPT}),
    "torch_export": frozenset({ArtifactFormat.TORCH_EXPORT}),
    "numpy": frozenset({ArtifactFormat.NUMPY, ArtifactFormat.NUMPY_NPZ}),
    "onnx": frozenset({ArtifactFormat.ONNX}),
    "safetensors": frozenset({ArtifactFormat.SAFETENSORS}),
    "mlflow": frozenset({ArtifactFormat.MLFLOW}),
    "json": frozenset({ArtifactFormat.DATA_JSON}),
    "text": frozenset({ArtifactFormat.DATA_TEXT}),
    "sentencepiece": frozenset({ArtifactFormat.DATA_SENTENCEPIECE}),
    "skops": frozenset({ArtifactFormat.SKOPS}),
}

#: The formats a host-side ZIP may turn out to be once the sandbox lists its members (an
#: MLflow bundle is not among them: it is a bundle only when declared one).
ZIP_FAMILY = frozenset({
    ArtifactFormat.PYTORCH_ZIP, ArtifactFormat.TORCHSCRIPT, ArtifactFormat.TORCH_EXPORT,
    ArtifactFormat.NUMPY_NPZ, ArtifactFormat.SKOPS,
})

# torch.save's legacy (pre-zip) format starts with a protocol-2 pickle of this magic number.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + TORCH_LEGACY_MAGIC.to_bytes(10, "little")

_COMPRESSED_MAGICS: tuple[bytes, ...] = (
    b"\x1f\x8b",  # gzip
    b"BZh",  # bz2
    b"\xfd7zXZ\x00",  # xz
    b"\x5d\x00\x00",  # lzma (alone)
    b"ZF",  # joblib < 0.10 zlib container
    b"\x04\x22\x4d\x18",  # lz4 frame
)
_ZLIB_HEADERS = frozenset({b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda"})


def detect_prefix(prefix: bytes, size: int) -> ArtifactFormat:
    """Classify a file by its first bytes and its total size. Never raises."""
    if size == 0 or not prefix:
        return ArtifactFormat.UNKNOWN
    if prefix.startswith(_TORCH_LEGACY_PREFIX):
        return ArtifactFormat.PYTORCH_LEGACY
    if prefix.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ArtifactFormat.ZIP
    if prefix.startswith(b"\x93NUMPY"):
        return ArtifactFormat.NUMPY
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return ArtifactFormat.PICKLE
    if _looks_like_safetensors(prefix, size):
        return ArtifactFormat.SAFETENSORS
    if prefix.startswith(_COMPRESSED_MAGICS) or prefix[:2] in _ZLIB_HEADERS:
        return ArtifactFormat.JOBLIB
    if _looks_like_onnx(prefix):
        return ArtifactFormat.ONNX
    return _booster(prefix)


def refine_zip_names(names: Iterable[str]) -> ArtifactFormat:
    """Tell the zip-based formats apart by member names (run inside the sandbox)."""
    listed = list(names)
    if "MLmodel" in listed:  # an MLflow bundle: MLmodel at the root (airlock_sandbox.bundle)
        return ArtifactFormat.MLFLOW
    base = {n.split("/", 1)[1] if "/" in n else n for n in listed}
    if any(n.endswith(".npy") for n in listed) and all(n.endswith(".npy") for n in listed):
        return ArtifactFormat.NUMPY_NPZ
    if "schema.json" in listed:  # skops.io.dump writes it at the root, beside its arrays
        return ArtifactFormat.SKOPS
    if "archive_format" in base or any(n.startswith("models/") for n in base):
        return ArtifactFormat.TORCH_EXPORT
    if "constants.pkl" in base or any(n.startswith("code/") for n in base):
        return ArtifactFormat.TORCHSCRIPT
    if "data.pkl" in base:
        return ArtifactFormat.PYTORCH_ZIP
    return ArtifactFormat.UNKNOWN


def admits(declared: str, detected: ArtifactFormat) -> bool:
    """Whether a declared format agrees with the detected one (host: ZIP is provisional)."""
    allowed = DECLARABLE.get(declared)
    if allowed is None:
        return False
    if detected is ArtifactFormat.ZIP:
        return bool(allowed & ZIP_FAMILY)
    return detected in allowed


def declared_data(declared: str | None) -> ArtifactFormat | None:
    """The data file format ``declared`` names, or None. A data file is one because its
    caller says so (no magic bytes name it): the broker then checks it and carries it
    unchanged, and its record is a data file's, which a client asking for a model refuses."""
    data = DECLARABLE.get(declared or "", frozenset()) & DATA_FORMATS
    return next(iter(data)) if data else None


def candidates(decided: ArtifactFormat, declared: str | None) -> frozenset[ArtifactFormat]:
    """What an artifact the broker decided is ``decided`` may turn out to be when the sandbox
    lists it: itself, or for a ``ZIP`` the zip formats the declaration admits. The broker
    narrows a ZIP to the one candidate when there is one; the worker refuses anything else."""
    if decided is not ArtifactFormat.ZIP:
        return frozenset({decided})
    if declared is None:
        return ZIP_FAMILY
    return ZIP_FAMILY & DECLARABLE.get(declared, frozenset())


#: A zip's first local file header: signature, then 22 bytes, then name and extra lengths.
_LOCAL_HEADER = struct.Struct("<4s22xHH")


def leads_with_npy(prefix: bytes) -> bool:
    """Whether a zip's first member, named in its local file header within ``prefix``, is an
    ``.npy`` array: ``numpy.savez`` names every member so, ``torch.save`` never does.

    Magic bytes of the zip's first entry, as file(1) reads an OOXML's: only the fixed header
    at offset 0 is read, never the central directory (DESIGN §1.1). A name the prefix does
    not hold whole is no evidence. A lie costs its author a refusal: the sandbox lists the
    members and refuses an archive that is not all arrays (``candidates``)."""
    if len(prefix) < _LOCAL_HEADER.size:
        return False
    signature, name_len, _extra_len = _LOCAL_HEADER.unpack_from(prefix)
    end = _LOCAL_HEADER.size + name_len
    if signature != b"PK\x03\x04" or end > len(prefix):
        return False
    name = prefix[_LOCAL_HEADER.size:end]
    return len(name) > len(b".npy") and name.endswith(b".npy")


def _looks_like_safetensors(prefix: bytes, size: int) -> bool:
    if len(prefix) < 9:
        return False
    (header_len,) = struct.unpack("<Q", prefix[:8])
    return 2 <= header_len <= size - 8 and prefix[8:9] == b"{"


def _read_varint(buf: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(buf) and shift < 64:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


# ModelProto fields: 1 ir_version (varint), 2 producer_name, 3 producer_version, 4 domain,
# 6 doc_string, 7 graph, 8 opset_import, 14 metadata_props, 20 training_info, 25 functions.
_ONNX_FIRST_TAGS = frozenset({0x08, 0x12, 0x1A, 0x22, 0x32, 0x3A, 0x42})
_ONNX_FOLLOW_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72})


def _looks_like_onnx(prefix: bytes) -> bool:
    """A serialized ModelProto: ir_version first (every exporter writes it), then a known field."""
    if prefix[:1] != b"\x08":
        return False
    parsed = _read_varint(prefix, 1)
    if parsed is None:
        return False
    ir_version, pos = parsed
    return 3 <= ir_version <= 20 and pos < len(prefix) and prefix[pos] in _ONNX_FOLLOW_TAGS


# -- native booster files -----------------------------------------------------------------
#
# XGBoost writes its model as one JSON (or UBJSON) object whose keys are sorted (a std::map):
# ``{"learner":{"attributes":{...},...},"version":[3,2,0]}``. The prefix must open exactly
# so, the first key "learner" holding an object whose first key is "attributes": a JSON file
# that merely mentions "learner" is not a model. The end of the file is the worker's check
# (:func:`booster_tail_problem`): the host reads no more than the prefix.

_XGBOOST_JSON = re.compile(rb'\{\s*"learner"\s*:\s*\{\s*"attributes"\s*:\s*\{')
#: UBJSON integer markers and their widths: what a key's length may be written as.
_UBJ_INTS = {b"i": 1, b"U": 1, b"I": 2, b"l": 4, b"L": 8}
#: LightGBM's text model (GBDT::SaveModelToString) opens with its submodel and version lines.
_LIGHTGBM_TEXT = re.compile(rb"tree\nversion=v[0-9]{1,3}\n")
#: Bytes from a booster file's end that the worker checks.
TAIL_BYTES = 64
_XGBOOST_JSON_TAIL = re.compile(
    rb'"version"\s*:\s*\[\s*[0-9]{1,4}\s*,\s*[0-9]{1,4}\s*,\s*[0-9]{1,4}\s*\]\s*\}\s*\Z')
#: ``version`` as a UBJ key (its length 7 ends the length field), opening an array.
_XGBOOST_UBJ_TAIL = b"\x07version["
#: Written after the last tree; a text model cut short before it has lost trees.
LIGHTGBM_END_OF_TREES = b"\nend of trees\n"


def _booster(prefix: bytes) -> ArtifactFormat:
    if _XGBOOST_JSON.match(prefix):
        return ArtifactFormat.XGBOOST_JSON
    if _LIGHTGBM_TEXT.match(prefix):
        return ArtifactFormat.LIGHTGBM_TEXT
    if prefix[:1] == b"{":
        first = _ubj_key(prefix, 1)
        if first is not None and first[0] == b"learner" and prefix[first[1]:first[1] + 1] == b"{":
            second = _ubj_key(prefix, first[1] + 1)
            if second is not None and second[0] == b"attributes" \
                    and prefix[second[1]:second[1] + 1] == b"{":
                return ArtifactFormat.XGBOOST_UBJ
    return ArtifactFormat.UNKNOWN


def _ubj_key(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    """A UBJSON object key at ``pos`` (an integer-typed length, then the bytes), and the
    position after it; None when ``buf`` does not hold one whole."""
    width = _UBJ_INTS.get(buf[pos:pos + 1])
    if width is None or pos + 1 + width > len(buf):
        return None
    signed = buf[pos:pos + 1] != b"U"
    length = int.from_bytes(buf[pos + 1:pos + 1 + width], "big", signed=signed)
    start = pos + 1 + width
    if length < 0 or start + length > len(buf):
        return None
    return buf[start:start + length], start + length


_BOOSTER_NAMES = {
    ArtifactFormat.XGBOOST_JSON: "an XGBoost JSON model",
    ArtifactFormat.XGBOOST_UBJ: "an XGBoost UBJ model",
    ArtifactFormat.LIGHTGBM_TEXT: "a LightGBM text model",
}


def booster_tail_problem(fmt: ArtifactFormat, tail: bytes, trees_ended: bool = True,
                         has_nul: bool = False) -> str | None:
    """Why a booster file whose prefix matched is not whole, or None. XGBoost: its last
    :data:`TAIL_BYTES` (``tail``) must close with the version record. LightGBM: its text must
    hold :data:`LIGHTGBM_END_OF_TREES` (``trees_ended``: feature importances and parameters
    of any length follow that line, so the worker scans for it) and no NUL byte
    (``has_nul``). Refused before a parser reads it: LightGBM's aborts the whole process on
    a tree cut in half, and loops until the deadline on a NUL byte (lightgbm 4.7)."""
    if fmt is ArtifactFormat.XGBOOST_JSON:
        whole = _XGBOOST_JSON_TAIL.search(tail) is not None
    elif fmt is ArtifactFormat.XGBOOST_UBJ:
        whole = tail.endswith(b"}") and _XGBOOST_UBJ_TAIL in tail
    elif fmt is ArtifactFormat.LIGHTGBM_TEXT:
        if has_nul:
            return (f"it opens as {_BOOSTER_NAMES[fmt]} but holds NUL bytes, which no text "
                    "model has")
        if not trees_ended:
            return (f"it opens as {_BOOSTER_NAMES[fmt]} but has no 'end of trees' line: "
                    "cut short, or not a model")
        return None
    else:
        return None
    return None if whole else (f"it opens as {_BOOSTER_NAMES[fmt]} but does not end with "
                               "its version record: cut short, or not a model")


#: Worker profiles: which libraries a container imports before its job arrives. The profile
#: follows from the format, so a warm container of the right kind can be waiting.
PROFILE_SKLEARN = "sklearn"
PROFILE_TORCH = "torch"
PROFILE_LIGHT = "light"
PROFILES = (PROFILE_SKLEARN, PROFILE_TORCH, PROFILE_LIGHT)

_PROFILE_OF: dict[ArtifactFormat, str] = {
    ArtifactFormat.PICKLE: PROFILE_SKLEARN,
    ArtifactFormat.JOBLIB: PROFILE_SKLEARN,
    ArtifactFormat.ZIP: PROFILE_TORCH,
    ArtifactFormat.PYTORCH_ZIP: PROFILE_TORCH,
    ArtifactFormat.PYTORCH_LEGACY: PROFILE_TORCH,
    ArtifactFormat.TORCHSCRIPT: PROFILE_TORCH,
    ArtifactFormat.TORCH_EXPORT: PROFILE_TORCH,
    ArtifactFormat.NUMPY: PROFILE_LIGHT,
    ArtifactFormat.NUMPY_NPZ: PROFILE_LIGHT,
    ArtifactFormat.ONNX: PROFILE_LIGHT,
    ArtifactFormat.SAFETENSORS: PROFILE_LIGHT,
    ArtifactFormat.MLFLOW: PROFILE_SKLEARN,  # unless the caller's flavor hint says otherwise
    # onnxmltools and ONNX Runtime are warm there, and scikit-learn, which xgboost and
    # lightgbm import; the light profile would pay ~2.4 CPU-s of imports per job instead.
    ArtifactFormat.XGBOOST_JSON: PROFILE_SKLEARN,
    ArtifactFormat.XGBOOST_UBJ: PROFILE_SKLEARN,
    ArtifactFormat.LIGHTGBM_TEXT: PROFILE_SKLEARN,
    ArtifactFormat.SKOPS: PROFILE_SKLEARN,
}
#: An MLflow bundle's profile by the flavor the caller says it is (a hint: the broker opens
#: no archive, the worker refuses a bundle of another flavor). ONNX bundles read ``MLmodel``
#: with yaml, which the sklearn profile has imported.
MLFLOW_FLAVOR_PROFILES: dict[str, str] = {
    "sklearn": PROFILE_SKLEARN,
    "pytorch": PROFILE_TORCH,
    "onnx": PROFILE_SKLEARN,
    "xgboost": PROFILE_SKLEARN,
    "lightgbm": PROFILE_SKLEARN,
}


def profile_for(fmt: ArtifactFormat) -> str:
    """The worker profile for a detected format (UNKNOWN never reaches a sandbox)."""
    return _PROFILE_OF.get(fmt, PROFILE_LIGHT)

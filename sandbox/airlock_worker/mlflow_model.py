"""An MLflow bundle, read inside the sandbox without trusting the client that packed it:
every member is re-checked (airlock_sandbox.bundle) before any is read, ``MLmodel`` is parsed
with ``yaml.safe_load`` under a size cap, and the flavor decides which single member holds
the model. Nothing of the model is imported: not ``loader_module``, not ``code/``, not the
module named in ``pickle_module_info.txt``. MLflow itself is not in the image.

Pure planning: :func:`plan` says what to load and how; mlflow_convert.py does it.
"""

from __future__ import annotations

import json
import re
import stat
import unicodedata
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from airlock_sandbox.bundle import (
    LIGHTGBM_BOOSTER_CLASS,
    MAX_MEMBERS,
    MAX_MLMODEL_BYTES,
    MLMODEL,
    SKLEARN_FORMATS,
    SUPPORTED_LOADERS,
    BundleError,
    check_member_name,
    contained,
    convertible_flavor,
)
from airlock_sandbox.contract import TensorSpec, WorkerExit

from .errors import WorkerError

#: Bytes of a signature's JSON the worker is willing to parse.
MAX_SIGNATURE_CHARS = 256 * 1024
MAX_SIGNATURE_INPUTS = 64
TORCH_FILES = ("model.pth", "model.pt2")
DEFAULT_PICKLE_MODULE = "mlflow.pytorch.pickle_module"
_NAME = re.compile(r"[A-Za-z0-9_.:/\-]{1,128}")
_TENSOR_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32",
                            "int64", "uint8", "bool"})
#: MLflow column types (mlflow.types.DataType) that map onto one ONNX tensor type.
_COLUMN_DTYPES = {"boolean": "bool", "integer": "int32", "long": "int64", "float": "float32",
                  "double": "float64", "string": "string"}


@dataclass
class Plan:
    """What to load from a bundle: one member, as which flavor and serialization."""

    flavor: str  # "sklearn", "pytorch", "onnx", "xgboost" or "lightgbm"
    member: str
    #: sklearn: pickle / cloudpickle / skops; pytorch: pickle / pt2; onnx; xgboost: its
    #: model_format (the bytes decide between UBJ and JSON); lightgbm: text, or as sklearn.
    serialization: str
    via: str  # which MLmodel entry chose it, for the report
    inputs: tuple[TensorSpec, ...] = ()
    warnings: list[str] = field(default_factory=list)


def check_members(infos: Iterable[zipfile.ZipInfo], archive_size: int,
                  max_total_bytes: int) -> dict[str, zipfile.ZipInfo]:
    """Every rule a member must pass before any member is read; returns them by name."""
    members: dict[str, zipfile.ZipInfo] = {}
    folded: set[str] = set()
    total = 0
    for info in infos:
        if len(members) >= MAX_MEMBERS:
            raise BundleError(f"more than {MAX_MEMBERS} members")
        name = info.filename
        check_member_name(name)
        key = unicodedata.normalize("NFC", name).casefold()
        if name in members or key in folded:
            raise BundleError(f"member {name[:80]!r} appears twice (or differs only in case)")
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no type recorded (not unix)
        if info.is_dir() or kind not in (0, stat.S_IFREG):
            raise BundleError(f"member {name[:80]!r} is not a regular file (link, directory "
                              "or special file)")
        if info.flag_bits & 0x1:
            raise BundleError(f"member {name[:80]!r} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise BundleError(f"member {name[:80]!r} is compressed; bundles are stored")
        total += info.file_size
        if total > max_total_bytes or total > archive_size:
            raise BundleError("members add up to more bytes than allowed (or than the "
                              "archive holds: overlapping members)")
        members[name] = info
        folded.add(key)
    if MLMODEL not in members:
        raise BundleError(f"no {MLMODEL} at the bundle's root")
    return members


def open_members(zf: zipfile.ZipFile, archive_size: int,
                 max_total_bytes: int) -> dict[str, zipfile.ZipInfo]:
    try:
        return check_members(zf.infolist(), archive_size, max_total_bytes)
    except BundleError as exc:
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR, str(exc)) from None


def read_mlmodel(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> dict[str, Any]:
    import yaml

    info = members[MLMODEL]
    if info.file_size > MAX_MLMODEL_BYTES:
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR,
                          f"{MLMODEL} is {info.file_size} bytes (limit {MAX_MLMODEL_BYTES})")
    with zf.open(info) as fh:
        raw = fh.read(MAX_MLMODEL_BYTES + 1)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        doc = yaml.load(raw, Loader=loader)
    except yaml.YAMLError as exc:
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR,
                          f"{MLMODEL} is not valid YAML: {str(exc)[:200]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("flavors"), dict):
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR, f"{MLMODEL} has no 'flavors' mapping")
    return doc


def plan(mlmodel: dict[str, Any], members: dict[str, zipfile.ZipInfo]) -> Plan:
    """Choose the member and loader from the flavors; raise UNSUPPORTED_FLAVOR otherwise."""
    flavors: dict[str, Any] = mlmodel["flavors"]
    pyfunc = flavors.get("python_function")
    pyfunc = pyfunc if isinstance(pyfunc, dict) else {}
    flavor = convertible_flavor(flavors)  # the rule the client's hint follows too
    try:
        if flavor == "sklearn" and isinstance(flavors.get("sklearn"), dict):
            chosen = _sklearn(flavors["sklearn"], members, "flavors.sklearn")
        elif flavor == "pytorch" and isinstance(flavors.get("pytorch"), dict):
            chosen = _pytorch(flavors["pytorch"].get("model_data"), members, "flavors.pytorch")
        elif flavor == "onnx" and isinstance(flavors.get("onnx"), dict):
            chosen = _onnx(flavors["onnx"].get("data"), members, "flavors.onnx")
        elif flavor == "xgboost" and isinstance(flavors.get("xgboost"), dict):
            chosen = _xgboost(flavors["xgboost"], members, "flavors.xgboost")
        elif flavor == "lightgbm" and isinstance(flavors.get("lightgbm"), dict):
            chosen = _lightgbm(flavors["lightgbm"], members, "flavors.lightgbm")
        else:
            chosen = _from_pyfunc(pyfunc, flavors, members)
    except BundleError as exc:
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR, str(exc)) from None
    for name, conf in flavors.items():
        if isinstance(conf, dict) and conf.get("code"):
            chosen.warnings.append(f"flavor {_short(name)} ships code ({_short(conf['code'])});"
                                   " it was not imported")
    if chosen.flavor == "pytorch":
        module = pyfunc.get("pickle_module_name")
        if module not in (None, DEFAULT_PICKLE_MODULE):
            chosen.warnings.append(f"pickle_module_name {_short(module)} ignored: the standard "
                                   "unpickler was used")
    return chosen


def _sklearn(conf: dict[str, Any], members: dict[str, zipfile.ZipInfo], via: str) -> Plan:
    member = _file(conf.get("pickled_model"), members, f"{via}.pickled_model")
    serialization = conf.get("serialization_format") or "pickle"  # MLflow's own default
    if serialization not in SKLEARN_FORMATS:
        raise WorkerError(WorkerExit.UNSUPPORTED_FLAVOR,
                          f"sklearn serialization_format {_short(serialization)} is not one of "
                          f"{', '.join(sorted(SKLEARN_FORMATS))}")
    return Plan("sklearn", member, serialization, via)


def _pytorch(path: Any, members: dict[str, zipfile.ZipInfo], via: str) -> Plan:
    if path is None:
        raise BundleError(f"{via} names no model data")
    where = contained(path)
    if where in members:
        member = where
    else:
        found = [f"{where}/{n}" for n in TORCH_FILES if f"{where}/{n}" in members]
        if not found:
            raise BundleError(f"{via} = {_short(path)}: no {' or '.join(TORCH_FILES)} there")
        member = found[0]
    return Plan("pytorch", member, "pt2" if member.endswith(".pt2") else "pickle", via)


def _onnx(path: Any, members: dict[str, zipfile.ZipInfo], via: str) -> Plan:
    """ONNX is data: the passthrough validates it; its external tensors come from members."""
    return Plan("onnx", _file(path, members, f"{via}.data"), "onnx", via)


def _xgboost(conf: dict[str, Any], members: dict[str, zipfile.ZipInfo], via: str) -> Plan:
    """XGBoost's own file, whatever class wrapped it (``model_class`` is not imported)."""
    member = _file(conf.get("data"), members, f"{via}.data")
    model_format = conf.get("model_format")
    return Plan("xgboost", member, str(model_format)[:20] if model_format else "xgb", via)


def _lightgbm(conf: dict[str, Any], members: dict[str, zipfile.ZipInfo], via: str) -> Plan:
    member = _file(conf.get("data"), members, f"{via}.data")
    if conf.get("model_class", LIGHTGBM_BOOSTER_CLASS) == LIGHTGBM_BOOSTER_CLASS:
        return Plan("lightgbm", member, "text", via)
    serialization = conf.get("serialization_format") or "pickle"
    if serialization not in SKLEARN_FORMATS:
        raise WorkerError(WorkerExit.UNSUPPORTED_FLAVOR,
                          f"lightgbm serialization_format {_short(serialization)} is not one "
                          f"of {', '.join(sorted(SKLEARN_FORMATS))}")
    return Plan("lightgbm", member, serialization, via)


def _from_pyfunc(pyfunc: dict[str, Any], flavors: dict[str, Any],
                 members: dict[str, zipfile.ZipInfo]) -> Plan:
    loader = pyfunc.get("loader_module")
    kind = SUPPORTED_LOADERS.get(loader) if isinstance(loader, str) else None
    if kind is None:
        raise WorkerError(WorkerExit.UNSUPPORTED_FLAVOR, _unsupported(loader, flavors))
    data = pyfunc.get("data") if pyfunc.get("data") is not None else pyfunc.get("model_path")
    via = f"flavors.python_function (loader_module {loader})"
    if kind == "pytorch":
        return _pytorch(data, members, via)
    if kind == "onnx":
        return _onnx(data, members, via)
    if kind == "xgboost":
        return _xgboost({"data": data}, members, via)
    if kind == "lightgbm":
        return _lightgbm({"data": data}, members, via)
    member = _file(data, members, f"{via}.data")
    return Plan("sklearn", member, "skops" if member.endswith(".skops") else "pickle", via)


def _unsupported(loader: Any, flavors: dict[str, Any]) -> str:
    names = ", ".join(_short(n) for n in list(flavors)[:8]) or "none"
    if loader == "mlflow.pyfunc.model":
        what = "an arbitrary Python model (mlflow.pyfunc.PythonModel)"
    elif loader is None:
        what = "a model with no loader_module"
    else:
        what = f"loader_module {_short(loader)}"
    return (f"{what} cannot be converted: it is code, not a model format (flavors: {names}; "
            "supported: sklearn, pytorch, onnx, xgboost, lightgbm, and pyfunc wrapping one of "
            "those MLflow flavors)")


def _file(path: Any, members: dict[str, zipfile.ZipInfo], what: str) -> str:
    if path is None:
        raise BundleError(f"{what} is missing")
    where = contained(path)
    if where not in members:
        raise BundleError(f"{what} = {_short(path)} is not a file in the bundle")
    return where


def _short(value: Any, limit: int = 60) -> str:
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[:limit] + "..."


# -- the signature -> tensor specs ----------------------------------------------------------


def signature_inputs(mlmodel: dict[str, Any], warn: Any) -> tuple[TensorSpec, ...]:
    """The model's MLflow signature as input specs; () with a warning when it cannot map."""
    signature = mlmodel.get("signature")
    raw = signature.get("inputs") if isinstance(signature, dict) else None
    if raw is None:
        return ()
    try:
        if not isinstance(raw, str) or len(raw) > MAX_SIGNATURE_CHARS:
            raise ValueError("not a JSON string of bounded size")
        specs = json.loads(raw)
        if not isinstance(specs, list) or not specs or len(specs) > MAX_SIGNATURE_INPUTS:
            raise ValueError(f"expected 1..{MAX_SIGNATURE_INPUTS} inputs")
        if all(isinstance(s, dict) and s.get("type") == "tensor" for s in specs):
            return _tensor_specs(specs)
        return _column_specs(specs, warn)
    except ValueError as exc:
        warn(f"MLflow signature not used for the input types: {_short(exc, 200)}")
        return ()


def _tensor_specs(specs: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    out = []
    for i, spec in enumerate(specs):
        tensor = spec.get("tensor-spec")
        if not isinstance(tensor, dict):
            raise ValueError("a tensor input without tensor-spec")
        dtype, shape = tensor.get("dtype"), tensor.get("shape")
        if dtype not in _TENSOR_DTYPES:
            raise ValueError(f"tensor dtype {_short(dtype)} has no ONNX mapping here")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and -1 <= d < 2**31
                           for d in shape)):
            raise ValueError("tensor shape must list 1..8 dims, each -1 or a size")
        out.append(TensorSpec(_input_name(spec.get("name"), i, len(specs)), dtype, tuple(shape)))
    return tuple(out)


def _column_specs(specs: list[Any], warn: Any) -> tuple[TensorSpec, ...]:
    """Columns of one numeric type become one ``[-1, n]`` input (the model sees the columns
    in signature order); mixed columns become one ``[-1, 1]`` input each, as skl2onnx names
    a DataFrame's."""
    columns = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or spec.get("type") not in _COLUMN_DTYPES:
            kind = spec.get("type") if isinstance(spec, dict) else spec
            raise ValueError(f"column type {_short(kind)} has no ONNX mapping here")
        if spec.get("required") is False:
            raise ValueError("optional columns cannot be ONNX inputs")
        columns.append((_input_name(spec.get("name"), i, len(specs)),
                        _COLUMN_DTYPES[spec["type"]]))
    dtypes = {dtype for _, dtype in columns}
    if len(dtypes) == 1 and "string" not in dtypes:
        warn(f"signature columns {', '.join(n for n, _ in columns[:8])} are one input "
             f"'input' of shape [-1, {len(columns)}], in that order")
        return (TensorSpec("input", dtypes.pop(), (-1, len(columns))),)
    return tuple(TensorSpec(name, dtype, (-1, 1)) for name, dtype in columns)


def _input_name(name: Any, index: int, count: int) -> str:
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    return "input" if count == 1 else f"input_{index}"

"""Airlock's Python client: convert untrusted model files to ONNX / safetensors, safely.

>>> from airlock_client import Client, TensorSpec
>>> with Client("127.0.0.1:50051") as client:                    # doctest: +SKIP
...     result = client.convert("model.pkl", "model.onnx", target="onnx")
...     print(result.sha256, result.report.parity)

Importing the package loads the exception tree and nothing else: every other name is
imported the first time it is used (``__getattr__``, PEP 562), so the client (gRPC), the
provenance record (cryptography) and the safe load (onnx, onnxruntime) cost only the programs
that use them, and ``airlock --help`` starts at once.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from airlock_client._errors import (
    AccessDenied,
    AirlockError,
    ConversionError,
    IntegrityError,
    ModelSourceError,
    ProvenanceError,
    SafeLoadError,
    ServiceUnavailable,
)

if TYPE_CHECKING:
    from airlock_client._channel import DEFAULT_ADDRESS, default_address
    from airlock_client._client import Client
    from airlock_client._types import (
        Assurance,
        BusyWait,
        ConversionReport,
        ConversionResult,
        ParityCheck,
        PoolStatus,
        ProvenanceKey,
        SelfTestCheck,
        SelfTestReport,
        TensorSpec,
    )
    from airlock_client.provenance import ProvenanceRecord
    from airlock_client.safe_load import (
        VerifiedArtifact,
        VerifiedModelDirectory,
        fetch_verified,
        fetch_verified_directory,
        load_verified,
    )

#: Names imported on first use, and the module each comes from.
_LAZY = {
    **dict.fromkeys(["Assurance", "BusyWait", "ConversionReport", "ConversionResult",
                     "ParityCheck", "PoolStatus", "ProvenanceKey", "SelfTestCheck",
                     "SelfTestReport", "TensorSpec"], "_types"),
    "DEFAULT_ADDRESS": "_channel",
    "default_address": "_channel",
    "Client": "_client",
    "ProvenanceRecord": "provenance",
    "VerifiedArtifact": "safe_load",
    "VerifiedModelDirectory": "safe_load",
    "fetch_verified": "safe_load",
    "fetch_verified_directory": "safe_load",
    "load_verified": "safe_load",
}


def __getattr__(name: str) -> Any:
    # Plain import statements, not importlib: the host scan (test_host_never_deserializes)
    # sees every module this can load.
    where = _LAZY.get(name)
    module: ModuleType
    if where == "_types":
        from airlock_client import _types

        module = _types
    elif where == "_channel":
        from airlock_client import _channel

        module = _channel
    elif where == "_client":
        from airlock_client import _client

        module = _client
    elif where == "provenance":
        from airlock_client import provenance

        module = provenance
    elif where == "safe_load":
        from airlock_client import safe_load

        module = safe_load
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "DEFAULT_ADDRESS",
    "AccessDenied",
    "AirlockError",
    "Assurance",
    "BusyWait",
    "Client",
    "ConversionError",
    "ConversionReport",
    "ConversionResult",
    "IntegrityError",
    "ModelSourceError",
    "ParityCheck",
    "PoolStatus",
    "ProvenanceError",
    "ProvenanceKey",
    "ProvenanceRecord",
    "SafeLoadError",
    "SelfTestCheck",
    "SelfTestReport",
    "ServiceUnavailable",
    "TensorSpec",
    "VerifiedArtifact",
    "VerifiedModelDirectory",
    "default_address",
    "fetch_verified",
    "fetch_verified_directory",
    "load_verified",
]

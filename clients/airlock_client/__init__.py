"""Airlock's Python client: convert untrusted model files to ONNX / safetensors, safely.

>>> from airlock_client import Client, TensorSpec
>>> with Client("127.0.0.1:50051") as client:                    # doctest: +SKIP
...     result = client.convert("model.pkl", "model.onnx", target="onnx")
...     print(result.sha256, result.report.parity)
"""

from airlock_client._channel import DEFAULT_ADDRESS, default_address
from airlock_client._client import Client
from airlock_client._errors import (
    AccessDenied,
    AirlockError,
    ConversionError,
    IntegrityError,
    ModelSourceError,
    ServiceUnavailable,
)
from airlock_client._types import (
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
from airlock_client.provenance import ProvenanceError, ProvenanceRecord
from airlock_client.safe_load import (
    SafeLoadError,
    VerifiedArtifact,
    fetch_verified,
    load_verified,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "AccessDenied",
    "AirlockError",
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
    "default_address",
    "fetch_verified",
    "load_verified",
]

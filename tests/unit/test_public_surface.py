"""The client's public surface, pinned: what ``from airlock_client import *`` gives, that every
name resolves, and that every error the client raises on purpose is an ``AirlockError`` with a
``reason`` and a ``message`` (one ``except`` catches them all)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import airlock_client
from airlock.v1 import airlock_pb2 as pb
from airlock_client import AirlockError, Assurance, _errors

PUBLIC = [
    "DEFAULT_ADDRESS", "AccessDenied", "AirlockError", "Assurance", "BusyWait", "Client",
    "ConversionError", "ConversionReport", "ConversionResult", "IntegrityError",
    "ModelSourceError", "ParityCheck", "PoolStatus", "ProvenanceError", "ProvenanceKey",
    "ProvenanceRecord", "SafeLoadError", "SelfTestCheck", "SelfTestReport",
    "ServiceUnavailable", "TensorSpec", "VerifiedArtifact", "VerifiedModelDirectory",
    "default_address",
    "fetch_verified", "fetch_verified_directory", "load_verified",
]
#: Exceptions that never leave the client: Client catches it and streams over gRPC instead.
INTERNAL_SIGNALS = {"airlock_client._local_transfer.LocalTransferUnavailable"}


def test_the_public_names_are_pinned() -> None:
    # Sorted as ruff's RUF022 sorts (constants, classes, functions), which `make lint` checks.
    assert airlock_client.__all__ == PUBLIC


def test_every_public_name_resolves() -> None:
    for name in PUBLIC:
        assert getattr(airlock_client, name) is not None, name
    assert set(PUBLIC) <= set(dir(airlock_client))
    with pytest.raises(AttributeError):
        airlock_client.NoSuchName  # noqa: B018


def _client_modules() -> list[str]:
    return [f"airlock_client.{m.name}" for m in pkgutil.iter_modules(airlock_client.__path__)]


def _exception_classes() -> dict[str, type[BaseException]]:
    found = {}
    for name in _client_modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseException) \
                    and value.__module__ == name:
                found[f"{name}.{value.__qualname__}"] = value
    return found


def test_every_client_error_derives_from_the_one_base() -> None:
    classes = _exception_classes()
    assert len(classes) >= 12, sorted(classes)  # the scan found the tree
    outside = {name for name, cls in classes.items() if not issubclass(cls, AirlockError)}
    assert outside == INTERNAL_SIGNALS
    exported = [getattr(airlock_client, n) for n in PUBLIC]
    for cls in exported:
        if isinstance(cls, type) and issubclass(cls, BaseException):
            assert issubclass(cls, AirlockError), cls


def test_the_tree_in_the_docstring_names_every_error() -> None:
    for name, cls in _exception_classes().items():
        if name not in INTERNAL_SIGNALS:
            assert cls.__name__ in (_errors.__doc__ or ""), name


@pytest.mark.parametrize(("error", "reason", "text"), [
    (airlock_client.AirlockError("the broker's response did not start with a result"),
     "ERROR", "the broker's response did not start with a result"),
    (airlock_client.IntegrityError("chunk fails its CRC-32"), "INTEGRITY_ERROR",
     "chunk fails its CRC-32"),
    (airlock_client.ServiceUnavailable("cannot reach it"), "UNAVAILABLE", "cannot reach it"),
    (airlock_client.ServiceUnavailable("full", reason="BUSY"), "BUSY", "full"),
    (airlock_client.ConversionError("FORMAT_MISMATCH", "declared safetensors", kind="rejected",
                                    code="INVALID_ARGUMENT"), "FORMAT_MISMATCH",
     "FORMAT_MISMATCH: declared safetensors"),
    (airlock_client.ProvenanceError("SIGNATURE_INVALID", "not this key"), "SIGNATURE_INVALID",
     "SIGNATURE_INVALID: not this key"),
    (airlock_client.SafeLoadError("EXTERNAL_DATA", "refers to external data"), "EXTERNAL_DATA",
     "EXTERNAL_DATA: refers to external data"),
    (airlock_client.ModelSourceError("UNSAFE_MODEL_DIR", "a link"), "UNSAFE_MODEL_DIR",
     "UNSAFE_MODEL_DIR: a link"),
])
def test_every_error_has_a_reason_and_a_message(error: AirlockError, reason: str,
                                                text: str) -> None:
    assert (error.reason, str(error)) == (reason, text)
    assert error.message and error.message in str(error)


def test_assurance_names_every_value_the_protocol_has() -> None:
    assert {f"ASSURANCE_{a.name}" for a in Assurance} == set(pb.Assurance.keys())
    # A str: the CLI's JSON, the signed record and comparisons see the plain value.
    assert Assurance.INTEGRITY_VERIFIED == "integrity_verified"
    assert f"{Assurance.FORMAT_SAFE_ONLY}" == "format_safe_only"


def test_the_wire_maps_each_assurance() -> None:
    from airlock_client import _wire

    for name, value in pb.Assurance.items():
        if name != "ASSURANCE_UNSPECIFIED":
            assert _wire._ASSURANCE[value] is Assurance[name.removeprefix("ASSURANCE_")]

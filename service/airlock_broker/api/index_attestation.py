"""Signed provenance for a sharded safetensors directory's index.

``model.safetensors.index.json`` is written by the client from the shards it converted; the
broker never saw it. To sign it, the broker checks it against what it did see: the shards'
own provenance records, which it signed and which carry, for each safetensors output, the
digest of its tensor names and the size of its data (``output.tensors``). The index is
attacker data here like any request: size-capped, parsed strictly, every name bounded. A
record the broker did not sign, or that is not a safetensors output's, is refused; so is an
index that names a file without a record, gives a file other tensors than it holds, or
claims another ``metadata.total_size``. Nothing is read from disk.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from airlock_broker.api.auth import Principal
from airlock_broker.api.provenance import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    RECORD_FIELD,
    RECORD_VERSION,
    broker_version,
    created_at,
    pae,
    sign,
    single_file_statement,
)
from airlock_broker.errors import Reason, error
from airlock_broker.hostile_text import printable_name
from airlock_broker.security.keys import SigningKey
from airlock_broker.validation.safetensors_canonical import names_digest
from airlock_sandbox.strict_json import StrictJSONError, loads_strict

INDEX_NAME = "model.safetensors.index.json"
#: An index of 100 000 tensors is about 8 MiB; one request must fit the broker's 4 MiB
#: message cap with its records, and real indexes are far smaller (Llama-70B's: 60 KiB).
MAX_INDEX_BYTES = 2 * 1024 * 1024
MAX_SHARDS = 1024
#: A record is a few KiB; the client refuses anything over 256 KiB too.
MAX_RECORD_BYTES = 256 * 1024
MAX_FILE_NAME = 255
VERIFIED = "integrity_verified"


@dataclass(frozen=True)
class ShardRecord:
    """What a shard's verified record says about its output."""

    file_name: str
    job_id: str
    sha256: str
    names_sha256: str
    tensor_count: int
    data_bytes: int
    assurance: str


def attest(index: bytes, shards: Sequence[tuple[str, bytes]], subject: str, *,
           key: SigningKey, principal: Principal, created: float | None = None) -> bytes:
    """The signed record of ``index``, or BAD_REQUEST / INDEX_MISMATCH saying what is wrong."""
    if len(index) > MAX_INDEX_BYTES:
        raise error(Reason.BAD_REQUEST, f"the index is {len(index)} bytes; at most "
                                        f"{MAX_INDEX_BYTES} can be attested")
    if not 1 <= len(shards) <= MAX_SHARDS:
        raise error(Reason.BAD_REQUEST, f"{len(shards)} shard records were given; an index "
                                        f"is attested with 1 to {MAX_SHARDS}")
    records: dict[str, ShardRecord] = {}
    given: dict[bytes, str] = {}  # each shard is its own conversion: its record is its own
    for file_name, record in shards:
        name = _file_name(file_name)
        if name in records:
            raise error(Reason.BAD_REQUEST, f"two records were given for {name}")
        digest = hashlib.sha256(record).digest()
        if digest in given:
            raise error(Reason.BAD_REQUEST, f"the same record was given for {given[digest]} "
                                            f"and {name}")
        given[digest] = name
        records[name] = verified_shard(name, record, key)
    weight_map, total_size = _parse_index(index)
    _check(weight_map, total_size, records)
    return _sign_index(index, records, subject, key=key, principal=principal, created=created)


def verified_shard(name: str, provenance: bytes, key: SigningKey) -> ShardRecord:
    """A shard's provenance record, checked to be this broker's signature over a safetensors
    output's record."""
    what = f"the record of {name}"
    if len(provenance) > MAX_RECORD_BYTES:
        raise error(Reason.BAD_REQUEST, f"{what} is {len(provenance)} bytes, larger than any")
    bundle = _json(provenance, what)
    envelope = _obj(bundle, "dsseEnvelope", what)
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise error(Reason.BAD_REQUEST, f"{what} is not an in-toto DSSE envelope")
    payload = _b64(envelope.get("payload"), what)
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise error(Reason.BAD_REQUEST, f"{what} holds no signature")
    # This broker signs a record once: its signature is the first, and the only one tried
    # (a request of MAX_SHARDS records costs at most MAX_SHARDS verifications).
    entry = signatures[0]
    sig = entry.get("sig") if isinstance(entry, dict) else None
    try:
        key.public_key.verify(_b64(sig, what), pae(PAYLOAD_TYPE, payload),
                              ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise error(Reason.BAD_REQUEST, f"{what} is not signed by this broker's provenance "
                                        f"key ({key.fingerprint[:16]}...)") from None
    statement = _json(payload, what)
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise error(Reason.BAD_REQUEST, f"{what} is not a model-signing statement")
    record = _obj(_obj(statement, "predicate", what), RECORD_FIELD, what)
    output = _obj(record, "output", what)
    tensors = output.get("tensors")
    if output.get("format") != "safetensors" or not isinstance(tensors, dict):
        raise error(Reason.BAD_REQUEST, f"{what} is not the record of a safetensors output "
                                        "with its tensor names (convert it again)")
    count, data_bytes = tensors.get("count"), tensors.get("data_bytes")
    names_sha256 = tensors.get("names_sha256")
    if not (isinstance(count, int) and _is_int(count) and isinstance(data_bytes, int)
            and _is_int(data_bytes) and isinstance(names_sha256, str) and names_sha256):
        raise error(Reason.BAD_REQUEST, f"{what} does not say which tensors its file holds")
    verdicts = record.get("verdicts")
    return ShardRecord(
        file_name=name, job_id=_str(record.get("job_id")), sha256=_str(output.get("sha256")),
        names_sha256=names_sha256, tensor_count=count, data_bytes=data_bytes,
        assurance=_str(verdicts.get("assurance") if isinstance(verdicts, dict) else ""))


def _parse_index(index: bytes) -> tuple[dict[str, str], int]:
    doc = _json(index, "the index")
    weight_map = doc.get("weight_map")
    metadata = doc.get("metadata")
    if not isinstance(weight_map, dict) or not weight_map:
        raise error(Reason.BAD_REQUEST, "the index has no 'weight_map' object")
    if not isinstance(metadata, dict) or not _is_int(metadata.get("total_size")):
        raise error(Reason.BAD_REQUEST, "the index has no integer 'metadata.total_size'")
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise error(Reason.BAD_REQUEST, "the index's 'weight_map' maps a name to a non-string")
    return weight_map, metadata["total_size"]


def _check(weight_map: dict[str, str], total_size: int,
           records: dict[str, ShardRecord]) -> None:
    by_file: dict[str, list[str]] = {}
    for tensor, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(tensor)
    unrecorded = sorted(set(by_file) - set(records))
    if unrecorded:
        raise error(Reason.INDEX_MISMATCH, f"the index names {len(unrecorded)} file(s) without "
                                           f"a record: {_some(unrecorded)}")
    unnamed = sorted(set(records) - set(by_file))
    if unnamed:
        raise error(Reason.INDEX_MISMATCH, f"{len(unnamed)} record(s) are for files the index "
                                           f"does not name: {_some(unnamed)}")
    for file_name, names in sorted(by_file.items()):
        record = records[file_name]
        if len(names) != record.tensor_count or names_digest(names) != record.names_sha256:
            raise error(Reason.INDEX_MISMATCH,
                        f"the index gives {file_name} {len(names)} tensor name(s), which are "
                        f"not the {record.tensor_count} its record says it holds")
    data = sum(r.data_bytes for r in records.values())
    if total_size != data:
        raise error(Reason.INDEX_MISMATCH, f"the index's metadata.total_size is {total_size}; "
                                           f"the shards hold {data} bytes of tensor data")


def _sign_index(index: bytes, records: dict[str, ShardRecord], subject: str, *,
                key: SigningKey, principal: Principal, created: float | None) -> bytes:
    sha256 = hashlib.sha256(index).hexdigest()
    shards = [records[n] for n in sorted(records)]
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "kind": "safetensors_index",
        "broker": {"name": "airlock", "version": broker_version()},
        "created": created_at(created),
        "principal": {"name": principal.name, "method": principal.method},
        "input": {"subject": subject},
        "output": {"name": INDEX_NAME, "sha256": sha256, "size": len(index),
                   "format": "safetensors_index"},
        "shards": [{"file_name": r.file_name, "sha256": r.sha256, "job_id": r.job_id,
                    "tensors": r.tensor_count, "data_bytes": r.data_bytes,
                    "assurance": r.assurance} for r in shards],
        "verdicts": {
            # What was checked: every named file has this broker's record, each file's tensor
            # names are those validated in it, and total_size is the sum of their data.
            "validation": "passed",
            # The directory's: integrity_verified only if every shard is.
            "assurance": (VERIFIED if all(r.assurance == VERIFIED for r in shards)
                          else "format_safe_only"),
        },
    }
    return sign(single_file_statement(INDEX_NAME, sha256, record), key)


def _file_name(name: str) -> str:
    if (not name or len(name) > MAX_FILE_NAME or "/" in name or "\\" in name
            or name in {".", ".."} or printable_name(name, MAX_FILE_NAME) != name):
        raise error(Reason.BAD_REQUEST, f"{printable_name(name, 80)!r} is not a plain file name")
    return name


def _json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, StrictJSONError) as exc:
        raise error(Reason.BAD_REQUEST, f"{what} is not strict JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise error(Reason.BAD_REQUEST, f"{what} is not a JSON object")
    return doc


def _obj(doc: dict[str, Any], name: str, what: str) -> dict[str, Any]:
    value = doc.get(name)
    if not isinstance(value, dict):
        raise error(Reason.BAD_REQUEST, f"{what} has no {name!r} object")
    return value


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise error(Reason.BAD_REQUEST, f"{what}: a base64 field is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise error(Reason.BAD_REQUEST, f"{what}: a field is not base64") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _some(names: list[str], shown: int = 5) -> str:
    head = ", ".join(printable_name(n, 80) for n in names[:shown])
    return head + (f" and {len(names) - shown} more" if len(names) > shown else "")


class Attestations:
    """The attestations in progress: at most ``running`` at once, each in a worker thread of
    the event loop's executor (a request of ``MAX_SHARDS`` records costs that many signature
    verifications, a fraction of a second of CPU), at most ``waiting`` more queued behind
    them; beyond, BUSY. Without a bound, any caller with the convert role could keep every
    executor thread (which validation, answers and slot removal need) and gigabytes of
    requests in hand. One caller (``Principal.quota``) holds at most ``per_caller`` of those
    places: with the global bound alone, one caller looping on requests that fail their
    checks kept the others' attestations BUSY (12 of 21 in a review). A model directory is
    attested once, at its end: ``per_caller`` is what a caller converting a few at once
    needs."""

    def __init__(self, running: int = 2, waiting: int = 16, per_caller: int = 4) -> None:
        self.running = running
        self.waiting = waiting
        self.per_caller = per_caller
        self.calls = 0
        self._by_caller: dict[str, int] = {}
        self._slots = asyncio.Semaphore(running)

    async def attest(self, index: bytes, shards: Sequence[tuple[str, bytes]], subject: str, *,
                     key: SigningKey, principal: Principal) -> bytes:
        limit = self.running + self.waiting
        if self.calls >= limit:
            raise error(Reason.BUSY, f"{self.calls} index attestations are in progress or "
                                     f"waiting, the limit is {limit}; retry in a moment")
        caller = principal.quota
        held = self._by_caller.get(caller, 0)
        if held >= self.per_caller:
            raise error(Reason.BUSY, f"{held} index attestations of yours are in progress "
                                     f"or waiting, the limit per caller is "
                                     f"{self.per_caller}; retry once one has finished")
        self.calls += 1
        self._by_caller[caller] = held + 1
        try:
            await self._slots.acquire()
        except BaseException:  # cancelled while waiting: nothing ran
            self._leave(caller)
            raise
        # A thread cannot be stopped: a call cancelled while its attestation runs keeps its
        # places until the thread ends, or cancelling and asking again would run any number
        # at once (six threads on two cores, with the count at zero, in a review).
        work = asyncio.ensure_future(asyncio.to_thread(attest, index, shards, subject, key=key,
                                                       principal=principal))

        def finished(done: asyncio.Future[bytes]) -> None:
            self._slots.release()
            self._leave(caller)
            if not done.cancelled():
                done.exception()  # retrieved: a caller that left does not hear of it

        work.add_done_callback(finished)
        return await asyncio.shield(work)

    def _leave(self, caller: str) -> None:
        self.calls -= 1
        left = self._by_caller[caller] - 1
        if left:
            self._by_caller[caller] = left
        else:
            del self._by_caller[caller]

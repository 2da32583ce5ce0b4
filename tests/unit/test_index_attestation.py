"""The index of a sharded safetensors directory, signed only when it agrees with the shards'
own provenance records (which the broker signed): every file it names has a record, each
file gets exactly the tensor names validated in it, and total_size is their data; records
of another key or another kind of output, and hostile file names, are refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from airlock_broker.api import index_attestation
from airlock_broker.api.auth import Principal
from airlock_broker.api.provenance import sign, single_file_statement
from airlock_broker.errors import AirlockError
from airlock_broker.security.keys import SigningKey
from airlock_broker.validation.safetensors_canonical import names_digest
from airlock_client import _hf_dir
from airlock_client import provenance as client_provenance

PRINCIPAL = Principal(name="trainer", method="token", roles=frozenset())
SHARDS = {"model-00001-of-00002.safetensors": (["embed", "layer.0"], 96),
          "model-00002-of-00002.safetensors": (["layer.1", "lm_head"], 64)}


def _key(tmp_path: Path, name: str = "key") -> SigningKey:
    return SigningKey(private_key=ec.generate_private_key(ec.SECP256R1()),
                      path=tmp_path / f"{name}.pem")


def _record(key: SigningKey, names: list[str], data_bytes: int, *, fmt: str = "safetensors",
            assurance: str = "integrity_verified", tensors: Any = True) -> bytes:
    sha = hashlib.sha256(json.dumps(names).encode()).hexdigest()
    output: dict[str, Any] = {"name": "model.safetensors", "sha256": sha, "size": 1000,
                              "format": fmt}
    if tensors is True:
        output["tensors"] = {"count": len(names), "data_bytes": data_bytes,
                             "names_sha256": names_digest(names)}
    record = {"record_version": 2, "job_id": f"job-{names[0]}", "output": output,
              "verdicts": {"validation": "passed", "assurance": assurance}}
    return sign(single_file_statement("model.safetensors", sha, record), key)


def _index(layout: dict[str, tuple[list[str], int]], total: int | None = None) -> bytes:
    weight_map = {n: f for f, (names, _) in layout.items() for n in names}
    size = sum(b for _, b in layout.values()) if total is None else total
    return json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}).encode()


def _records(key: SigningKey, layout: dict[str, tuple[list[str], int]],
             **kwargs: Any) -> list[tuple[str, bytes]]:
    return [(f, _record(key, names, size, **kwargs)) for f, (names, size) in layout.items()]


def _attest(index: bytes, records: list[tuple[str, bytes]], key: SigningKey) -> bytes:
    return index_attestation.attest(index, records, "models:/tiny/1", key=key,
                                    principal=PRINCIPAL)


def test_an_index_that_agrees_with_its_records_is_signed(tmp_path: Path) -> None:
    key = _key(tmp_path)
    index = _index(SHARDS)
    envelope = _attest(index, _records(key, SHARDS), key)
    record = client_provenance.verify(index, envelope, key.public_key, index=True)
    assert record.kind == "safetensors_index" and record.output_size == len(index)
    assert record.subject == "models:/tiny/1" and record.principal == "trainer"
    assert [s["file_name"] for s in record.shards] == sorted(SHARDS)
    assert [s["tensors"] for s in record.shards] == [2, 2]
    assert record.assurance == "integrity_verified" and record.validation == "passed"
    with pytest.raises(client_provenance.ProvenanceError):  # bound to these bytes
        client_provenance.verify(index + b" ", envelope, key.public_key, index=True)


def test_the_weakest_shard_names_the_index_assurance(tmp_path: Path) -> None:
    key = _key(tmp_path)
    records = _records(key, SHARDS)
    names, size = SHARDS["model-00002-of-00002.safetensors"]
    records[1] = (records[1][0], _record(key, names, size, assurance="format_safe_only"))
    envelope = _attest(_index(SHARDS), records, key)
    record = client_provenance.verify(_index(SHARDS), envelope, key.public_key, index=True)
    assert record.assurance == "format_safe_only"


def _moved(layout: dict[str, tuple[list[str], int]]) -> dict[str, tuple[list[str], int]]:
    """lm_head claimed by the first file, which does not hold it."""
    (first, (a, sa)), (second, (b, sb)) = layout.items()
    return {first: ([*a, "lm_head"], sa), second: ([n for n in b if n != "lm_head"], sb)}


@pytest.mark.parametrize(("change", "says"), [
    ("tensor moved", "tensor name"),
    ("tensor invented", "tensor name"),
    ("total_size", "total_size is 161"),
    ("file without record", "without a record"),
    ("record not named", "does not name"),
])
def test_an_index_that_disagrees_is_refused(tmp_path: Path, change: str, says: str) -> None:
    key = _key(tmp_path)
    records = _records(key, SHARDS)
    index = _index(SHARDS)
    if change == "tensor moved":
        index = _index(_moved(SHARDS))
    elif change == "tensor invented":
        layout = dict(SHARDS)
        layout["model-00002-of-00002.safetensors"] = (["layer.1", "lm_head", "evil"], 64)
        index = _index(layout)
    elif change == "total_size":
        index = _index(SHARDS, total=161)
    elif change == "file without record":
        records = records[:1]
    elif change == "record not named":
        index = _index({k: v for k, v in list(SHARDS.items())[:1]}, total=160)
    with pytest.raises(AirlockError) as caught:
        _attest(index, records, key)
    assert caught.value.reason == "INDEX_MISMATCH", caught.value.message
    assert says in caught.value.message


@pytest.mark.parametrize("change", ["another key", "an onnx record", "no tensors",
                                    "not json", "tampered payload"])
def test_a_record_this_broker_did_not_sign_for_a_shard_is_refused(tmp_path: Path,
                                                                   change: str) -> None:
    key = _key(tmp_path)
    records = _records(key, SHARDS)
    names, size = SHARDS["model-00001-of-00002.safetensors"]
    name = records[0][0]
    if change == "another key":
        records[0] = (name, _record(_key(tmp_path, "other"), names, size))
    elif change == "an onnx record":
        records[0] = (name, _record(key, names, size, fmt="onnx"))
    elif change == "no tensors":
        records[0] = (name, _record(key, names, size, tensors=False))
    elif change == "not json":
        records[0] = (name, b"\xff not a record")
    else:  # the payload changed after signing: the signature no longer holds
        bundle = json.loads(records[0][1])
        bundle["dsseEnvelope"]["payload"] = bundle["dsseEnvelope"]["payload"][::-1]
        records[0] = (name, json.dumps(bundle).encode())
    with pytest.raises(AirlockError) as caught:
        _attest(_index(SHARDS), records, key)
    assert caught.value.reason == "BAD_REQUEST", caught.value.message


@pytest.mark.parametrize("name", ["../model.safetensors", "a/b.safetensors", "..", "",
                                  "x\x1b[2J.safetensors", "a\\b"])
def test_a_shard_file_name_that_is_not_plain_is_refused(tmp_path: Path, name: str) -> None:
    key = _key(tmp_path)
    names, size = SHARDS["model-00001-of-00002.safetensors"]
    with pytest.raises(AirlockError) as caught:
        _attest(_index({name: (names, size)}), [(name, _record(key, names, size))], key)
    assert caught.value.reason == "BAD_REQUEST"


@pytest.mark.parametrize("index", [
    b'{"weight_map": {"a": "f"}, "weight_map": {"a": "g"}, "metadata": {"total_size": 1}}',
    b'{"weight_map": {}, "metadata": {"total_size": 0}}',
    b'{"weight_map": {"a": "f"}, "metadata": {"total_size": NaN}}',
    b'{"weight_map": {"a": 1}, "metadata": {"total_size": 1}}',
    b'[1, 2]',
    b" " * (index_attestation.MAX_INDEX_BYTES + 1),
])
def test_a_malformed_index_is_refused(tmp_path: Path, index: bytes) -> None:
    key = _key(tmp_path)
    with pytest.raises(AirlockError) as caught:
        _attest(index, _records(key, SHARDS), key)
    assert caught.value.reason == "BAD_REQUEST"


def test_the_names_digest_does_not_depend_on_order_and_tells_names_apart() -> None:
    assert names_digest(["b", "a"]) == names_digest(["a", "b"])
    assert names_digest(["a,b"]) != names_digest(["a", "b"])
    assert names_digest(["a\nb"]) != names_digest(["a", "b"])


def test_the_client_refuses_up_front_what_the_broker_would_not_attest() -> None:
    """A directory whose index the broker would refuse to sign is refused by the client while
    it inspects the directory, not after every shard has been converted."""
    assert _hf_dir.MAX_INDEX_BYTES == index_attestation.MAX_INDEX_BYTES
    assert _hf_dir.MAX_SHARDS == index_attestation.MAX_SHARDS


def test_one_record_given_for_two_shards_or_with_extra_signatures_is_refused(
        tmp_path: Path) -> None:
    """Each shard is its own conversion with its own record, which this broker signed once:
    a record repeated, or one with junk signatures before the broker's, was a cheap way to
    make one call cost thousands of signature verifications."""
    key = _key(tmp_path)
    records = _records(key, SHARDS)
    repeated = [records[0], (records[1][0], records[0][1])]
    with pytest.raises(AirlockError, match="the same record was given for") as caught:
        _attest(_index(SHARDS), repeated, key)
    assert caught.value.reason == "BAD_REQUEST"
    bundle = json.loads(records[0][1])
    signatures = bundle["dsseEnvelope"]["signatures"]
    other = json.loads(records[1][1])["dsseEnvelope"]["signatures"][0]  # valid, not for this
    bundle["dsseEnvelope"]["signatures"] = [other] * 7 + signatures
    padded = [(records[0][0], json.dumps(bundle).encode()), records[1]]
    with pytest.raises(AirlockError, match="not signed by this broker") as caught:
        _attest(_index(SHARDS), padded, key)
    assert caught.value.reason == "BAD_REQUEST"



def _held_attestations(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[int]]:
    """Attestations that wait, each in its thread, until the returned event is set; the list
    gets one item per attestation that started."""
    import threading

    release = threading.Event()
    started: list[int] = []
    real = index_attestation.attest

    def slow(*args: Any, **kwargs: Any) -> bytes:
        started.append(1)
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(index_attestation, "attest", slow)
    return release, started


def test_attestations_run_a_few_at_once_and_refuse_beyond_their_queue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any caller with the convert role may ask; without a bound, enough large requests kept
    every executor thread (validation, answers, slot removal need them) and their bytes."""
    import asyncio

    key = _key(tmp_path)
    release, running = _held_attestations(monkeypatch)
    attestations = index_attestation.Attestations(running=1, waiting=1)

    async def run() -> list[Any]:
        calls = [asyncio.ensure_future(attestations.attest(
            _index(SHARDS), _records(key, SHARDS), "s", key=key, principal=PRINCIPAL))
            for _ in range(3)]
        deadline = asyncio.get_running_loop().time() + 60
        while not (running and sum(c.done() for c in calls) == 1):
            assert asyncio.get_running_loop().time() < deadline, "no attestation started"
            await asyncio.sleep(0.01)
        assert len(running) == 1  # one runs, one waits, the third is refused
        release.set()
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, AirlockError)]
    assert len(refused) == 1 and refused[0].reason == "BUSY"
    assert "the limit is 2" in refused[0].message
    assert sum(isinstance(r, bytes) for r in results) == 2


def test_one_caller_cannot_take_every_place(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: one caller with the convert role looping on attestations (a record
    that fails its checks after a parse is enough) took every place, and another caller's
    were BUSY 12 times in 21. With the default bounds, one caller's calls beyond its share
    are refused and another's still run."""
    import asyncio

    key = _key(tmp_path)
    release, _ = _held_attestations(monkeypatch)
    attestations = index_attestation.Attestations()
    other = Principal(name="serving", method="token", roles=frozenset())

    async def run() -> tuple[list[Any], Any]:
        def call(principal: Principal) -> asyncio.Future[bytes]:
            return asyncio.ensure_future(attestations.attest(
                _index(SHARDS), _records(key, SHARDS), "s", key=key, principal=principal))

        flood = [call(PRINCIPAL) for _ in range(attestations.running + attestations.waiting)]
        await asyncio.sleep(0)  # every call has asked for its place
        theirs = call(other)
        await asyncio.sleep(0)
        release.set()
        return (await asyncio.gather(*flood, return_exceptions=True),
                await asyncio.gather(theirs, return_exceptions=True))

    flood, (theirs,) = asyncio.run(run())
    assert isinstance(theirs, bytes), theirs  # the other caller's index is signed
    refused = [r for r in flood if not isinstance(r, bytes)]
    assert len(refused) == len(flood) - attestations.per_caller
    assert all(isinstance(e, AirlockError) and e.reason == "BUSY" and "of yours" in e.message
               for e in refused)


def test_a_cancelled_attestation_keeps_its_place_until_its_thread_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: a call cancelled while its attestation ran gave its place back at
    once, though its thread went on; cancelling and asking again ran six at once on two
    cores with the count at zero."""
    import asyncio

    key = _key(tmp_path)
    release, started = _held_attestations(monkeypatch)
    attestations = index_attestation.Attestations(running=2, waiting=0, per_caller=4)

    async def run() -> list[Any]:
        def call() -> asyncio.Future[bytes]:
            return asyncio.ensure_future(attestations.attest(
                _index(SHARDS), _records(key, SHARDS), "s", key=key, principal=PRINCIPAL))

        first = [call(), call()]
        deadline = asyncio.get_running_loop().time() + 60
        while len(started) < 2:
            assert asyncio.get_running_loop().time() < deadline, "no attestation started"
            await asyncio.sleep(0.01)
        for c in first:
            c.cancel()
        await asyncio.gather(*first, return_exceptions=True)
        again = await asyncio.gather(call(), return_exceptions=True)
        release.set()
        while attestations.calls:
            assert asyncio.get_running_loop().time() < deadline, "places not given back"
            await asyncio.sleep(0.01)
        return [*again, attestations._by_caller]

    refused, by_caller = asyncio.run(run())
    assert isinstance(refused, AirlockError) and refused.reason == "BUSY", refused
    assert by_caller == {} and len(started) == 2  # no third thread ran

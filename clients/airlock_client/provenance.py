"""Verifying the signed provenance that comes with every Airlock output.

For each output the broker signs, with its ECDSA P-256 key, a Sigstore bundle in the OpenSSF
model-signing format: a DSSE envelope around an in-toto Statement v1 whose predicate lists the
output file's sha256 and carries Airlock's record of how it was made (under ``airlock``). The
same file therefore also verifies with ``model_signing verify key``. This module checks such a
bundle against a public key and a file::

    from airlock_client import provenance
    record = provenance.verify("model.onnx", Path("model.onnx.provenance.json").read_bytes(),
                               Path("airlock.pub.pem").read_bytes())
    print(record.assurance, record.input_sha256)

``verify`` returns a ``ProvenanceRecord`` only when the signature is valid for that key AND the
file's sha256 and size are the ones signed; otherwise it raises ``ProvenanceError`` whose
``reason`` says which check failed. Trust is only as good as the key: a key file you pinned
(copied from the broker's host, ``airlock-broker keys export``) is strong; a key fetched from the
broker over the same channel as the output is trust-on-first-use.

A valid signature says the broker made this output; it does not say from what. Anyone who may
call the broker gets a valid signature for any model they send, so before trusting an output
*as a given model*, check which source it was converted from::

    provenance.check_source(record, subject="models:/fraud/3", sha256=expected_source_sha256,
                            principals={"migrator"})

``record.input_sha256`` is what the broker hashed (binding); ``record.subject`` is what the
caller said the input was (only the caller's word: compare it, but let the sha256 decide);
``record.principal`` is who asked. Records of version 1 (Airlock before subjects) name neither
subject nor principal: they still verify, and pass ``check_source`` on the sha256 alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from airlock_client._errors import ProvenanceError
from airlock_client._regular_files import NOT_REGULAR, read_small
from airlock_client._regular_files import open_regular as _open_regular
from airlock_sandbox.contract import OutputFormat
from airlock_sandbox.strict_json import StrictJSONError, loads_strict

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
RECORD_FIELD = "airlock"
#: An envelope is a few KiB; anything far larger is not one.
MAX_PROVENANCE_BYTES = 256 * 1024
#: A PEM public key is a few hundred bytes; a file far larger is not one.
MAX_PUBLIC_KEY_BYTES = 64 * 1024
#: The broker refuses a longer subject (airlock_broker.api.wire.MAX_SUBJECT).
MAX_SUBJECT = 1024
SUFFIX = ".provenance.json"
#: The ``kind`` of one job's record, and of a sharded directory index's.
CONVERSION_KIND = "conversion"
INDEX_KIND = "safetensors_index"
#: A data file's output format: carried unchanged with a model directory (model_dir.py).
DATA_FORMAT = OutputFormat.DATA.value
_READ = 1024 * 1024

PublicKeyLike = bytes | str | os.PathLike[str] | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class ProvenanceRecord:
    """A verified provenance record. Fields under ``conversion`` are the sandbox's claims."""

    job_id: str
    created: str
    broker_version: str
    input_sha256: str
    input_size: int
    declared_format: str
    detected_format: str
    output_name: str
    output_sha256: str
    output_size: int
    output_format: str
    target: str
    loading_policy: str
    image_id: str
    runtime: str
    validation: str
    assurance: str
    integrity_note: str
    #: The signing key's fingerprint (sha256 of its PEM SubjectPublicKeyInfo, hex; the same
    #: value model-signing calls the key hint).
    key_fingerprint: str
    #: 1: no subject or principal recorded; 2: both are; 3: also the parity tolerance and
    #: sample asked for, and each parity entry's tolerance and relative difference; 4: also
    #: the broker's verdict on whether artifact code ran (``executed_artifact_code``).
    record_version: int = 1
    #: What the caller said the input was (``models:/NAME/VERSION``, a path): its word only.
    subject: str = ""
    #: Who asked, as the broker authenticated it, and how ("token", "certificate", "none":
    #: authentication was off, so the name proves nothing).
    principal: str = ""
    principal_method: str = ""
    #: The parity tolerance the caller asked for (0: the broker's default, atol 1e-5 and rtol
    #: 1e-4); None in records before version 3, which did not say.
    parity_tolerance: float | None = None
    #: The sha256 of the caller's parity sample (``--sample-input``); "" when there was none
    #: (or the record is older than version 3).
    sample_sha256: str = ""
    #: What the sandbox said: loader, converter, executed_artifact_code, versions, parity
    #: (each output's max_abs_diff, and from version 3 max_rel_diff, tolerance, samples) and
    #: parity_inputs ("sample", "input_example", "generated", joined by "+").
    conversion: Mapping[str, Any] = field(default_factory=dict)
    #: Whether loading the artifact ran its code, as the broker judged it (from version 4;
    #: None before, when only the sandbox's word under ``conversion`` said, and a sandbox
    #: whose artifact ran code can make it say no).
    executed_artifact_code: bool | None = None
    #: The whole signed in-toto Statement, for anything not lifted into fields above.
    statement: Mapping[str, Any] = field(default_factory=dict)
    #: "conversion" (one job's output), or "safetensors_index": a sharded directory's index,
    #: checked by the broker against its shards' records, which ``shards`` lists (file_name,
    #: sha256, job_id, tensors, data_bytes, assurance); the job fields above are then empty.
    kind: str = CONVERSION_KIND
    shards: tuple[Mapping[str, Any], ...] = ()


def load_public_key(key: PublicKeyLike) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from PEM bytes / text, a path to a PEM file, or a key object."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        loaded: object = key
    else:
        if isinstance(key, bytes):
            pem = key
        elif isinstance(key, str) and key.lstrip().startswith("-----BEGIN"):
            pem = key.encode()
        else:
            try:
                pem = read_small(key, MAX_PUBLIC_KEY_BYTES)
            except OSError as exc:
                raise ProvenanceError("BAD_PUBLIC_KEY",
                                      f"cannot read the public key {key}: {exc.strerror}") from None
        try:
            loaded = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError):
            raise ProvenanceError("BAD_PUBLIC_KEY", "the public key is not a PEM public key") \
                from None
    if not isinstance(loaded, ec.EllipticCurvePublicKey) or not isinstance(loaded.curve,
                                                                           ec.SECP256R1):
        raise ProvenanceError("BAD_PUBLIC_KEY", "the public key is not an ECDSA P-256 key")
    return loaded


def fingerprint(key: PublicKeyLike) -> str:
    """Lower-case hex sha256 of the key's PEM SubjectPublicKeyInfo (the bundle's key hint)."""
    pem = load_public_key(key).public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def verify(file_or_bytes: bytes | str | os.PathLike[str], provenance: bytes,
           public_key: PublicKeyLike, *, data_file: bool = False,
           index: bool = False) -> ProvenanceRecord:
    """Verify ``provenance`` with ``public_key``, then that it describes ``file_or_bytes``.

    ``file_or_bytes`` is the output's content (``bytes``) or a path to it (read once, hashed).
    ``data_file``: it is a data file carried with a model directory (``config.json``, a
    tokenizer), whose record is a data file's; ``index``: it is a sharded directory's
    ``model.safetensors.index.json``, whose record is an index's; else its record must be a
    converted model's: see :func:`check_kind`.
    """
    record = verify_envelope(provenance, public_key)
    if isinstance(file_or_bytes, bytes):
        sha, size = hashlib.sha256(file_or_bytes).hexdigest(), len(file_or_bytes)
        check_output(record, sha256=sha, size=size)
    else:
        path = Path(file_or_bytes)
        try:
            with open_regular(path) as fh:
                check_stream(fh, record)
        except OSError as exc:
            raise ProvenanceError("OUTPUT_MISMATCH",
                                  f"cannot read {path}: {exc.strerror or exc}") from None
    check_kind(record, data_file=data_file, index=index)
    return record


def open_regular(path: Path, *, dir_fd: int | None = None, follow: bool = True) -> BinaryIO:
    """``path`` opened for reading if it is a regular file, never blocking on a FIFO nor
    reading a device put at its name; ``follow=False``: not through a link either (ELOOP).
    Raises ``OSError`` or ``ProvenanceError`` (UNEXPECTED_FILE)."""
    try:
        return _open_regular(path, dir_fd=dir_fd, follow=follow)
    except OSError as exc:
        if exc.strerror != NOT_REGULAR:
            raise
        raise ProvenanceError("UNEXPECTED_FILE", f"{path} is not a regular file") from None


def check_stream(fh: BinaryIO, record: ProvenanceRecord) -> None:
    """Raise unless the regular file ``fh`` holds the record's output: its size first (before
    a byte is read: a swapped-in file of a TiB is refused at once, not after an hour of
    hashing), then its sha256, reading at most one byte past the signed size."""
    size = os.fstat(fh.fileno()).st_size
    if size != record.output_size:
        check_output(record, sha256=record.output_sha256, size=size)  # says the sizes
    sha, size = digest_of(fh, limit=record.output_size)
    check_output(record, sha256=sha, size=size)


def check_kind(record: ProvenanceRecord, *, data_file: bool = False,
               index: bool = False) -> None:
    """Raise ``OUTPUT_KIND`` unless the record is of what the caller expects: a data file
    (``data_file``), a sharded directory's index (``index``) or a converted model, never one
    for another. The broker signs a data file as the bytes it was given once its sandbox
    checked them as JSON, text or a SentencePiece model; a text file may be anything
    printable, a script or a protocol-0 pickle among them. So a data file's valid signature
    says nothing about a file that is to be loaded as a model. An index's record vouches for
    JSON a caller wrote (checked against the shards' records), under a name it chose."""
    if (record.kind == INDEX_KIND) != index:
        if index:
            raise ProvenanceError("OUTPUT_KIND", "the record is not a sharded directory's "
                                                 "index")
        raise ProvenanceError("OUTPUT_KIND", "the record is a sharded directory's index, not "
                                             "a converted model's: verify it as "
                                             "model.safetensors.index.json or with its "
                                             "directory (airlock verify DIR)")
    if index or (record.output_format == DATA_FORMAT) == data_file:
        return
    if data_file:
        raise ProvenanceError("OUTPUT_KIND", f"the record is a converted model's "
                                             f"({record.output_format[:20]}), not a data file's")
    raise ProvenanceError(
        "OUTPUT_KIND", f"the record is a data file's (declared "
                       f"{record.declared_format[:20] or 'nothing'}, carried unchanged with a "
                       "model directory), not a converted model's: check it with its directory "
                       "(airlock verify DIR), or alone as a data file (--data-file)")


def file_subject(subject: str, name: str) -> str:
    """What a directory's file is signed as: ``SUBJECT/NAME`` (the name escaped), clipped at
    the front when too long (:func:`clip_subject`); "" for no subject. ``convert DIR`` signs
    every shard and data file so; ``verify DIR`` expects it."""
    if not subject:
        return ""
    return clip_subject(subject + "/" + "".join(escape_subject(ch) for ch in name))


def path_subject(path: str | os.PathLike[str]) -> str:
    """What a local file or directory is signed as unless its caller says otherwise: its
    absolute path, escaped and clipped."""
    return clip_subject("".join(escape_subject(ch) for ch in os.path.abspath(path)))


def clip_subject(subject: str) -> str:
    """``subject`` (already escaped), clipped at the front to ``MAX_SUBJECT`` characters when
    too long: the end of a path says the most."""
    return subject if len(subject) <= MAX_SUBJECT else "…" + subject[-(MAX_SUBJECT - 1):]


def verify_envelope(provenance: bytes, public_key: PublicKeyLike) -> ProvenanceRecord:
    """Check the signature and parse the record; says nothing yet about any file."""
    key = load_public_key(public_key)
    if not provenance:
        raise ProvenanceError("PROVENANCE_MISSING", "no provenance was given")
    if len(provenance) > MAX_PROVENANCE_BYTES:
        raise ProvenanceError("PROVENANCE_MALFORMED",
                              f"provenance of {len(provenance)} bytes is larger than any record")
    bundle = _strict_json(provenance, "the provenance bundle")
    if bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise ProvenanceError("PROVENANCE_MALFORMED",
                              f"mediaType is not {BUNDLE_MEDIA_TYPE!r}")
    envelope = _obj(bundle, "dsseEnvelope")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise ProvenanceError("PROVENANCE_MALFORMED",
                              f"payloadType is not {PAYLOAD_TYPE!r}")
    payload = _b64(envelope.get("payload"), "payload")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise ProvenanceError("PROVENANCE_MALFORMED", "the envelope holds no signature")
    expected = fingerprint(key)
    signed = b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload),
                                       payload)
    named = [_hint(bundle)]
    for entry in signatures[:8]:
        if not isinstance(entry, dict):
            raise ProvenanceError("PROVENANCE_MALFORMED", "a signature entry is not an object")
        named.append(str(entry.get("keyid", ""))[:64])
        try:
            key.verify(_b64(entry.get("sig"), "sig"), signed, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        return _record(_strict_json(payload, "the in-toto statement"), expected)
    # Hints and keyids are unauthenticated: they only make the message useful.
    other = [k for k in named if k and k != expected]
    hint = f"; it names key {other[0][:16]}..., not {expected[:16]}..." if other else ""
    raise ProvenanceError("SIGNATURE_INVALID",
                          f"the provenance is not validly signed by the expected key{hint}")


def _hint(bundle: Mapping[str, Any]) -> str:
    material = bundle.get("verificationMaterial")
    public = material.get("publicKey") if isinstance(material, dict) else None
    return str(public.get("hint", ""))[:64] if isinstance(public, dict) else ""


def check_output(record: ProvenanceRecord, *, sha256: str, size: int) -> None:
    """Raise unless ``sha256`` and ``size`` are the output's signed ones."""
    if sha256 != record.output_sha256:
        raise ProvenanceError("OUTPUT_MISMATCH",
                              f"the file's sha256 {sha256[:16]}... is not the signed output's "
                              f"{record.output_sha256[:16]}...")
    if size != record.output_size:
        raise ProvenanceError("OUTPUT_MISMATCH",
                              f"the file has {size} bytes; the signed output has "
                              f"{record.output_size}")


def check_source(record: ProvenanceRecord, *, subject: str | None = None,
                 sha256: str | None = None,
                 principals: Collection[str] | None = None) -> None:
    """Raise unless the record says the output was converted from the expected source.

    ``sha256``: the source bytes' sha256 (for an MLflow model directory, of the bundle the
    client packs, see ``airlock_client._bundle``). ``subject``: the caller's name for it, exact.
    ``principals``: who may have asked for it. Each given expectation must hold; a record of
    version 1 names no subject, so it passes a subject expectation only together with a
    matching ``sha256`` (which decides anyway), and never a principal expectation.
    """
    if subject is None and sha256 is None and principals is None:
        raise ValueError("check_source needs an expectation: subject, sha256 or principals")
    if isinstance(principals, str):  # one name, not its letters ("mig" in "migrator")
        principals = (principals,)
    if sha256 is not None and not record.input_sha256:
        raise ProvenanceError("SOURCE_MISMATCH", "the record names no input sha256 (an "
                                                 "index's: its shards' records name theirs)")
    if sha256 is not None and sha256.lower() != record.input_sha256:
        raise ProvenanceError("SOURCE_MISMATCH",
                              f"the output was converted from input sha256 "
                              f"{record.input_sha256[:16]}..., not from the expected source "
                              f"{sha256[:16]}...")
    if subject is not None:
        if record.record_version >= 2 and record.subject != subject:
            raise ProvenanceError("SOURCE_MISMATCH",
                                  f"the output is a conversion of {shown(record.subject)}, "
                                  f"not of {shown(subject)}")
        if record.record_version < 2 and sha256 is None:
            raise ProvenanceError("SOURCE_MISMATCH",
                                  "the record (version 1) names no subject; expect the "
                                  "source's sha256 instead")
    if principals is not None and (record.record_version < 2
                                   or record.principal not in principals
                                   or record.principal_method == "none"):
        who = (f"{shown(record.principal)} ({record.principal_method})"
               if record.record_version >= 2 else "no principal (record version 1)")
        raise ProvenanceError("PRINCIPAL_NOT_ALLOWED",
                              f"the output was asked for by {who}, not by one of "
                              f"{', '.join(shown(p) for p in sorted(principals)) or 'nobody'}")


def escape_subject(text: str) -> str:
    """``text`` as a subject the broker accepts: printable and one-to-one.

    A backslash becomes ``\\\\`` and every character that is not printable (controls, line and
    paragraph separators, bidi overrides, lone surrogates from undecodable file names) becomes
    ``\\xNN`` / ``\\uNNNN`` / ``\\UNNNNNNNN``, so two different names never give one subject and
    none can rewrite a terminal. Text longer than ``MAX_SUBJECT`` after escaping raises
    ``ValueError``: a clipped name would name something else.
    """
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    escaped = "".join(out)
    check_subject(escaped)
    return escaped


def check_subject(subject: str) -> str:
    """Raise ``ValueError`` for a subject the broker would refuse (before any upload)."""
    if len(subject) > MAX_SUBJECT:
        raise ValueError(f"the subject has {len(subject)} characters; at most {MAX_SUBJECT} "
                         "are allowed")
    if not subject.isprintable():
        raise ValueError("the subject holds characters that are not printable; pass it "
                         "through airlock_client.provenance.escape_subject")
    return subject


def shown(text: str, limit: int = 120) -> str:
    """Signed text (printable, but from a caller) quoted and clipped for a message."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def emit_public_key(pem: str, key_fingerprint: str, output: Path | None,
                    as_json: bool) -> None:
    """Print or write a public key the one way ``airlock keys fetch`` and ``airlock-broker keys
    export`` both do: PEM on stdout (fingerprint on stderr), or into ``output``; ``as_json``:
    one JSON object on stdout."""
    if output is not None:
        replace_file(output, pem.encode())
    if as_json:
        print(json.dumps({"public_key_pem": pem, "fingerprint": key_fingerprint,
                          "written_to": str(output) if output else None}))
    elif output is None:
        sys.stdout.write(pem)
        print(f"# fingerprint sha256:{key_fingerprint}", file=sys.stderr)
    else:
        print(f"wrote {output} (fingerprint sha256:{key_fingerprint})")


def provenance_path(output: str | os.PathLike[str]) -> Path:
    """Where ``airlock convert`` puts an output's provenance: ``<output>.provenance.json``."""
    path = Path(output)
    return path.with_name(path.name + SUFFIX)


def write_provenance(output: Path, envelope: bytes) -> Path:
    """Write ``<output>.provenance.json`` (``replace_file``)."""
    target = provenance_path(output)
    replace_file(target, envelope)
    return target


def replace_file(target: Path, data: bytes) -> None:
    """Write ``target`` as a new file: a locked temporary file beside it, renamed over it (one
    a killed run left is removed: _part_files.py). Whatever was at that name, a link or
    another user's file, is replaced, never written through; a reader sees the old file or
    the whole new one."""
    from airlock_client import _part_files

    part = _part_files.new_file(target)
    try:
        with os.fdopen(part.fd, "wb") as fh:
            fh.write(data)
        part.place_file(target)
    finally:
        part.remove()  # unless it was put in place
        part.release()


def digest_of(stream: BinaryIO, limit: int | None = None) -> tuple[str, int]:
    """The sha256 and size of what ``stream`` holds from where it is (``check_output``'s
    two figures); with ``limit``, of at most ``limit`` + 1 bytes (enough to tell a file that
    grew). Raises the stream's ``OSError``."""
    digest = hashlib.sha256()
    size = 0
    left = -1 if limit is None else limit + 1
    while left and (block := stream.read(_READ if left < 0 else min(_READ, left))):
        digest.update(block)
        size += len(block)
        left = -1 if left < 0 else left - len(block)
    return digest.hexdigest(), size


def _strict_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = loads_strict(data.decode("utf-8"))
    except (UnicodeDecodeError, StrictJSONError) as exc:
        raise ProvenanceError("PROVENANCE_MALFORMED", f"{what} is not valid JSON: "
                                                      f"{str(exc)[:120]}") from None
    if not isinstance(doc, dict):
        raise ProvenanceError("PROVENANCE_MALFORMED", f"{what} is not a JSON object")
    return doc


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise ProvenanceError("PROVENANCE_MALFORMED", f"{name} is missing or not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProvenanceError("PROVENANCE_MALFORMED", f"{name} is not base64") from None


def _record(doc: dict[str, Any], key_fingerprint: str) -> ProvenanceRecord:
    """The signed statement as a typed record; a signed but ill-formed one is still refused."""
    if doc.get("_type") != STATEMENT_TYPE or doc.get("predicateType") != PREDICATE_TYPE:
        raise ProvenanceError("PROVENANCE_MALFORMED",
                              "the statement is not a model-signing v1.0 in-toto statement")
    predicate = _obj(doc, "predicate")
    if RECORD_FIELD not in predicate:
        raise ProvenanceError("PROVENANCE_MALFORMED",
                              "the signature holds no Airlock provenance record")
    resources = predicate.get("resources")
    if (not isinstance(resources, list) or len(resources) != 1
            or not isinstance(resources[0], dict)
            or resources[0].get("name") != "." or resources[0].get("algorithm") != "sha256"):
        raise ProvenanceError("PROVENANCE_MALFORMED",
                              "the statement must sign exactly one file, by sha256")
    digest = _str(resources[0], "digest")
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
        raise ProvenanceError("PROVENANCE_MALFORMED", "the statement must have one subject")
    try:
        root = hashlib.sha256(bytes.fromhex(digest)).hexdigest()
    except ValueError:
        raise ProvenanceError("PROVENANCE_MALFORMED", "the file digest is not hex") from None
    pred = _obj(predicate, RECORD_FIELD)
    inp, out = _obj(pred, "input"), _obj(pred, "output")
    if _obj(subjects[0], "digest").get("sha256") != root or _str(out, "sha256") != digest:
        raise ProvenanceError("PROVENANCE_MALFORMED",
                              "the statement's subject, resource and record digests disagree")
    version = pred.get("record_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ProvenanceError("PROVENANCE_MALFORMED", "'record_version' is not a version")
    if pred.get("kind") == INDEX_KIND:
        return _index_record(pred, doc, digest, version, key_fingerprint)
    sandbox, verdicts = _obj(pred, "sandbox"), _obj(pred, "verdicts")
    request, broker = _obj(pred, "request"), _obj(pred, "broker")
    subject = principal = method = sample = ""
    if version >= 2:  # from version 2 on, a record without them is not a record
        who = _obj(pred, "principal")
        subject, principal, method = (_str(inp, "subject"), _str(who, "name"),
                                      _str(who, "method"))
    tolerance: float | None = None
    if version >= 3:
        tolerance, sample = _parity_request(request)
    executed: bool | None = None
    if version >= 4:
        executed = verdicts.get("executed_artifact_code")
        if not isinstance(executed, bool):
            raise ProvenanceError("PROVENANCE_MALFORMED",
                                  "'executed_artifact_code' is not true or false")
    return ProvenanceRecord(
        job_id=_str(pred, "job_id"), created=_str(pred, "created"),
        broker_version=_str(broker, "version"),
        input_sha256=_str(inp, "sha256"), input_size=_int(inp, "size"),
        declared_format=_str(inp, "declared_format"),
        detected_format=_str(inp, "detected_format"),
        output_name=_str(out, "name"), output_sha256=digest,
        output_size=_int(out, "size"), output_format=_str(out, "format"),
        target=_str(request, "target"), loading_policy=_str(request, "loading_policy"),
        image_id=_str(sandbox, "image_id"), runtime=_str(sandbox, "runtime"),
        validation=_str(verdicts, "validation"), assurance=_str(verdicts, "assurance"),
        integrity_note=_str(verdicts, "integrity_note"),
        key_fingerprint=key_fingerprint, record_version=version, subject=subject,
        principal=principal, principal_method=method, parity_tolerance=tolerance,
        sample_sha256=sample, executed_artifact_code=executed,
        conversion=_obj(pred, "conversion"), statement=doc,
    )


def _index_record(pred: dict[str, Any], doc: dict[str, Any], digest: str, version: int,
                  key_fingerprint: str) -> ProvenanceRecord:
    """A directory index's record: which shards' records it was checked against."""
    inp, out, verdicts = _obj(pred, "input"), _obj(pred, "output"), _obj(pred, "verdicts")
    who, broker = _obj(pred, "principal"), _obj(pred, "broker")
    shards = pred.get("shards")
    if not isinstance(shards, list) or not shards or not all(isinstance(s, dict)
                                                             for s in shards):
        raise ProvenanceError("PROVENANCE_MALFORMED", "an index record lists no shards")
    return ProvenanceRecord(
        job_id="", created=_str(pred, "created"), broker_version=_str(broker, "version"),
        input_sha256="", input_size=0, declared_format="", detected_format="",
        output_name=_str(out, "name"), output_sha256=digest, output_size=_int(out, "size"),
        output_format=_str(out, "format"), target="", loading_policy="", image_id="",
        runtime="", validation=_str(verdicts, "validation"),
        assurance=_str(verdicts, "assurance"), integrity_note="",
        key_fingerprint=key_fingerprint, record_version=version,
        subject=_str(inp, "subject"), principal=_str(who, "name"),
        principal_method=_str(who, "method"), statement=doc, kind=INDEX_KIND,
        shards=tuple(shards))


def _parity_request(request: Mapping[str, Any]) -> tuple[float, str]:
    """A version 3 record's ``request.parity_tolerance`` and its sample's sha256 ("": none)."""
    tolerance = request.get("parity_tolerance")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
            or not 0 <= tolerance <= 1:
        raise ProvenanceError("PROVENANCE_MALFORMED", "'parity_tolerance' is not a tolerance")
    sample = request.get("sample_input")
    if sample is None:
        return float(tolerance), ""
    if not isinstance(sample, dict):
        raise ProvenanceError("PROVENANCE_MALFORMED", "'sample_input' is not an object")
    return float(tolerance), _str(sample, "sha256")


def _obj(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name)
    if not isinstance(value, dict):
        raise ProvenanceError("PROVENANCE_MALFORMED", f"{name!r} is missing or not an object")
    return value


def _str(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise ProvenanceError("PROVENANCE_MALFORMED", f"{name!r} is missing or not a string")
    return value


def _int(doc: Mapping[str, Any], name: str) -> int:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProvenanceError("PROVENANCE_MALFORMED", f"{name!r} is not a size")
    return value


__all__ = [
    "MAX_PROVENANCE_BYTES",
    "MAX_SUBJECT",
    "PREDICATE_TYPE",
    "ProvenanceError",
    "ProvenanceRecord",
    "check_output",
    "check_source",
    "check_subject",
    "emit_public_key",
    "escape_subject",
    "fingerprint",
    "load_public_key",
    "provenance_path",
    "verify",
    "verify_envelope",
]

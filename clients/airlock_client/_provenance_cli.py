"""``airlock verify`` and ``airlock keys``: check an output against its signed provenance.

``airlock verify FILE`` exits 0 when the provenance beside FILE (or ``--provenance``) is
validly signed by the key (``--public-key``, else ``AIRLOCK_PUBLIC_KEY``, else the key the
broker publishes, with a trust-on-first-use warning), FILE's sha256 and size are the signed
output's, and the source is the expected one when ``--subject``, ``--source-sha256`` or
``--principal`` say what to expect; 1 when any check fails (with the reason); 2 on a usage
error; 3 when a key had to be fetched and the broker was unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from airlock_client._cli_connection import client_options
from airlock_client._cli_exits import EXIT_FAILED, EXIT_OK, failed, usage_of
from airlock_client._client import Client, default_address, default_public_key
from airlock_client._errors import ConversionError, ServiceUnavailable
from airlock_client._hf_dir import SAFE_WEIGHTS_INDEX
from airlock_client._regular_files import read_small
from airlock_client._terminal import printable
from airlock_client.provenance import (
    DATA_FORMAT,
    INDEX_KIND,
    MAX_PROVENANCE_BYTES,
    ProvenanceError,
    ProvenanceRecord,
    check_source,
    emit_public_key,
    fingerprint,
    load_public_key,
    open_regular,
    provenance_path,
    shown,
    verify,
)


def run_verify(args: argparse.Namespace) -> int:
    directory = args.file.is_dir()
    if not directory and not args.file.is_file():
        return usage_of(args, f"{args.file} is not a readable file or directory")
    if directory and (args.provenance, args.source_sha256, args.data_file) != (None, None,
                                                                                False):
        return usage_of(args, "--provenance, --source-sha256 and --data-file apply to one "
                        "file; a directory's files are each checked against their own record")
    prov_path = args.provenance or provenance_path(args.file)
    key_arg: Any = args.public_key or default_public_key()
    source = "pinned"
    try:
        if key_arg is not None:
            key = load_public_key(key_arg)
        else:
            source = "broker"
            with Client(args.server or default_address(), retry_attempts=1,
                        **client_options(args)) as client:
                key = load_public_key(client.provenance_key().public_key_pem.encode())
            print("airlock verify: warning: no --public-key or AIRLOCK_PUBLIC_KEY; using the key "
                  "the broker publishes (trust on first use)", file=sys.stderr)
    except ProvenanceError as exc:
        return usage_of(args, exc.message)
    except ValueError as exc:  # connection options: a bad token file, a cleartext token
        return usage_of(args, str(exc))
    except (ServiceUnavailable, ConversionError) as exc:
        return failed("verify", exc, as_json=args.json, doing="cannot fetch the broker's key")
    if args.source_sha256 is not None and not _is_sha256(args.source_sha256):
        return usage_of(args, "--source-sha256 must be 64 hexadecimal digits")
    if directory:
        return _verify_directory(args, key, source)
    try:
        envelope = _read_provenance(prov_path)
        record = verify(args.file, envelope, key, data_file=args.data_file,
                        index=Path(args.file).name == SAFE_WEIGHTS_INDEX)
        if (args.subject, args.source_sha256, args.principal) != (None, None, None):
            check_source(record, subject=args.subject, sha256=args.source_sha256,
                         principals=args.principal)
    except ProvenanceError as exc:
        if args.json:
            print(json.dumps({"status": "failed", "reason": exc.reason, "message": exc.message,
                              "file": str(args.file), "provenance": str(prov_path)}))
        else:
            print(f"airlock verify: FAILED: {printable(exc.reason)}: {printable(exc.message)}",
                  file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"status": "ok", "file": str(args.file), "provenance": str(prov_path),
                          "key_source": source, "record": _record_doc(record)}))
    else:
        _print_record(args.file, record, source)
    return EXIT_OK


def _verify_directory(args: argparse.Namespace, key: Any, source: str) -> int:
    """``airlock verify DIR``: every weights file and the index (verify_dir.py)."""
    from airlock_client.verify_dir import verify_directory

    try:
        checked = verify_directory(args.file, key, subject=args.subject,
                                   principals=args.principal)
    except ProvenanceError as exc:
        if args.json:
            print(json.dumps({"status": "failed", "reason": exc.reason, "message": exc.message,
                              "file": str(args.file), "provenance": None}))
        else:
            print(f"airlock verify: FAILED: {printable(exc.reason)}: {printable(exc.message)}",
                  file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({
            "status": "ok", "file": str(args.file), "key_source": source,
            "files": [{"name": name, "provenance": str(provenance_path(args.file / name)),
                       "record": _record_doc(r)} for name, r in checked.files],
            "index": None if checked.index is None else _record_doc(checked.index),
            "carried": [{"name": name, "provenance": str(provenance_path(args.file / name)),
                         "record": _record_doc(r)} for name, r in checked.carried]}))
        return EXIT_OK
    t = printable
    trust = "pinned key" if source == "pinned" else "key fetched from the broker (TOFU)"
    whole = checked.index or checked.files[0][1]
    index = " and the index, which lists exactly them" if checked.index is not None else ""
    carried = f", {len(checked.carried)} data file(s)" if checked.carried else ""
    print(f"verified {t(args.file)}: {len(checked.files)} weights file(s){index}{carried}, "
          f"signed by {trust}")
    # Anyone with the convert role can have an index signed over any shards this broker
    # signed: who asked, and what they said it was, is part of the answer.
    print(f"  subject    {shown(whole.subject, 300)} (the caller's word)")
    print(f"  asked by   {shown(whole.principal)}"
          + ("" if all(r.principal == whole.principal for _, r in checked.files)
             else " (the weights files: " + ", ".join(
                 sorted({shown(r.principal) for _, r in checked.files})) + ")"))
    for name, record in checked.files:
        print(f"  {t(name)}: sha256 {t(record.output_sha256)}, assurance "
              f"{t(record.assurance)}, job {t(record.job_id)}")
        for warning in _warnings(record):
            print(f"  {t(name)}: warning {t(warning)}")
    for name, record in checked.carried:
        print(f"  {t(name)}: sha256 {t(record.output_sha256)}, {t(record.declared_format)} "
              f"data file carried unchanged, job {t(record.job_id)}")
        for warning in _warnings(record):
            print(f"  {t(name)}: warning {t(warning)}")
    return EXIT_OK


def run_keys(args: argparse.Namespace) -> int:
    """``airlock keys fetch`` (``export`` reads the broker's key file: ``airlock-broker``)."""
    try:
        with Client(args.server or default_address(), retry_attempts=1,
                    **client_options(args)) as client:
            published = client.provenance_key()
    except ValueError as exc:  # connection options: a bad token file, a cleartext token
        return usage_of(args, str(exc))
    except (ServiceUnavailable, ConversionError) as exc:
        return failed("keys", exc, as_json=args.json)
    try:
        actual = fingerprint(published.public_key_pem.encode())
        # The key as parsed, re-encoded: not the broker's text, which may carry more.
        pem = load_public_key(published.public_key_pem.encode()).public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    except ProvenanceError as exc:
        print(f"airlock keys: the broker's key is unusable: {printable(exc.message)}",
              file=sys.stderr)
        return EXIT_FAILED
    if actual != published.fingerprint:
        print("airlock keys: the broker's key does not match its fingerprint",
              file=sys.stderr)
        return EXIT_FAILED
    if args.output is not None and (problem := _pinned_elsewhere(args.output, actual)):
        return usage_of(args, problem)
    print("airlock keys: fetched over the API: trust on first use; compare the fingerprint "
          "with the broker's host (airlock-broker keys export) before pinning it", file=sys.stderr)
    try:
        emit_public_key(pem, actual, args.output, args.json)
    except OSError as exc:  # -o names a directory, or a directory that is not there
        return usage_of(args, f"-o {args.output}: cannot write the key there "
                        f"({exc.strerror or exc})")
    return EXIT_OK


def _pinned_elsewhere(output: Path, fetched: str) -> str | None:
    """Why ``output`` must not be replaced by the fetched key, or None: it holds another
    key (a key pinned earlier, perhaps exported on the broker's host: a key published over
    the API is trust on first use, and must not silently replace one checked by hand)."""
    try:
        held = fingerprint(read_small(output, 65536)) if output.is_file() else None
    except (OSError, ProvenanceError):
        return None
    if held is None:
        return None  # not there, not a key, or not readable: written (or refused) as a file
    if held == fetched:
        return None
    return (f"{output} holds another public key (sha256:{held[:16]}...) than the broker "
            f"publishes (sha256:{fetched[:16]}...): if the broker's key changed on purpose, "
            "check the new one on its host (airlock-broker keys export) and remove the old "
            "file first")


def _read_provenance(path: Path) -> bytes:
    try:
        with open_regular(path) as fh:  # a FIFO put beside the file is refused, not waited on
            return fh.read(MAX_PROVENANCE_BYTES + 1)
    except FileNotFoundError:
        raise ProvenanceError("PROVENANCE_MISSING", f"no provenance file {path}") from None
    except OSError as exc:
        raise ProvenanceError("PROVENANCE_MISSING", f"cannot read {path}: {exc.strerror}") \
            from None


def _record_doc(record: ProvenanceRecord) -> dict[str, Any]:
    doc = asdict(record)
    doc.pop("statement", None)
    return doc


def _print_record(path: Path, record: ProvenanceRecord, source: str) -> None:
    t = printable  # the record's fields are the broker's words (signed, but words)
    trust = "pinned key" if source == "pinned" else "key fetched from the broker (TOFU)"
    print(f"verified {t(path)}: signed by {trust} sha256:{t(record.key_fingerprint[:16])}...")
    print(f"  output     {t(record.output_format)}, {t(record.output_size)} bytes, "
          f"sha256 {t(record.output_sha256)}")
    if record.kind == INDEX_KIND:
        _print_index(record)
        return
    if record.output_format == DATA_FORMAT:
        print(f"  a data file: checked as {t(record.declared_format)} in its sandbox and "
              "carried unchanged; not a model")
    print(f"  input      sha256 {t(record.input_sha256)}, {t(record.input_size)} bytes, "
          f"detected {t(record.detected_format)}"
          + (f" (declared {t(record.declared_format)})" if record.declared_format else ""))
    if record.record_version >= 2:
        # Signed, printable (the broker refuses anything else), still a caller's words: repr.
        print(f"  subject    {shown(record.subject, 300)} (the caller's word; the sha256 binds)")
        who = ("authentication off" if record.principal_method == "none"
               else f"by {t(record.principal_method)}")
        print(f"  asked by   {shown(record.principal)} ({who})")
    else:
        print("  subject    none recorded (record version 1)")
    if record.executed_artifact_code is not None:  # the broker's verdict (version 4 on)
        executed = "yes" if record.executed_artifact_code else "no"
    else:  # before, only the sandbox said, and an artifact that ran code can make it say no
        said = record.conversion.get("executed_artifact_code") is True
        executed = f"{'yes' if said else 'no'} (the sandbox's word, record version " \
                   f"{record.record_version})"
    print(f"  converted  job {t(record.job_id)} at {t(record.created)} by airlock "
          f"{t(record.broker_version)}; policy {t(record.loading_policy)}; artifact code "
          f"executed in sandbox: {executed}")
    print(f"  sandbox    {t(record.runtime)}, image {t(record.image_id[:19])}")
    _print_parity(record)
    for warning in _warnings(record):
        print(f"  warning    {t(warning)}")
    note = f" ({t(record.integrity_note)})" if record.integrity_note else ""
    print(f"  verdicts   validation {t(record.validation)}; assurance {t(record.assurance)}"
          f"{note}")


def _warnings(record: ProvenanceRecord) -> list[object]:
    """The sandbox's warnings as the record signs them (version 5 on; none before)."""
    warnings = record.conversion.get("warnings")
    return (warnings if isinstance(warnings, list) else [])[:16]


def _print_index(record: ProvenanceRecord) -> None:
    """A sharded directory's index: checked by the broker against the shards' records."""
    t = printable
    print(f"  index of   {len(record.shards)} shard(s), checked against their records: every "
          "file it names, the tensor names of each, the total size")
    for shard in record.shards[:64]:
        print(f"  shard      {t(shard.get('file_name', ''))}: {t(shard.get('tensors', ''))} "
              f"tensors, sha256 {t(str(shard.get('sha256', ''))[:16])}..., "
              f"job {t(shard.get('job_id', ''))}, {t(shard.get('assurance', ''))}")
    print(f"  subject    {shown(record.subject, 300)} (the caller's word)")
    who = ("authentication off" if record.principal_method == "none"
           else f"by {t(record.principal_method)}")
    print(f"  asked by   {shown(record.principal)} ({who}) at {t(record.created)}")
    print(f"  verdicts   validation {t(record.validation)}; assurance {t(record.assurance)}")


def _print_parity(record: ProvenanceRecord) -> None:
    """What parity was asked to hold to and on which rows (version 3), and what the sandbox
    says it measured (its claims, like all of ``conversion``)."""
    t = printable
    if record.parity_tolerance is not None:
        asked = ("the default (atol 1e-05, rtol 0.0001)" if record.parity_tolerance == 0
                 else f"{record.parity_tolerance:g}")
        rows = record.conversion.get("parity_inputs")
        sample = (f"; sample sha256 {t(record.sample_sha256[:16])}..."
                  if record.sample_sha256 else "")
        print(f"  parity     tolerance asked {asked}; rows "
              f"{t(rows) if isinstance(rows, str) and rows else '-'}{sample}")
    entries = record.conversion.get("parity")
    for entry in entries[:16] if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        rel = entry.get("max_rel_diff")
        relative = f", relative {rel:.3g}" if isinstance(rel, (int, float)) else ""
        abs_diff = entry.get("max_abs_diff")
        diff = f"{abs_diff:.3g}" if isinstance(abs_diff, (int, float)) else "?"
        tolerance = entry.get("tolerance")
        allowed = f" ({t(tolerance)})" if isinstance(tolerance, str) and tolerance else ""
        verdict = "ok" if entry.get("passed") is True else "FAILED"
        print(f"             {t(entry.get('output_name', ''))}: max |diff| {diff}{relative}"
              f"{allowed} {verdict}")


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)

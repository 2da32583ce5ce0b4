"""``airlock convert DIR``: a Hugging Face-style PyTorch model directory to a safetensors
directory (:mod:`airlock_client.model_dir`), with a progress line per shard on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from airlock_client import _cli_source
from airlock_client._cli_connection import client_options
from airlock_client._cli_exits import (
    EXIT_FAILED,
    EXIT_OK,
    failure,
    interrupted,
    usage_of,
)
from airlock_client._cli_interrupts import batch_interrupts
from airlock_client._client import Client, default_address
from airlock_client._errors import (
    CLIENT_ERROR,
    AirlockError,
)
from airlock_client._progress import Heartbeat, busy_notice, write_line
from airlock_client._terminal import printable
from airlock_client.batch import MAX_CONCURRENCY
from airlock_client.model_dir import (
    DIRECTORY_POLICY,
    DirectoryProgress,
    DirectoryResult,
    ModelDirError,
)
from airlock_client.provenance import provenance_path


def usage_problem(args: argparse.Namespace) -> str | None:
    """Why these flags cannot go with a model directory, or None."""
    if args.target == "onnx":
        return "a model directory converts to safetensors only (--to safetensors)"
    if args.input_shape or args.declared not in (None, "pytorch"):
        return "--input-shape and --format do not apply to a model directory"
    if args.sample_input is not None:
        return ("--sample-input checks an ONNX conversion; a PyTorch model directory becomes "
                "safetensors, which parity does not run on")
    if args.keep_training_state:
        # A shard's optimizer tensors would be names the index does not give it
        # (INDEX_MISMATCH), and from_pretrained would not know what to do with them.
        return ("--keep-training-state applies to one training checkpoint file; a model "
                "directory's output holds the model's weights only (a shard that is a "
                "training checkpoint gives its state dict, and its warnings say what was "
                "left out)")
    if args.jobs is not None and not 1 <= args.jobs <= MAX_CONCURRENCY:
        return f"--jobs must be between 1 and {MAX_CONCURRENCY}"
    return None


def _identity(path: Path) -> tuple[int, int] | None:
    """What ``path`` is now (device and inode), None if nothing: a finished output is renamed
    into place whole, so a new identity there means the conversion got there."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def default_output(source: Path) -> Path:
    """``NAME-safetensors`` beside the source directory."""
    base = Path(os.path.abspath(source))
    return base.with_name(f"{base.name}-safetensors")


def run_convert_directory(args: argparse.Namespace, source: Path, name: Path) -> int:
    """Convert the model directory ``source`` (``args.input``, or where a ``models:/`` URI
    was fetched to); the output is named after ``name`` unless ``-o`` says."""
    if (problem := usage_problem(args)) is not None:
        return usage_of(args, problem)
    output = args.output or default_output(name)
    subject = (_cli_source.default_subject(args.input) if args.subject is None
               else args.subject)
    last: list[DirectoryProgress] = []

    def progress(step: DirectoryProgress) -> None:
        last[:] = [step]
        _progress_line(step)

    def under_way() -> str:
        done = f"; {last[0].line()}" if last else ""
        return f"converting {printable(str(args.input))}{done}"

    before = _identity(output)
    try:
        with batch_interrupts("convert", "shard"), Heartbeat("convert", under_way), \
                Client(args.server or default_address(), public_key=args.public_key,
                       **client_options(args)) as client:
            result = client.convert_directory(
                source, output, jobs=args.jobs, progress=progress,
                overwrite=args.overwrite, loading_policy=args.policy or DIRECTORY_POLICY,
                job_timeout=args.timeout, on_busy=busy_notice("convert"), subject=subject)
    except KeyboardInterrupt:
        if _identity(output) not in (before, None):
            # Too late to stop: the new output was in place (renamed whole) and the old one
            # was being removed (what is left of it, the next conversion's sweep removes).
            return interrupted("convert", f"stopped by Ctrl-C after the conversion was put "
                               f"in place: {printable(str(output))} is the new output",
                               as_json=args.json)
        # The batch started no new shard and let those in flight finish (or, on a second
        # Ctrl-C, cancelled them); the temporary directory is gone (convert_directory's
        # finally), the destination untouched.
        return interrupted("convert", f"stopped by Ctrl-C; no partial output was left "
                           f"({printable(str(output))} is as it was)", as_json=args.json)
    except (ValueError, FileExistsError) as exc:
        return usage_of(args, str(exc))
    except OSError as exc:  # the output's directory cannot be made or written, the disk is full
        where = exc.filename2 or exc.filename
        return _report_error(args, "failed", CLIENT_ERROR,
                             f"{exc.strerror or exc}{f': {where}' if where else ''}; nothing "
                             f"was left at {printable(str(output))}", EXIT_FAILED)
    except ModelDirError as exc:  # one shard's failure, as that shard's conversion said
        _, code = failure(exc.cause) if exc.cause is not None else ("", EXIT_FAILED)
        return _report_error(args, exc.kind, exc.reason, exc.message, code, shard=exc.shard)
    except AirlockError as exc:
        status, code = failure(exc)
        return _report_error(args, status, exc.reason, exc.message, code)
    _report_ok(args, result)
    return EXIT_OK


def _progress_line(step: DirectoryProgress) -> None:
    verdict = "converted" if step.ok else "FAILED"
    write_line(f"airlock convert: {printable(step.shard)} {verdict}; {step.line()}")


def result_document(result: DirectoryResult) -> dict[str, Any]:
    """The ``--json`` object for a converted directory."""
    return {
        "ok": True, "status": "ok", "reason": None, "message": "converted",
        "output": str(result.output), "format": "safetensors",
        "assurance": result.assurance, "integrity_note": result.integrity_note,
        "index": None if result.index is None else str(result.index),
        "index_provenance": None if result.index is None
        else str(provenance_path(result.index)),
        "total_size": result.total_size,
        "executed_artifact_code": result.executed_artifact_code,
        "shards_that_ran_code": list(result.shards_that_ran_code),
        "shards": [{
            "source": s.source, "output": str(s.result.output), "sha256": s.result.sha256,
            "size": s.result.size, "tensors": s.tensors, "job_id": s.result.job_id,
            "detected_format": s.result.detected_format, "assurance": s.result.assurance,
            "integrity_note": s.result.integrity_note,
            "executed_artifact_code": s.result.report.executed_artifact_code,
            "deduplicated": dict(s.deduplicated), "warnings": list(s.result.report.warnings),
            "provenance": str(s.provenance), "transfer": s.result.transfer,
            "duration_seconds": round(s.result.duration_seconds, 3),
        } for s in result.shards],
        "deduplicated": dict(result.deduplicated),
        "carried": list(result.carried),
        "skipped": [{"name": s.name, "why": s.why} for s in result.skipped],
        "duration_seconds": round(result.duration_seconds, 3),
    }


def _report_ok(args: argparse.Namespace, result: DirectoryResult) -> None:
    if args.json:
        print(json.dumps(result_document(result)))
        return
    t = printable  # shard reports and warnings came from the broker
    print(f"converted {t(args.input)} -> {t(result.output)} ({len(result.shards)} shard(s), "
          f"safetensors, {result.total_size} bytes of tensors)")
    for s in result.shards:
        print(f"  shard      {t(s.source)} -> {t(s.output)}: {s.tensors} tensors, "
              f"{t(s.result.assurance)}, sha256 {t(s.result.sha256[:16])}...")
    if result.index is not None:
        print(f"  index      {t(result.index.name)} (built from the shards' headers; signed "
              "by the broker after checking it against the shards' records)")
    note = f" ({t(result.integrity_note)})" if result.integrity_note else ""
    print(f"  assurance  {t(result.assurance)}{note}")
    ran = result.shards_that_ran_code
    executed = f"yes (shards: {', '.join(t(n) for n in ran)})" if ran else "no"
    print(f"  policy     {args.policy or DIRECTORY_POLICY}; artifact code executed in sandbox: "
          f"{executed}")
    for s in result.shards:
        for warning in s.result.report.warnings:
            print(f"  warning    {t(s.source)}: {t(warning)}")
    for removed, kept in result.deduplicated.items():
        print(f"  tied       {t(removed)} stored once as {t(kept)}")
    if result.carried:
        print(f"  carried    {', '.join(t(n) for n in result.carried)}")
    for skipped in result.skipped:
        print(f"  skipped    {t(skipped.name)}: {t(skipped.why)}")
    if any(skipped.name.rpartition("/")[2] == "config.json" for skipped in result.skipped):
        print("  warning    config.json was not carried over (above): transformers' "
              "from_pretrained needs it; make it strict JSON and convert again")
    print("  provenance one signed record per shard and per carried file "
          "(<file>.provenance.json), verified"
          + ("; one for the index" if result.index is not None else ""))
    if any(s.result.provenance_key_source != "pinned" for s in result.shards):
        print("  key        as published by the broker (trust on first use); pin it with "
              "--public-key or AIRLOCK_PUBLIC_KEY")


def _report_error(args: argparse.Namespace, status: str, reason: str, message: str, code: int,
                  shard: str = "") -> int:
    if args.json:
        print(json.dumps({"ok": False, "status": status, "reason": reason, "message": message,
                          "output": None, "format": None, "shard": shard or None}))
    else:
        # A shard's message starts with the shard's name.
        print(f"airlock convert: {status}: {printable(reason)}: {printable(message)}",
              file=sys.stderr)
    return code

"""``airlock convert FILE FILE ...``: several files, each converted as ``airlock convert FILE``
would be, ``--jobs`` at a time (``Client.convert_many``), a line on stderr as each ends.

Each output is named as one file's would be (``m.pkl`` -> ``m.onnx``), beside its input or in
the ``-o`` directory, with its signed provenance beside it. A file's failure is that file's
outcome: the others go on. A broker that cannot be reached or that denies the caller ends
the batch (no later file would fare better): those not started are counted, not tried. The
exit code is 0 when every file converted, otherwise that of the first failed file in the
order given (``_cli_exits``). Ctrl-C starts no new file and lets those in flight finish and
be reported (exit 130); a second one cancels them and removes their outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from pathlib import Path
from typing import Any

from airlock_client import _cli_source
from airlock_client._cli_connection import client_options
from airlock_client._cli_exits import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    USAGE,
    failure,
    usage_error,
)
from airlock_client._cli_interrupts import batch_interrupts
from airlock_client._client import Client, default_address, read_sample
from airlock_client._converted_file import (
    FILE_POLICY,
    OUTPUT_NOT_PLACED,
    default_output,
    failure_document,
    placed,
    placement_problem,
    result_document,
)
from airlock_client._errors import (
    CLIENT_ERROR,
    AccessDenied,
    AirlockError,
    ConversionError,
    ServiceUnavailable,
)
from airlock_client._progress import busy_notice
from airlock_client._terminal import printable
from airlock_client._types import TensorSpec
from airlock_client.batch import MAX_CONCURRENCY, Done, Throughput
from airlock_client.provenance import write_provenance


def usage_problem(args: argparse.Namespace) -> str | None:
    """Why these inputs and flags cannot be converted as several files, or None."""
    for text in args.input:
        if not Path(text).is_file():
            return (f"{text}: with several inputs each must be a file (convert a model "
                    "directory or a models:/ or runs:/ URI on its own)")
    if args.subject is not None:
        return "--subject names one input; with several, each is signed with its own path"
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        return f"-o {args.output}: with several inputs, -o names a directory"
    if args.jobs is not None and not 1 <= args.jobs <= MAX_CONCURRENCY:
        return f"--jobs must be between 1 and {MAX_CONCURRENCY}"
    # "x.safetensors" and "x.converted.pkl" both become x.converted.safetensors.
    return placement_problem([(text, _base(args, Path(text))) for text in args.input],
                             overwrite=args.overwrite)


def _base(args: argparse.Namespace, source: Path) -> Path:
    """What the output is named after: the input, in ``-o`` when given."""
    return source if args.output is None else args.output / source.name


def run_convert_many(args: argparse.Namespace, inputs: tuple[TensorSpec, ...]) -> int:
    if (problem := usage_problem(args)) is not None:
        return usage_error("convert", problem, as_json=args.json)
    try:  # read once, and refused before anything is sent: every file shares it
        sample = read_sample(args.sample_input)
    except ValueError as exc:
        return usage_error("convert", str(exc), as_json=args.json)
    if args.output is not None:
        try:
            args.output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return usage_error("convert", f"-o {args.output}: cannot make it a directory "
                               f"({exc.strerror or exc})", as_json=args.json)
    sources = [Path(text) for text in args.input]
    pairs = [(source, default_output(_base(args, source))) for source in sources]
    count = Throughput(total=len(pairs))
    outcomes: dict[Path, Done[tuple[Path, Path], Any]] = {}
    documents: dict[Path, dict[str, Any]] = {}
    halt = threading.Event()  # the first Ctrl-C: nothing new starts (_cli_interrupts)
    try:
        with batch_interrupts("convert", "conversion", halt=halt), \
                Client(args.server or default_address(), public_key=args.public_key,
                       **client_options(args)) as client, \
                contextlib.closing(client.convert_many(
                    pairs, jobs=args.jobs, stop=_broker_failed, halt=halt,
                    target=args.target, inputs=inputs, declared_format=args.declared,
                    loading_policy=args.policy or FILE_POLICY, job_timeout=args.timeout,
                    on_busy=busy_notice("convert"),
                    subject=lambda path: _cli_source.default_subject(str(path)),
                    parity_tolerance=args.parity_tolerance,
                    keep_training_state=args.keep_training_state,
                    sample_input=sample or None)) as batch:
            for done in batch:
                source = done.item[0]
                outcomes[source] = done
                documents[source] = _finish(args, done)
                count.add(documents[source]["ok"])
                _progress(source, documents[source], count)
    except KeyboardInterrupt:  # a second Ctrl-C: those in flight were cancelled
        _remove_unreported(pairs, outcomes)
        return _report(args, sources, outcomes, documents, count, interrupted=True)
    except ValueError as exc:  # before any file: an address the client cannot use
        return usage_error("convert", str(exc), as_json=args.json)
    except AirlockError as exc:  # before any file: the broker's key, the pool status
        status, code = failure(exc)
        return _whole_failure(args, status, exc.reason, exc.message, code)
    return _report(args, sources, outcomes, documents, count, interrupted=halt.is_set())


def _broker_failed(done: Done[tuple[Path, Path], Any]) -> bool:
    """Whether a failure was the broker's (unreachable, or denying the caller), not the
    file's: no later file would fare better."""
    return isinstance(done.error, (ServiceUnavailable, AccessDenied))


def _finish(args: argparse.Namespace, done: Done[tuple[Path, Path], Any]) -> dict[str, Any]:
    """Rename a converted file to its final name and write its provenance; its ``--json``
    object (a failure's says why)."""
    source = done.item[0]
    if not done.ok or done.result is None:
        error = done.error
        if isinstance(error, AirlockError):
            status, _ = failure(error)
            job_id = error.job_id if isinstance(error, ConversionError) else ""
            doc = failure_document(status, error.reason, error.message, job_id)
        else:
            usage = isinstance(error, ValueError)
            doc = failure_document("usage" if usage else "failed",
                                   USAGE if usage else CLIENT_ERROR, str(error))
        return {**doc, "input": str(source)}
    try:
        result = placed(done.result, done.item[1], _base(args, source))
        provenance = write_provenance(result.output, result.provenance)
    except OSError as exc:  # e.g. the final name is a directory: this file's failure
        return {**failure_document(
            "failed", OUTPUT_NOT_PLACED,
            f"converted, but it could not be put in place ({exc.strerror or exc}: "
            f"{exc.filename2 or exc.filename or ''}); the converted file is kept as "
            f"{done.item[1]}",
            done.result.job_id), "input": str(source)}
    return {**result_document(result, provenance), "input": str(source)}


def _progress(source: Path, doc: dict[str, Any], count: Throughput) -> None:
    t = printable
    if doc["ok"]:
        what = f"-> {t(doc['output'])} ({t(doc['format'])}, {t(doc['assurance'])})"
    else:
        what = f"{t(doc['status'])}: {t(doc['reason'])}: {t(doc['message'])}"
    print(f"airlock convert: {t(str(source))} {what}; {count.line()}", file=sys.stderr,
          flush=True)


def _remove_unreported(pairs: list[tuple[Path, Path]],
                       outcomes: dict[Path, Done[tuple[Path, Path], Any]]) -> None:
    """The outputs of conversions that finished after Ctrl-C, never renamed nor reported."""
    for source, temporary in pairs:
        if source not in outcomes:
            with contextlib.suppress(OSError):
                temporary.unlink()


def _report(args: argparse.Namespace, sources: list[Path],
            outcomes: dict[Path, Done[tuple[Path, Path], Any]],
            documents: dict[Path, dict[str, Any]], count: Throughput, *,
            interrupted: bool = False) -> int:
    failed = [s for s in sources if s in documents and not documents[s]["ok"]]
    not_started = [s for s in sources if s not in outcomes]
    converted = count.done - count.failed
    if args.json:
        print(json.dumps({
            "ok": not failed and not not_started,
            "status": "interrupted" if interrupted
            else "ok" if not failed and not not_started else "failed",
            "converted": converted, "failed": len(failed), "not_started": len(not_started),
            "files": [documents[s] for s in sources if s in documents]
            + [{**failure_document("not_started", None, "not converted: the batch ended "
                                   "first (the broker failed, or Ctrl-C)"), "input": str(s)}
               for s in not_started],
        }))
    else:
        for source in sources:
            doc = documents.get(source)
            if doc is not None and doc["ok"]:
                print(f"converted {printable(str(source))} -> {printable(doc['output'])} "
                      f"({printable(doc['format'])}, {printable(doc['assurance'])})")
        for source in failed:
            doc = documents[source]
            print(f"airlock convert: {printable(doc['status'])}: {printable(str(source))}: "
                  f"{printable(doc['reason'])}: {printable(doc['message'])}", file=sys.stderr)
        rest = f", {len(not_started)} not started" if not_started else ""
        print(f"{converted} of {len(sources)} converted, {len(failed)} failed{rest}")
    if interrupted:
        print(f"airlock convert: interrupted: {converted} of {len(sources)} converted and "
              f"kept, {len(failed)} failed, {len(not_started)} not converted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not failed:
        return EXIT_OK
    error = outcomes[failed[0]].error  # None: converted, but not put in place
    if isinstance(error, AirlockError):
        return failure(error)[1]
    return EXIT_USAGE if isinstance(error, ValueError) else EXIT_FAILED


def _whole_failure(args: argparse.Namespace, status: str, reason: str, message: str,
                   code: int) -> int:
    if args.json:
        print(json.dumps({"ok": False, "status": status, "reason": reason, "message": message,
                          "output": None, "files": []}))
    else:
        print(f"airlock convert: {status}: {printable(reason)}: {printable(message)}",
              file=sys.stderr)
    return code

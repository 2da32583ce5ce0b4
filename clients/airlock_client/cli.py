"""The ``airlock`` command: its every subcommand and flag, and which module runs each.

Exit codes are in ``_cli_exits`` (0 done, 1 rejected or failed, 2 usage, 3 unavailable,
4 denied; ``migrate`` adds 5). A subcommand's module is imported only when that subcommand
runs: ``airlock --help`` and a usage error load argparse and nothing else (no gRPC, no
cryptography; tests/unit/test_cli_imports.py pins it).

The broker's operator commands (``serve``, ``token``, ``keys export``) are the broker
package's ``airlock-broker``: this client never imports the broker. Their names stay here
only to say where they went.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airlock_client._batch_jobs import FALLBACK_JOBS, JOBS_PROFILE, MAX_DEFAULT_JOBS
from airlock_client._cli_connection import add_connection_arguments
from airlock_client._cli_exits import (
    EXIT_DENIED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_READER_GONE,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    interrupted,
    usage_error,
)
from airlock_client._lineage import TARGET_SUFFIX
from airlock_client._registry import DEFAULT_PAGE_SIZE
from airlock_client._terminal import printable

__all__ = [
    "BROKER_COMMAND",
    "EXIT_DENIED",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

#: The broker's console script (the ``airlock-broker`` distribution).
BROKER_COMMAND = "airlock-broker"
_SERVER_HELP = "broker address (default $AIRLOCK_SERVER or 127.0.0.1:50051)"


#: Commands that may download or bundle a model into temporary files. They run in a work
#: directory of their own under ``$TMPDIR``, which holds every temporary file they make and
#: is removed when they end; one that a killed command left (SIGKILL, the OOM killer) is
#: removed by the next of them (``_run_dir``).
_WRITES_TEMPORARIES = frozenset({"convert", "migrate", "verify"})

#: Options whose value may start with ``-`` (a free dimension: ``--input-shape -1,20``).
_DASHED_VALUE_OPTIONS = frozenset({"--input-shape", "--parity-tolerance"})
#: What such a value looks like: argparse takes ``-1`` for a number but ``-1,20`` for an
#: option, so the pair is joined into ``--input-shape=-1,20`` before argparse sees it.
_DASHED_VALUE = re.compile(r"-[0-9?Nn]")


def join_dashed_values(argv: Sequence[str]) -> list[str]:
    """``--input-shape -1,20`` as ``--input-shape=-1,20``; everything else unchanged."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            out.append(arg)
            out.extend(args)
            break
        out.append(arg)
        if arg in _DASHED_VALUE_OPTIONS:
            value = next(args, None)
            if value is None:
                break
            if _DASHED_VALUE.match(value):
                out[-1] = f"{arg}={value}"
            else:
                out.append(value)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own exit code is 2 as well; be explicit
        self.print_usage(sys.stderr)
        # It quotes the arguments it refuses: a file name a glob passed is someone else's text.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {printable(message)}\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        argv = sys.argv[1:] if args is None else args
        return super().parse_known_args(join_dashed_values(argv), namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="airlock", description="Convert untrusted model files to ONNX or "
                     "safetensors inside throwaway sandboxes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("serve", help=f"moved: `{BROKER_COMMAND} serve` runs the broker",
                   add_help=False)
    sub.add_parser("token", help=f"moved: `{BROKER_COMMAND} token create` mints tokens",
                   add_help=False)
    pool = sub.add_parser("pool", help="operate the warm sandbox pools")
    pool.add_argument("action", choices=["status", "restart", "drain", "resume"])
    pool.add_argument("--profile", default=None,
                      help="restart only this profile (restart only: drain and resume act on "
                           "every pool)")
    pool.add_argument("--server", default=None,
                      help="broker address (default $AIRLOCK_SERVER or 127.0.0.1:50051)")
    pool.add_argument("--json", action="store_true", help="print JSON on stdout")
    add_connection_arguments(pool)

    selftest = sub.add_parser("selftest", help="run the isolation self-test on the broker")
    selftest.add_argument("--server", default=None,
                          help="broker address (default $AIRLOCK_SERVER or 127.0.0.1:50051)")
    selftest.add_argument("--json", action="store_true", help="print JSON on stdout")
    add_connection_arguments(selftest)

    convert = sub.add_parser("convert", help="convert one artifact (or several files)")
    convert.add_argument("input", nargs="+",
                         help="the artifact (pickle, joblib, PyTorch, ...), an MLflow "
                         "model directory, a Hugging Face-style PyTorch model directory "
                         "(pytorch_model.bin or shards with pytorch_model.bin.index.json), or "
                         "models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN/PATH; or several "
                         "files, converted --jobs at a time")
    convert.add_argument("--tracking-uri", default=None,
                         help="MLflow tracking (and registry) server for models:/ and runs:/ "
                              "(default $MLFLOW_TRACKING_URI)")
    convert.add_argument("-o", "--output", type=Path, default=None,
                         help="where to write the result (default: beside the input); "
                              "with several files, a directory")
    convert.add_argument("--to", dest="target", choices=["auto", "onnx", "safetensors"],
                         default="auto")
    convert.add_argument("--input-shape", action="append", default=[], metavar="[NAME:]DIMS",
                         help="a model input's shape, e.g. 1,20 or x:-1,20 (-1 = free); repeat "
                              "for several inputs")
    convert.add_argument("--input-dtype", default=None, metavar="DTYPE",
                         help="dtype of the inputs (default float32); without --input-shape, "
                              "the one input of a scikit-learn or booster model, as wide as it "
                              "was fitted: float64 gives a double-precision graph where the "
                              "converter supports it")
    convert.add_argument("--format", dest="declared", default=None,
                         choices=["pickle", "cloudpickle", "joblib", "pytorch", "torchscript",
                                  "torch_export", "numpy", "onnx", "safetensors", "mlflow",
                                  "skops"],
                         help="what the artifact is declared to be (checked against its bytes; "
                              "a .skops file is declared skops unless this says otherwise)")
    convert.add_argument("--policy", choices=["allow_code", "safe_only"], default=None,
                         help="safe_only refuses any loader that executes the artifact's code "
                              "(default: allow_code for a file or an MLflow model, safe_only "
                              "for a PyTorch model directory, whose shards are state dicts)")
    convert.add_argument("--timeout", type=int, default=0, help="sandbox deadline in seconds")
    convert.add_argument("--parity-tolerance", type=float, default=0.0, metavar="T",
                         help="float outputs may differ from the original's by T + T*|original| "
                              "in the parity check (0 < T <= 1; default atol 1e-5, rtol 1e-4)")
    convert.add_argument("--sample-input", type=Path, default=None, metavar="SAMPLE.npy",
                         help="rows of your own for the parity check instead of generated "
                              "ones: numpy.save of one numeric array shaped like the model's "
                              "input, at most 1 MiB; parsed only in the sandbox")
    convert.add_argument("--keep-training-state", action="store_true",
                         help="a training checkpoint: keep its optimizer state and other "
                              "entries' tensors too, named under their entry (default: the "
                              "model's state dict only)")
    convert.add_argument("--server", default=None,
                         help="broker address (default $AIRLOCK_SERVER or 127.0.0.1:50051)")
    convert.add_argument("--public-key", type=Path, default=None,
                         help="the broker's provenance public key, PEM (default "
                              "$AIRLOCK_PUBLIC_KEY; else the key the broker publishes)")
    convert.add_argument("--subject", default=None,
                         help="what the input is, signed into its provenance (default: the "
                              "URI as given, or the input's absolute path)")
    convert.add_argument("--jobs", type=int, default=None, metavar="N",
                         help="shards of a PyTorch model directory, or files of several, "
                              "converted at once (default: what the broker runs at once, at "
                              "most 4)")
    convert.add_argument("--overwrite", action="store_true",
                         help="a file: replace a file of yours at the output's name (an "
                              "earlier conversion's output, with its provenance record beside "
                              "it, is replaced without it); a PyTorch model directory: replace "
                              "an earlier output directory (one that holds only what an "
                              "Airlock output holds)")
    convert.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_connection_arguments(convert)
    _add_verify_parser(sub)
    _add_keys_parser(sub)
    _add_migrate_parser(sub)
    return parser


def _add_verify_parser(sub: Any) -> None:
    verify_p = sub.add_parser("verify", help="check a converted file (or model directory) "
                                             "against its signed provenance")
    verify_p.add_argument("file", type=Path, help="the converted model (ONNX / safetensors), "
                          "or a converted model directory: every weights file and the index")
    verify_p.add_argument("--provenance", type=Path, default=None,
                          help="the provenance file (default FILE.provenance.json)")
    verify_p.add_argument("--public-key", type=Path, default=None,
                          help="the broker's public key, PEM (default $AIRLOCK_PUBLIC_KEY; "
                               "else fetched from the broker: trust on first use)")
    verify_p.add_argument("--subject", default=None,
                          help="require this signed subject (what the converting caller said "
                               "the input was, e.g. models:/fraud/3), exactly")
    verify_p.add_argument("--source-sha256", default=None, metavar="HEX",
                          help="require this input sha256 (the bytes the broker converted)")
    verify_p.add_argument("--data-file", action="store_true",
                          help="FILE is a data file carried with a converted model directory "
                               "(config.json, a tokenizer): accept a data file's record, and "
                               "only that (a model's record never passes for one, nor the "
                               "other way round)")
    verify_p.add_argument("--principal", action="append", default=None, metavar="NAME",
                          help="require one of these broker principals to have asked for it "
                               "(repeatable)")
    verify_p.add_argument("--server", default=None, help=_SERVER_HELP)
    verify_p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_connection_arguments(verify_p)


def _add_keys_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="the broker's provenance signing key")
    keys.add_argument("action", choices=["fetch", "export"],
                      help="fetch: the public key as the broker publishes it over the API (trust "
                           "on first use); export (from the broker's key file) is "
                           "`airlock-broker keys export`")
    keys.add_argument("-o", "--output", type=Path, default=None,
                      help="write the public key PEM here instead of stdout")
    keys.add_argument("--server", default=None, help=_SERVER_HELP)
    keys.add_argument("--json", action="store_true", help="print JSON on stdout")
    add_connection_arguments(keys)


def _add_migrate_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "migrate", help="convert every version of MLflow registered models through Airlock",
        description="Convert every version of the selected registered models in a sandbox and "
                    "register each result as a version of <NAME>-airlock holding only the "
                    "ONNX or safetensors file and its signed provenance. Re-running skips "
                    "what is done.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", action="extend", nargs="+", metavar="NAME", default=None,
                       help="registered model(s) to migrate (repeatable)")
    which.add_argument("--all", action="store_true",
                       help="every registered model except Airlock's own targets")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking server (default $MLFLOW_TRACKING_URI; required)")
    parser.add_argument("--dry-run", action="store_true",
                        help="walk the registry and say what would be done; change nothing")
    parser.add_argument("--alias", default=None,
                        help="point this alias of each target model at the newest migrated "
                             "version")
    parser.add_argument("--retry-failed", action="store_true",
                        help="convert again the versions an earlier run found rejected")
    parser.add_argument("--target-suffix", default=TARGET_SUFFIX,
                        help=f"target model name = source name + this (default {TARGET_SUFFIX})")
    parser.add_argument("--page-size", type=int, default=None,
                        help="registry search page size (default $AIRLOCK_MIGRATE_PAGE_SIZE or "
                             f"{DEFAULT_PAGE_SIZE})")
    parser.add_argument("--policy", choices=["allow_code", "safe_only"], default="allow_code",
                        help="loading policy for every conversion")
    parser.add_argument("--timeout", type=int, default=0, help="sandbox deadline per version (s)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="versions migrated at once (default: what the broker runs at "
                             "once, as its pool status says, from 1 to "
                             f"{MAX_DEFAULT_JOBS}; a broker that does not say: its warm "
                             f"{JOBS_PROFILE} sandboxes, ready or starting; "
                             f"{FALLBACK_JOBS}, what a default broker runs at once, when the "
                             "pool status cannot be read: it needs the observe or admin "
                             "role, which an anonymous or convert-only caller lacks). "
                             "--jobs 1 migrates "
                             "one version after the other")
    parser.add_argument("--server", default=None,
                        help="broker address (default $AIRLOCK_SERVER or 127.0.0.1:50051)")
    parser.add_argument("--public-key", type=Path, default=None,
                        help="the broker's provenance public key, PEM (required, or "
                             "$AIRLOCK_PUBLIC_KEY: from `airlock-broker keys export` on the "
                             "broker's host; a key fetched from the broker is not accepted)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_connection_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """The command; a reader of its output that left early (``| head``) ends it quietly
    with ``EXIT_READER_GONE``, whatever was done is done (a converted directory stays)."""
    try:
        code = _run(argv)
    except BrokenPipeError:
        if not _stdout_gone():  # another pipe or socket: not the reader of our output
            raise
        return _reader_gone()
    except SystemExit:  # argparse: --help, a usage error
        if not _flushed():
            raise SystemExit(_reader_gone()) from None
        raise
    return code if _flushed() else _reader_gone()


def _flushed() -> bool:
    """Whether stdout took what is buffered: it is flushed here, not at the interpreter's
    exit, where a reader gone would print a traceback-like warning."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return False
    return True


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has left (the kernel says so: POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no descriptor (replaced, closed)
        return False


def _reader_gone() -> int:
    """stdout pointed at /dev/null, so nothing written to it later fails again (the
    interpreter flushes it on exit); the exit code a shell gives a SIGPIPE'd command."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # no descriptor to point elsewhere
        pass
    return EXIT_READER_GONE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if _moved(args):
        return _moved_to_broker(args)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command not in _WRITES_TEMPORARIES:
        return _dispatch(args)
    from airlock_client._run_dir import UnsafeTempDir, run_directory

    code: int | None = None
    try:
        with run_directory() as (work, removed):
            if removed:
                print(f"airlock: removed {len(removed)} work director"
                      f"{'y' if len(removed) == 1 else 'ies'} that killed commands left in "
                      f"{printable(str(work.parent))}", file=sys.stderr)
            code = _dispatch(args)
    except UnsafeTempDir as exc:
        return usage_error(args.command, f"{exc.reason}: {exc.message}", as_json=args.json,
                           reason=exc.reason)
    except KeyboardInterrupt:
        if code is None:  # the command's own summary, if any, was not printed
            return interrupted(args.command, "stopped by Ctrl-C", as_json=args.json)
        print(f"airlock {args.command}: interrupted while its work directory was removed "
              "(the next command removes what is left)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


def _dispatch(args: argparse.Namespace) -> int:
    # Each subcommand's module is imported here, when it runs (see the module docstring).
    if args.command == "pool":
        from airlock_client._admin_cli import run_pool

        return run_pool(args)
    if args.command == "selftest":
        from airlock_client._admin_cli import run_selftest

        return run_selftest(args)
    if args.command == "verify":
        from airlock_client._provenance_cli import run_verify

        return run_verify(args)
    if args.command == "keys":
        from airlock_client._provenance_cli import run_keys

        return run_keys(args)
    if args.command == "migrate":
        from airlock_client._migrate_cli import run_migrate

        return run_migrate(args)
    from airlock_client._convert_cli import run_convert

    try:
        return run_convert(args)
    except KeyboardInterrupt:  # a model directory says more itself (_convert_dir_cli)
        return interrupted("convert", "stopped by Ctrl-C before the result was complete",
                           as_json=args.json)


def _moved(args: argparse.Namespace) -> bool:
    return args.command in {"serve", "token"} or (args.command == "keys"
                                                  and args.action == "export")


def _moved_to_broker(args: argparse.Namespace) -> int:
    what = "keys export" if args.command == "keys" else args.command
    example = {"serve": "serve --listen 127.0.0.1:50051", "token": "token create ...",
               "keys export": "keys export ..."}[what]
    print(f"airlock {what}: the broker's commands are in `{BROKER_COMMAND}`: run "
          f"`{BROKER_COMMAND} {example}` (install airlock-broker)", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

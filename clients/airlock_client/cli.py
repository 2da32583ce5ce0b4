"""The ``airlock`` command.

Exit codes (other tools depend on them):

====  =====================================================
0     converted (verify: the file matches its signed provenance)
1     the artifact was rejected or its conversion failed (verify: verification failed)
2     usage error
3     the service is unreachable or unavailable
4     not authenticated, or not authorized for this operation
====  =====================================================

``airlock migrate`` adds 5 (nothing to do); its table is in ``_migrate_cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from airlock_client import _cli_source, mlflow_source
from airlock_client._cli_connection import add_connection_arguments, client_options
from airlock_client._client import Client, default_address
from airlock_client._errors import (
    AccessDenied,
    AirlockError,
    ConversionError,
    ModelSourceError,
    ServiceUnavailable,
)
from airlock_client._migrate_cli import add_migrate_parser, run_migrate
from airlock_client._progress import ProgressBar, busy_notice
from airlock_client._provenance_cli import (
    add_keys_parser,
    add_verify_parser,
    run_keys,
    run_verify,
    write_provenance,
)
from airlock_client._terminal import printable
from airlock_client._types import ConversionResult, PoolStatus, TensorSpec
from airlock_client.provenance import ProvenanceError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_DENIED = 4

_SUFFIX = {"onnx": ".onnx", "safetensors": ".safetensors"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own exit code is 2 as well; be explicit
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="airlock", description="Convert untrusted model files to ONNX or "
                     "safetensors inside throwaway sandboxes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the broker (needs the broker installed)")
    _add_serve_arguments(serve)

    token = sub.add_parser("token", help="mint bearer tokens for the broker's [auth] config")
    _add_token_arguments(token)

    pool = sub.add_parser("pool", help="operate the warm sandbox pools")
    pool.add_argument("action", choices=["status", "restart", "drain", "resume"])
    pool.add_argument("--profile", default=None, help="restart only this profile")
    pool.add_argument("--server", default=None,
                      help="broker address (default $AIRLOCK_SERVER or 127.0.0.1:50051)")
    pool.add_argument("--json", action="store_true", help="print JSON on stdout")
    add_connection_arguments(pool)

    selftest = sub.add_parser("selftest", help="run the isolation self-test on the broker")
    selftest.add_argument("--server", default=None,
                          help="broker address (default $AIRLOCK_SERVER or 127.0.0.1:50051)")
    selftest.add_argument("--json", action="store_true", help="print JSON on stdout")
    add_connection_arguments(selftest)

    convert = sub.add_parser("convert", help="convert one artifact")
    convert.add_argument("input", help="the artifact (pickle, joblib, PyTorch, ...), an MLflow "
                         "model directory, or models:/NAME/VERSION, models:/NAME@ALIAS, "
                         "runs:/RUN/PATH")
    convert.add_argument("--tracking-uri", default=None,
                         help="MLflow tracking (and registry) server for models:/ and runs:/ "
                              "(default $MLFLOW_TRACKING_URI)")
    convert.add_argument("-o", "--output", type=Path, default=None,
                         help="where to write the result (default: beside the input)")
    convert.add_argument("--to", dest="target", choices=["auto", "onnx", "safetensors"],
                         default="auto")
    convert.add_argument("--input-shape", action="append", default=[], metavar="[NAME:]DIMS",
                         help="a model input's shape, e.g. 1,20 or x:-1,20 (-1 = free); repeat "
                              "for several inputs")
    convert.add_argument("--input-dtype", default="float32", help="dtype of the inputs")
    convert.add_argument("--format", dest="declared", default=None,
                         choices=["pickle", "cloudpickle", "joblib", "pytorch", "torchscript",
                                  "torch_export", "numpy", "onnx", "safetensors", "mlflow"],
                         help="what the artifact is declared to be (checked against its bytes)")
    convert.add_argument("--policy", choices=["allow_code", "safe_only"], default="allow_code",
                         help="safe_only refuses any loader that executes the artifact's code")
    convert.add_argument("--timeout", type=int, default=0, help="sandbox deadline in seconds")
    convert.add_argument("--server", default=None,
                         help="broker address (default $AIRLOCK_SERVER or 127.0.0.1:50051)")
    convert.add_argument("--public-key", type=Path, default=None,
                         help="the broker's provenance public key, PEM (default "
                              "$AIRLOCK_PUBLIC_KEY; else the key the broker publishes)")
    convert.add_argument("--subject", default=None,
                         help="what the input is, signed into its provenance (default: the "
                              "URI as given, or the input's absolute path)")
    convert.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_connection_arguments(convert)
    add_verify_parser(sub)
    add_keys_parser(sub)
    add_migrate_parser(sub)
    return parser


def parse_shape(text: str, dtype: str, index: int) -> TensorSpec:
    name, _, dims = text.rpartition(":")
    try:
        shape = tuple(-1 if d.strip() in {"-1", "?", "N", "n"} else int(d)
                      for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --input-shape {text!r}: use e.g. 1,20") from None
    if not shape or any(d < -1 for d in shape):
        raise argparse.ArgumentTypeError(f"bad --input-shape {text!r}")
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "token":
        return _token(args)
    if args.command == "pool":
        return _pool(args)
    if args.command == "selftest":
        return _selftest(args)
    if args.command == "verify":
        return run_verify(args)
    if args.command == "keys":
        return run_keys(args)
    if args.command == "migrate":
        return run_migrate(args)
    return _convert(args)


def _pool(args: argparse.Namespace) -> int:
    try:
        with Client(args.server or default_address(), retry_attempts=1,
                    **client_options(args)) as client:
            if args.action == "status":
                pools = client.pool_status()
                if args.json:
                    print(json.dumps({"pools": [asdict(p) for p in pools]}))
                else:
                    _print_pools(pools)
            elif args.action == "restart":
                replaced = client.restart_pools(args.profile)
                _say(args, {"action": "restart", "replaced": replaced},
                     f"replacing {replaced} warm container(s); jobs in flight are unaffected")
            elif args.action == "drain":
                client.drain_pools()
                _say(args, {"action": "drain"}, "drained: new jobs are refused until resume")
            else:
                client.resume_pools()
                _say(args, {"action": "resume"}, "resumed")
    except (ServiceUnavailable, ConversionError) as exc:
        return _operation_failed("pool", exc)
    except ValueError as exc:
        print(f"airlock pool: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _selftest(args: argparse.Namespace) -> int:
    try:
        with Client(args.server or default_address(), retry_attempts=1,
                    **client_options(args)) as client:
            report = client.selftest()
    except (ServiceUnavailable, ConversionError) as exc:
        return _operation_failed("selftest", exc)
    except ValueError as exc:
        print(f"airlock selftest: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        for check in report.checks:
            mark = "ok  " if check.passed else "WAIV" if check.waived else "FAIL"
            print(f"[{mark}] {printable(check.name):<22} {printable(check.source):<8} "
                  f"{printable(check.detail)}")
            if check.waived and not check.passed:
                print(f"       waived: {printable(check.waived)}")
        verdict = "passed" if report.passed else "FAILED"
        print(f"self-test {verdict} (runtime {printable(report.runtime)}, image "
              f"{printable(report.image_id[:19])})")
    return EXIT_OK if report.passed else EXIT_FAILED


def _operation_failed(command: str, exc: ServiceUnavailable | ConversionError) -> int:
    print(f"airlock {command}: {printable(exc.reason)}: {printable(exc.message)}",
          file=sys.stderr)
    if isinstance(exc, AccessDenied):
        return EXIT_DENIED
    return EXIT_UNAVAILABLE if isinstance(exc, ServiceUnavailable) else EXIT_FAILED


def _say(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc) if args.json else text)


def _print_pools(pools: Sequence[PoolStatus]) -> None:
    header = f"{'PROFILE':<9}{'WARM':>5}{'BUSY':>5}{'START':>6}{'FAILED':>7}{'WARM-HITS':>10}" \
             f"{'COLD':>6}{'OLDEST':>8}  RUNTIME  IMAGE"
    print(header)
    for p in pools:
        print(f"{printable(p.profile):<9}{p.warm:>5}{p.busy:>5}{p.starting:>6}"
              f"{p.failed_starts:>7}{p.served_warm:>10}{p.served_cold:>6}"
              f"{p.oldest_warm_seconds:>7.0f}s  {printable(p.runtime):<7}  "
              f"{printable(p.image_id[:19])}{'  (draining)' if p.draining else ''}")
    for reason in sorted({p.unavailable for p in pools if p.unavailable}):
        print(f"UNAVAILABLE: {printable(reason)}")


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    # The broker is a separate package; the client library never imports it otherwise.
    try:
        from airlock_broker.__main__ import add_arguments
    except ImportError:
        return
    add_arguments(parser)


def _add_token_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from airlock_broker.security.token_command import add_arguments
    except ImportError:
        return
    add_arguments(parser)


def _token(args: argparse.Namespace) -> int:
    try:
        from airlock_broker.security.token_command import run
    except ImportError:
        print("airlock token: the broker is not installed here (pip install airlock)",
              file=sys.stderr)
        return EXIT_USAGE
    return run(args)


def _serve(args: argparse.Namespace) -> int:
    try:
        from airlock_broker.__main__ import run
    except ImportError:
        print("airlock serve: the broker is not installed here (pip install airlock)",
              file=sys.stderr)
        return EXIT_USAGE
    return run(args)


def _default_output(source: Path) -> Path:
    """A temporary name beside the input; renamed once the output format is known."""
    return source.with_name(f".{source.name}.airlock-out")


def _final_name(source: Path, fmt: str) -> Path:
    target = source.with_suffix(_SUFFIX[fmt])
    return target.with_name(f"{source.stem}.converted{_SUFFIX[fmt]}") if target == source \
        else target


def _convert(args: argparse.Namespace) -> int:
    try:
        inputs = tuple(parse_shape(s, args.input_dtype, i) for i, s in enumerate(args.input_shape))
    except argparse.ArgumentTypeError as exc:
        return _usage(str(exc))
    if (problem := _cli_source.usage_problem(args.input)) is not None:
        return _usage(problem)
    try:
        options = client_options(args)
        with _cli_source.opened(args.input, args.tracking_uri) as source, \
                Client(args.server or default_address(), public_key=args.public_key,
                       **options) as client:
            output = args.output or _default_output(source.output_base)
            size = 0 if source.is_directory else source.path.stat().st_size
            result = client.convert(
                source.path, output, target=args.target, inputs=inputs,
                declared_format=args.declared, loading_policy=args.policy,
                job_timeout=args.timeout,
                progress=None if args.json else ProgressBar.for_upload("uploading", size),
                on_busy=busy_notice("convert"),
                subject=_cli_source.default_subject(args.input) if args.subject is None
                else args.subject)
    except ValueError as exc:
        return _usage(str(exc))
    except ModelSourceError as exc:
        status = "failed" if exc.reason == mlflow_source.DOWNLOAD_FAILED else "rejected"
        return _report_error(args, status, exc.reason, exc.message, EXIT_FAILED)
    except ServiceUnavailable as exc:
        return _report_error(args, "failed", exc.reason, exc.message, EXIT_UNAVAILABLE)
    except AccessDenied as exc:
        return _report_error(args, exc.kind, exc.reason, exc.message, EXIT_DENIED)
    except ConversionError as exc:
        return _report_error(args, exc.kind, exc.reason, exc.message, EXIT_FAILED, exc.job_id)
    except ProvenanceError as exc:
        code = EXIT_USAGE if exc.reason == "BAD_PUBLIC_KEY" else EXIT_FAILED
        return _report_error(args, "rejected", exc.reason, exc.message, code)
    except AirlockError as exc:
        return _report_error(args, "failed", getattr(exc, "reason", "ERROR"), str(exc),
                             EXIT_FAILED)
    if args.output is None:
        final = _final_name(source.output_base, result.format)
        output.replace(final)
        result = ConversionResult(**{**result.__dict__, "output": final})
    provenance = write_provenance(result.output, result.provenance)
    _report_ok(args, result, provenance)
    return EXIT_OK


def _usage(message: str) -> int:
    print(f"airlock convert: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _report_ok(args: argparse.Namespace, result: ConversionResult, provenance: Path) -> None:
    if args.json:
        doc = {
            "status": "ok", "reason": None, "message": "converted",
            "output": str(result.output), "format": result.format, "sha256": result.sha256,
            "size": result.size, "job_id": result.job_id,
            "detected_format": result.detected_format, "assurance": result.assurance,
            "integrity_note": result.integrity_note,
            "loading_policy": result.loading_policy, "input_sha256": result.input_sha256,
            "executed_artifact_code": result.report.executed_artifact_code,
            "parity": [asdict(p) for p in result.report.parity],
            "warnings": list(result.report.warnings),
            "duration_seconds": round(result.duration_seconds, 3),
            "provenance": str(provenance),
            "provenance_key": (result.provenance_record.key_fingerprint
                               if result.provenance_record else None),
            "provenance_key_source": result.provenance_key_source,
            "transfer": result.transfer,
        }
        print(json.dumps(doc))
        return
    t = printable  # every field of the result came from the broker
    print(f"converted {t(args.input)} -> {t(result.output)} ({t(result.format)}, {result.size} "
          "bytes)")
    print(f"  sha256     {t(result.sha256)}")
    executed = "yes" if result.report.executed_artifact_code else "no"
    print(f"  detected   {t(result.detected_format)}; loader {t(result.report.loader or '-')}; "
          f"artifact code executed in sandbox: {executed}")
    note = f" ({t(result.integrity_note)})" if result.integrity_note else ""
    print(f"  assurance  {t(result.assurance)}{note}")
    for p in result.report.parity:
        verdict = "ok" if p.passed else "FAILED"
        print(f"  parity     {t(p.output_name)}: max |diff| {p.max_abs_diff:.3g} over "
              f"{p.samples} samples ({t(p.tolerance)}) {verdict}")
    for warning in result.report.warnings:
        print(f"  warning    {t(warning)}")
    fp = result.provenance_record.key_fingerprint[:16] if result.provenance_record else "-"
    print(f"  provenance {t(provenance)} (verified, key sha256:{t(fp)}...)")
    if result.provenance_key_source != "pinned":
        print("  key        as published by the broker (trust on first use); pin it with "
              "--public-key or AIRLOCK_PUBLIC_KEY")


def _report_error(args: argparse.Namespace, status: str, reason: str, message: str, code: int,
                  job_id: str = "") -> int:
    if args.json:
        print(json.dumps({"status": status, "reason": reason, "message": message,
                          "output": None, "format": None, "sha256": None,
                          "job_id": job_id or None}))
    else:
        print(f"airlock convert: {status}: {printable(reason)}: {printable(message)}",
              file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

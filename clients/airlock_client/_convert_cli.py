"""``airlock convert``: send one artifact to the broker, write the verified result and its
signed provenance beside it, and say what the broker vouches for."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from airlock_client import _cli_source, _hf_dir
from airlock_client._cli_connection import client_options
from airlock_client._cli_exits import EXIT_FAILED, EXIT_OK, failure, usage_of
from airlock_client._client import Client, default_address
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
    AirlockError,
    ConversionError,
)
from airlock_client._progress import Heartbeat, ProgressBar, busy_notice
from airlock_client._terminal import printable
from airlock_client._types import ConversionResult, TensorSpec
from airlock_client.provenance import write_provenance


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


def run_convert(args: argparse.Namespace) -> int:
    try:
        dtype = args.input_dtype or "float32"
        inputs = tuple(parse_shape(s, dtype, i) for i, s in enumerate(args.input_shape))
    except argparse.ArgumentTypeError as exc:
        return usage_of(args, str(exc))
    if args.input_dtype and not inputs:  # the model's own width, filled in by the sandbox
        inputs = (TensorSpec(name="X", dtype=args.input_dtype, shape=(-1, -1)),)
    if len(args.input) > 1:
        from airlock_client._convert_many_cli import run_convert_many

        return run_convert_many(args, inputs)
    args.input = args.input[0]
    if (problem := _cli_source.usage_problem(args.input)) is not None:
        return usage_of(args, problem)
    try:
        with _cli_source.opened(args.input, args.tracking_uri) as source:
            kind = _hf_dir.kind(source.path) if source.is_directory else None
            if source.is_directory and kind is None:
                return usage_of(args, f"{args.input} is neither an MLflow model (no MLmodel "
                                f"file) nor a PyTorch model directory (no {_hf_dir.WEIGHTS}, "
                                f"{_hf_dir.WEIGHTS_INDEX}, {_hf_dir.ADAPTER_WEIGHTS} or one "
                                f"checkpoint: *.ckpt, *.pt, *.pth)")
            if kind == "pytorch":
                from airlock_client._convert_dir_cli import run_convert_directory

                return run_convert_directory(args, source.path, source.output_base)
            if args.jobs is not None:
                return usage_of(args, "--jobs applies to a PyTorch model directory only")
            if args.output is not None and args.output.is_dir():
                return usage_of(args, f"-o {args.output} is a directory: name the output file "
                                f"(-o {args.output}/NAME.onnx), or give several inputs to "
                                "convert into a directory")
            if args.output is None and (problem := placement_problem(
                    [(args.input, source.output_base)], overwrite=args.overwrite)):
                return usage_of(args, problem)
            options = client_options(args)
            with Client(args.server or default_address(), public_key=args.public_key,
                        **options) as client:
                output = args.output or default_output(source.output_base)
                size = 0 if source.is_directory else source.path.stat().st_size
                what = f"converting {printable(str(args.input))}" + (
                    f" ({size / 1e9:.1f} GB)" if size >= 10**8 else "")
                with Heartbeat("convert", lambda: what):
                    result = client.convert(
                        source.path, output, target=args.target, inputs=inputs,
                        declared_format=args.declared,
                        loading_policy=args.policy or FILE_POLICY, job_timeout=args.timeout,
                        progress=None if args.json
                        else ProgressBar.for_upload("uploading", size),
                        on_busy=busy_notice("convert"),
                        subject=_cli_source.default_subject(args.input)
                        if args.subject is None else args.subject,
                        parity_tolerance=args.parity_tolerance,
                        keep_training_state=args.keep_training_state,
                        sample_input=args.sample_input)
    except ValueError as exc:
        return usage_of(args, str(exc))
    except AirlockError as exc:
        status, code = failure(exc)
        job_id = exc.job_id if isinstance(exc, ConversionError) else ""
        return _report_error(args, status, exc.reason, exc.message, code, job_id)
    except OSError as exc:  # the input cannot be read, the output's directory not written
        where = exc.filename2 or exc.filename
        return _report_error(args, "failed", CLIENT_ERROR,
                             f"{exc.strerror or exc}{f': {where}' if where else ''}; nothing "
                             "was converted", EXIT_FAILED)
    try:
        if args.output is None:
            result = placed(result, output, source.output_base)
        provenance = write_provenance(result.output, result.provenance)
    except OSError as exc:  # the final name is a directory, the disk is full, ...
        return _report_error(
            args, "failed", OUTPUT_NOT_PLACED,
            f"converted, but it could not be put in place ({exc.strerror or exc}: "
            f"{exc.filename2 or exc.filename or ''}); the converted file is kept as "
            f"{result.output}", EXIT_FAILED, result.job_id)
    _report_ok(args, result, provenance)
    return EXIT_OK


def _report_ok(args: argparse.Namespace, result: ConversionResult, provenance: Path) -> None:
    if args.json:
        print(json.dumps(result_document(result, provenance)))
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
    if result.report.parity_inputs:
        print(f"  parity on  {t(result.report.parity_inputs.replace('+', ' and '))} rows")
    for p in result.report.parity:
        verdict = "ok" if p.passed else "FAILED"
        print(f"  parity     {t(p.output_name)}: max |diff| {p.max_abs_diff:.3g}, relative "
              f"{p.max_rel_diff:.3g}, over {p.samples} samples ({t(p.tolerance)}) {verdict}")
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
        print(json.dumps(failure_document(status, reason, message, job_id)))
    else:
        print(f"airlock convert: {status}: {printable(reason)}: {printable(message)}",
              file=sys.stderr)
    return code

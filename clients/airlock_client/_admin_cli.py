"""``airlock pool`` and ``airlock selftest``: the broker's admin calls, over gRPC."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from airlock_client._cli_connection import client_options
from airlock_client._cli_exits import EXIT_FAILED, EXIT_OK, failed, usage_error
from airlock_client._client import Client, default_address
from airlock_client._errors import ConversionError, ServiceUnavailable
from airlock_client._terminal import printable
from airlock_client._types import PoolStatus


def run_pool(args: argparse.Namespace) -> int:
    if args.profile is not None and args.action != "restart":
        # Drain and resume act on every pool, and status shows them all: a profile given
        # there would look obeyed while the whole broker was drained.
        return usage_error("pool", f"--profile applies to restart only; {args.action} acts "
                           "on every pool", as_json=args.json)
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
        return failed("pool", exc, as_json=args.json)
    except ValueError as exc:
        return usage_error("pool", str(exc), as_json=args.json)
    return EXIT_OK


def run_selftest(args: argparse.Namespace) -> int:
    try:
        with Client(args.server or default_address(), retry_attempts=1,
                    **client_options(args)) as client:
            report = client.selftest()
    except (ServiceUnavailable, ConversionError) as exc:
        return failed("selftest", exc, as_json=args.json)
    except ValueError as exc:
        return usage_error("selftest", str(exc), as_json=args.json)
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


def _say(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc) if args.json else text)


def _print_pools(pools: Sequence[PoolStatus]) -> None:
    header = f"{'PROFILE':<9}{'WARM':>5}{'READY':>6}{'IMPORTING':>10}{'BUSY':>5}{'START':>6}" \
             f"{'FAILED':>7}{'WARM-HITS':>10}{'COLD':>6}{'OLDEST':>8}  RUNTIME  IMAGE"
    print(header)
    for p in pools:
        print(f"{printable(p.profile):<9}{p.warm:>5}{p.ready:>6}{p.importing:>10}{p.busy:>5}"
              f"{p.starting:>6}"
              f"{p.failed_starts:>7}{p.served_warm:>10}{p.served_cold:>6}"
              f"{p.oldest_warm_seconds:>7.0f}s  {printable(p.runtime):<7}  "
              f"{printable(p.image_id[:19])}{'  (draining)' if p.draining else ''}")
    for reason in sorted({p.unavailable for p in pools if p.unavailable}):
        print(f"UNAVAILABLE: {printable(reason)}")

"""``python -m airlock_broker`` (and ``airlock serve``): run the broker."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from airlock_broker.api.local_listeners import unix_socket_setting
from airlock_broker.api.server import serve
from airlock_broker.config import DEFAULT_LISTEN, BrokerConfig
from airlock_broker.ops import logs
from airlock_broker.sandboxes.sandbox import SandboxUnavailable
from airlock_broker.security.keys import SigningKeyError
from airlock_broker.security.state_dirs import StateDirError

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
#: A state directory or file is not the broker's alone (state_dirs.py): fix it, then restart.
EXIT_UNSAFE_STATE = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default=None, help=f"HOST:PORT (default {DEFAULT_LISTEN})")
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    parser.add_argument("--metrics", default=None, metavar="HOST:PORT",
                        help="serve Prometheus metrics here (e.g. 127.0.0.1:9464; loopback "
                             "only unless --metrics-public)")
    parser.add_argument("--metrics-public", action="store_true", default=None,
                        help="allow --metrics beyond loopback: anyone who can reach it sees "
                             "the broker's load and failures")
    parser.add_argument("--unix-socket", default=None, metavar="PATH",
                        help="local clients' socket (default /run/airlock/broker.sock as "
                             "root, $AIRLOCK_SOCKET; 'none': no socket)")
    parser.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                        help="the broker's state root: spool, results, audit log, signing key "
                             "(default /var/lib/airlock as root, else $XDG_STATE_HOME/airlock; "
                             "$AIRLOCK_STATE_DIR). Must be the broker user's alone, 0700")
    parser.add_argument("--runtime", default=None, metavar="runc|runsc",
                        help="OCI runtime for sandboxes (overrides the config file); also "
                             "runsc-<suffix>: another registration of runsc")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="allow listening beyond loopback without [auth]: anyone who can "
                             "reach the port may convert (operating the pools also needs "
                             "[auth] anonymous_admin)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="auto", choices=["auto", "json", "text"],
                        help="auto: text on a terminal, JSON lines otherwise")


def run(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, args.log_format)
    overrides: dict[str, Any] = {"listen": args.listen} if args.listen else {}
    if args.metrics:
        overrides["metrics_listen"] = args.metrics
    if args.metrics_public:
        overrides["metrics_public"] = True
    if args.state_dir is not None:
        overrides["state_root"] = args.state_dir.absolute()
    if args.unix_socket is not None:
        overrides["unix_socket"] = unix_socket_setting(args.unix_socket)
    try:
        config = BrokerConfig.load(args.config, insecure_no_auth=args.insecure_no_auth,
                                   **overrides)
        if args.runtime:
            config = replace(config, sandbox=replace(config.sandbox, runtime=args.runtime))
    except (ValueError, OSError) as exc:
        print(f"airlock serve: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        asyncio.run(serve(config))
    except SandboxUnavailable as exc:
        print(f"airlock serve: the sandbox is unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except SigningKeyError as exc:
        print(f"airlock serve: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except StateDirError as exc:
        print(f"airlock serve: refusing to start: {exc}", file=sys.stderr)
        return EXIT_UNSAFE_STATE
    except OSError as exc:
        print(f"airlock serve: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="airlock serve", description="Run the Airlock broker.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""``airlock-broker`` (and ``python -m airlock_broker``): the broker's operator commands.

::

    airlock-broker serve [--listen HOST:PORT] [--config FILE] ...   run the broker
    airlock-broker token create --principal NAME --role ROLE ...    mint a bearer token
    airlock-broker keys export [--config FILE] [-o FILE] [--json]   the provenance public key

The client's ``airlock`` command never imports this package; its ``pool``, ``selftest`` and
``keys fetch`` talk to a running broker over gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from airlock_broker.api.auth import PrincipalFilter
from airlock_broker.api.server import serve
from airlock_broker.config import DEFAULT_LISTEN, BrokerConfig
from airlock_broker.ops import logs
from airlock_broker.ops.key_export import export_public
from airlock_broker.sandboxes.sandbox import SandboxUnavailable
from airlock_broker.security import token_command
from airlock_broker.security.exposure import unix_socket_setting
from airlock_broker.security.keys import SigningKeyError
from airlock_broker.security.state_dirs import StateDirError

PROG = "airlock-broker"
EXIT_OK = 0
EXIT_FAILED = 1
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
    logs.configure(args.log_level, args.log_format, [PrincipalFilter()])  # whose job a line is
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
        print(f"{PROG} serve: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        asyncio.run(serve(config))
    except SandboxUnavailable as exc:
        print(f"{PROG} serve: the sandbox is unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except SigningKeyError as exc:
        print(f"{PROG} serve: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except StateDirError as exc:
        print(f"{PROG} serve: refusing to start: {exc}", file=sys.stderr)
        return EXIT_UNSAFE_STATE
    except OSError as exc:
        print(f"{PROG} serve: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["export"],
                        help="export: the public key from the key file on this host (creates "
                             "the key if there is none, with the same path and rules as serve)")
    parser.add_argument("--config", type=Path, default=None, help="broker TOML configuration "
                        "(its [provenance] key_path)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="write the public key PEM here instead of stdout")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")


def run_keys(args: argparse.Namespace) -> int:
    try:
        pem, fp, created = export_public(args.config)
    except (SigningKeyError, OSError, ValueError) as exc:
        print(f"{PROG} keys: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if created:
        print(f"{PROG} keys: no key existed; created one", file=sys.stderr)
    from airlock_client.provenance import emit_public_key

    emit_public_key(pem, fp, args.output, args.json)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="The Airlock broker's operator "
                                     "commands.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("serve", help="run the broker"))
    token_command.add_arguments(sub.add_parser(
        "token", help="mint bearer tokens for the broker's [auth] config"))
    add_keys_arguments(sub.add_parser("keys", help="the broker's provenance signing key"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        return token_command.run(args)
    if args.command == "keys":
        return run_keys(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

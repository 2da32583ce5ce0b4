"""The CLI's connection options (TLS, client certificate, token), shared by every subcommand.

There is no ``--token VALUE``: a command line is visible to every user of the machine (``ps``)
and lands in shell history. The token comes from ``AIRLOCK_TOKEN`` or ``--token-file``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from airlock_client._regular_files import read_small

_MAX_TOKEN_FILE = 4096


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection (each defaults to its environment variable)")
    group.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                       help="read the bearer token from FILE ('-': stdin); default "
                            "$AIRLOCK_TOKEN")
    group.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                       help="CA of the broker's certificate; turns TLS on ($AIRLOCK_TLS_CA)")
    group.add_argument("--tls", action="store_true", default=None,
                       help="TLS with the system's CAs ($AIRLOCK_TLS=1)")
    group.add_argument("--client-cert", type=Path, default=None, metavar="PEM",
                       help="client certificate for mutual TLS ($AIRLOCK_CLIENT_CERT)")
    group.add_argument("--client-key", type=Path, default=None, metavar="PEM",
                       help="its private key ($AIRLOCK_CLIENT_KEY)")
    group.add_argument("--no-local-transfer", action="store_true", default=False,
                       help="always stream through gRPC, even to a broker on this machine "
                            "($AIRLOCK_LOCAL_TRANSFER=0)")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Client`` keyword arguments from the parsed flags (``ValueError`` for a bad token file)."""
    token = None
    if args.token_file is not None:
        try:
            if str(args.token_file) == "-":
                raw = sys.stdin.read(_MAX_TOKEN_FILE + 1)
            else:
                raw = read_small(args.token_file, _MAX_TOKEN_FILE).decode()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the token file {args.token_file}: {exc}") from None
        token = raw.strip()
        if not token or len(token) > _MAX_TOKEN_FILE:
            raise ValueError(f"{args.token_file} does not hold a token")
    options: dict[str, Any] = {
        "token": token, "tls": args.tls, "tls_ca": args.tls_ca,
        "client_cert": args.client_cert, "client_key": args.client_key,
        "local_transfer": False if getattr(args, "no_local_transfer", False) else None}
    if getattr(args, "timeout", 0) > 0:
        from airlock_client._types import CALL_SECONDS  # when a command runs, not at start

        # A call's deadline holds the wait for a place, the upload, the job's sandboxes (two
        # when integrity is verified, each given --timeout) and the answer: the client's
        # default (900 s) beside them, so a longer --timeout is never cut short by it.
        options["timeout"] = CALL_SECONDS + 2 * args.timeout
    return options

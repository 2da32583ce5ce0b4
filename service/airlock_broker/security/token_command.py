"""``airlock-broker token create``: mint a bearer token and print the config lines that accept it.

The token is printed once and kept nowhere; the broker's config holds only its SHA-256
(``auth_config.token_digest``). Losing a token means minting a new one and deleting the old
entry, which is also how a token is revoked (then restart the broker).
"""

from __future__ import annotations

import argparse
import json
import sys

from airlock_broker.security.auth_config import Role, TokenEntry, mint_token, token_digest

EXIT_OK = 0
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="token_action", required=True)
    create = actions.add_parser("create", help="mint a token; print it once, with its config")
    create.add_argument("--principal", required=True,
                        help="who the token stands for (the audit log's principal)")
    create.add_argument("--role", action="append", required=True, dest="roles",
                        choices=[r.value for r in Role],
                        help="a role it grants: convert (conversions), admin (pools, self-test);"
                             " repeat for both")
    create.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def config_snippet(entry: TokenEntry) -> str:
    roles = ", ".join(f'"{r}"' for r in sorted(entry.roles))
    return (f'[[auth.tokens]]\nprincipal = "{entry.principal}"\nroles = [{roles}]\n'
            f'sha256 = "{entry.sha256}"\n')


def run(args: argparse.Namespace) -> int:
    token = mint_token()
    try:
        entry = TokenEntry(principal=args.principal, roles=frozenset(Role(r) for r in args.roles),
                           sha256=token_digest(token))
    except ValueError as exc:
        print(f"airlock-broker token create: {exc}", file=sys.stderr)
        return EXIT_USAGE
    snippet = config_snippet(entry)
    if args.json:
        print(json.dumps({"token": token, "principal": entry.principal,
                          "roles": sorted(entry.roles), "sha256": entry.sha256,
                          "config": snippet}))
        return EXIT_OK
    print(f"token: {token}")
    print("  shown once and stored nowhere: hand it to the client (AIRLOCK_TOKEN or "
          "--token-file)\n")
    print("add to the broker's config (or its tokens_file), then restart the broker:")
    print(snippet, end="")
    return EXIT_OK

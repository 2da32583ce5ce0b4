"""The ``airlock`` command's exit codes, in one place (other tools depend on them).

====  =====================================================
0     done (convert: converted; verify: the file matches its signed provenance)
1     the artifact was rejected or its conversion failed (verify: verification failed)
2     usage error
3     the service is unreachable or unavailable
4     not authenticated, or not authorized for this operation
130   convert: interrupted (Ctrl-C), as a shell reports a command that SIGINT ended
141   whatever read the output left before it was written (``airlock ... | head``), as a
      shell reports a command that SIGPIPE ended; the work itself was done
====  =====================================================

``airlock migrate`` adds 5 (nothing to do); its table is in ``_migrate_cli``.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Final

from airlock_client._errors import (
    DOWNLOAD_FAILED,
    AccessDenied,
    AirlockError,
    ConversionError,
    ModelSourceError,
    ProvenanceError,
    ServiceUnavailable,
)
from airlock_client._terminal import printable

if TYPE_CHECKING:
    import argparse

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3
EXIT_DENIED: Final = 4
#: 128 + SIGINT: what a shell reports for a command that Ctrl-C ended, so that scripts and
#: `set -e` treat it as they treat any other interrupted command.
EXIT_INTERRUPTED: Final = 130
#: 128 + SIGPIPE: the reader of stdout went away (``| head``). Python ignores SIGPIPE, so
#: without this a write there would end in a BrokenPipeError traceback.
EXIT_READER_GONE: Final = 141


#: ``reason`` in the ``--json`` object of a command line that cannot run, and of Ctrl-C.
USAGE: Final = "USAGE"
INTERRUPTED: Final = "INTERRUPTED"


def usage_of(args: argparse.Namespace, message: str) -> int:
    """``usage_error`` for the parsed command line ``args`` (its command, its ``--json``)."""
    return usage_error(args.command, message, as_json=args.json)


def usage_error(command: str, message: str, *, as_json: bool = False,
                reason: str = USAGE) -> int:
    """Say on stderr why this command line cannot run; with ``--json`` also print on stdout
    the one object ``--json`` promises (a script reads stdout alone), with ``reason``.
    Returns EXIT_USAGE.

    The message often names a file, and a name is someone else's text once a glob picked it:
    the terminal sees it escaped (``printable``), the JSON as it is (JSON escapes it)."""
    print(f"airlock {command}: error: {printable(message)}", file=sys.stderr)
    if as_json:
        _json_failure("usage", reason, message)
    return EXIT_USAGE


def interrupted(command: str, what_was_left: str, *, as_json: bool = False) -> int:
    """Say on stderr, in one line, that Ctrl-C stopped ``command`` and what it left (and the
    ``--json`` object, as ``usage_error``); the exit code. A traceback would say nothing the
    user does not know and hide what was left."""
    print(f"airlock {command}: interrupted: {printable(what_was_left)}", file=sys.stderr)
    if as_json:
        _json_failure("interrupted", INTERRUPTED, what_was_left)
    return EXIT_INTERRUPTED


def _json_failure(status: str, reason: str, message: str) -> None:
    print(json.dumps({"ok": False, "status": status, "reason": reason, "message": message,
                      "output": None}))


def failure(exc: AirlockError) -> tuple[str, int]:
    """How a command reports ``exc``: its status word (``rejected``: the artifact's or the
    caller's doing; ``failed``: anything else) and its exit code."""
    if isinstance(exc, ServiceUnavailable):
        return "failed", EXIT_UNAVAILABLE
    if isinstance(exc, AccessDenied):
        return exc.kind, EXIT_DENIED
    if isinstance(exc, ConversionError):
        return exc.kind, EXIT_FAILED
    if isinstance(exc, ProvenanceError):
        return "rejected", EXIT_USAGE if exc.reason == "BAD_PUBLIC_KEY" else EXIT_FAILED
    if isinstance(exc, ModelSourceError):
        return "failed" if exc.reason == DOWNLOAD_FAILED else "rejected", EXIT_FAILED
    return "failed", EXIT_FAILED


def failed(command: str, exc: AirlockError, *, as_json: bool = False,
           doing: str = "") -> int:
    """Say on stderr why ``command`` failed (its reason and sentence, escaped; ``doing``:
    what it was doing, said first), with ``--json`` also the one object on stdout, as
    ``usage_error``; the exit code (``failure``)."""
    from airlock_client._terminal import printable

    status, code = failure(exc)
    message = f"{doing}: {exc.message}" if doing else exc.message
    print(f"airlock {command}: {printable(exc.reason)}: {printable(message)}", file=sys.stderr)
    if as_json:
        _json_failure(status, exc.reason, message)
    return code

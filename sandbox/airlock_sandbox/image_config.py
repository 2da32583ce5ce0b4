"""The sandbox image's own configuration, judged against what its Dockerfiles set.

Each container made from an image inherits the image's ``Config`` wherever the create request
does not override it, so an image that differs from sandbox/image/Dockerfile weakens every
sandbox made from it, whoever rebuilt or substituted it. scripts/build-image.sh runs this on
the image it has just built and on a cached one before reusing it, and refuses an image that
differs::

    docker image inspect --format '{{json .Config}}' IMAGE \\
        | python -m airlock_sandbox.image_config IMAGE

The expected values are the contract's (``WORKER_ENTRYPOINT``, ``CONTAINER_USER``); a unit
test holds the Dockerfile to them. Pure standard library.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from airlock_sandbox.contract import CONTAINER_USER, WORKER_ENTRYPOINT

#: Settings of ``docker image inspect``'s ``Config`` our Dockerfiles never make, each with
#: what it would do to a sandbox. Present and not empty: the image is refused.
ABSENT: dict[str, str] = {
    "Cmd": "the Dockerfile sets none: every argument the worker gets is the broker's",
    "Volumes": "each becomes an anonymous volume in every sandbox: writable under the "
               "read-only root, exec-capable, capped by nothing but the host's disk",
    "Healthcheck": "the engine would exec its command into every sandbox on a timer "
                   "(DESIGN §1.2: nothing is ever exec'd into a sandbox)",
    "ExposedPorts": "a sandbox has no network; a port it declares is a listener nobody "
                    "asked for",
    "OnBuild": "triggers that run in every image built FROM this one",
}

_SHOWN = 120


def problems(config: Mapping[str, Any] | None) -> list[str]:
    """What in an image's ``Config`` differs from what the Dockerfiles set, one sentence
    each; empty when the image is as built."""
    config = config or {}
    found = []
    entrypoint = config.get("Entrypoint")
    if entrypoint != list(WORKER_ENTRYPOINT):
        found.append(f"Entrypoint is {_shown(entrypoint)}, not {json.dumps(WORKER_ENTRYPOINT)}"
                     " (the worker)")
    user = config.get("User")
    if user != CONTAINER_USER:
        found.append(f"User is {_shown(user)}, not {json.dumps(CONTAINER_USER)} (the "
                     "unprivileged sandbox user)")
    for key, why in ABSENT.items():
        if config.get(key):
            found.append(f"{key} is set ({_shown(config[key])}): {why}")
    return found


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """Judge the ``Config`` JSON on stdin; 0 when the image is as built, 1 (each problem on
    stderr) when it is not, 2 when stdin is not such a document."""
    args = sys.argv[1:] if argv is None else list(argv)
    image = args[0] if args else "the image"
    try:
        config = json.load(sys.stdin)
    except ValueError as exc:
        print(f"{image}: cannot read its configuration: {exc}", file=sys.stderr)
        return 2
    if config is not None and not isinstance(config, dict):
        print(f"{image}: its configuration is not a JSON object", file=sys.stderr)
        return 2
    found = problems(config)
    for problem in found:
        print(f"{image}: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

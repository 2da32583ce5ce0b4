"""``make audit``: the host's and the image's versions against the version gates.

    python -m airlock_broker.ops.version_audit [--config FILE] [--image IMAGE] [--json]

Host side: the engine's OCI runtimes (runc as ``docker version`` reports it, runsc from its
binary, each with the Debian package version when that is what runs) and the broker's own
Python and onnx. Image side: a tiny probe (``airlock_sandbox/versions.py``, stdlib only) run
inside the sandbox image, confined like a job; nothing is imported from the image on the host.
Exit status 1 when an enforced gate is violated or unreadable (advisory ones only print).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from airlock_broker.config import BrokerConfig
from airlock_broker.sandboxes.backends import make_backend
from airlock_broker.sandboxes.sandbox import SandboxUnavailable
from airlock_broker.sandboxes.version_gates import (
    GATES,
    Observation,
    Verdict,
    evaluate_all,
    host_observations,
)


async def observe(config: BrokerConfig) -> dict[str, Observation]:
    """The broker's own versions, the sandbox runtime's and the image's."""
    with tempfile.TemporaryDirectory() as spool:
        backend = make_backend(config.sandbox, Path(spool), threads=2)
        try:
            return {**host_observations(), **await backend.versions(image=True)}
        finally:
            await backend.close()


def render(verdicts: list[Verdict], image: str) -> str:
    rows = [("COMPONENT", "WHERE", "FOUND", "REQUIRED", "STATUS", "CVE")]
    for v in verdicts:
        status = v.status.upper() if v.gate.enforced or v.status == "ok" else \
            f"{v.status.upper()} (advisory)"
        rows.append((v.gate.component, v.gate.where, v.found, v.wanted, status,
                     ", ".join(v.gate.cves) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"version gates (service/airlock_broker/sandboxes/version_gates.py); image {image}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
              for r in rows]
    notes = [f"  {v.gate.component}@{v.gate.where}: {v.gate.note}" for v in verdicts
             if v.gate.note and (v.status != "ok" or not v.gate.enforced)]
    if notes:
        lines += ["notes:", *notes]
    sources = dict.fromkeys(f"  {g.component}: {g.source}" for g in GATES)
    lines += ["sources:", *sources]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="airlock-audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="broker TOML configuration")
    parser.add_argument("--image", default=None, help="sandbox image (default: the config's)")
    parser.add_argument("--runtime", default=None, help="OCI runtime (default: the config's)")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")
    args = parser.parse_args(argv)
    try:
        config = BrokerConfig.load(args.config)
    except (ValueError, OSError) as exc:
        print(f"audit: bad configuration: {exc}", file=sys.stderr)
        return 2
    sandbox = config.sandbox
    if args.image:
        sandbox = dataclasses.replace(sandbox, image=args.image)
    if args.runtime:
        sandbox = dataclasses.replace(sandbox, runtime=args.runtime)
    config = dataclasses.replace(config, sandbox=sandbox)
    try:
        observed = asyncio.run(observe(config))
    except (SandboxUnavailable, ValueError) as exc:
        print(f"audit: cannot read the versions: {exc}", file=sys.stderr)
        return 3
    verdicts = evaluate_all(observed)
    if args.json:
        print(json.dumps([{"component": v.gate.component, "where": v.gate.where,
                           "found": v.found, "required": v.wanted, "status": v.status,
                           "enforced": v.gate.enforced, "cves": list(v.gate.cves),
                           "source": v.gate.source, "note": v.gate.note} for v in verdicts],
                         indent=1))
    else:
        print(render(verdicts, sandbox.image))
    return 1 if any(v.blocks for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())

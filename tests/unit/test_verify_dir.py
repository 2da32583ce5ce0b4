"""``airlock verify DIR`` refuses, before checking any signature, a directory it cannot
vouch for: no weights, weights without a record, anything but regular files. (What it
accepts, and a shard swapped in from another conversion: tests/integration/
test_model_directories.py, with the broker's real records.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from airlock_client.provenance import ProvenanceError
from airlock_client.verify_dir import verify_directory

KEY = ec.generate_private_key(ec.SECP256R1()).public_key()


@pytest.mark.parametrize(("files", "link", "reason", "words"), [
    ({}, None, "PROVENANCE_MISSING", "holds no model.safetensors"),
    ({"config.json": "{}"}, None, "PROVENANCE_MISSING", "holds no model.safetensors"),
    ({"model.safetensors": "x"}, None, "PROVENANCE_MISSING", "has no signed record"),
    ({"adapter_model.safetensors": "x"}, None, "PROVENANCE_MISSING", "has no signed record"),
    ({"model.safetensors.index.json": "{}"}, None, "PROVENANCE_MISSING",
     "has no signed record"),
    ({"model.safetensors": "x"}, "config.json", "UNEXPECTED_FILE", "not a regular file"),
    ({"model.safetensors": "x", "adapter_model.safetensors": "y"}, None, "UNEXPECTED_FILE",
     "no conversion writes both"),
])
def test_what_cannot_be_vouched_for_is_refused(tmp_path: Path, files: dict[str, str],
                                               link: str | None, reason: str,
                                               words: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if link is not None:
        (tmp_path / link).symlink_to("/etc/passwd")
    with pytest.raises(ProvenanceError, match=words) as caught:
        verify_directory(tmp_path, KEY)
    assert caught.value.reason == reason

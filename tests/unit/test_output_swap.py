"""An output is written under a temporary name beside it. In a directory others may write that
is not sticky (a team's ``2775``), any of them can rename that name away and link it to one of
the user's own files while the conversion runs. The file's mode was then set by name, through
the link (a private key made readable to all), and the rename put the link in place as the
output; now the mode is set through the descriptor and the name is checked to be the output's
before and after the rename (``_part_files.Part``; the model directory's case is in
test_hf_model_dir.py)."""

from __future__ import annotations

import hashlib
import re
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.security.keys import create_key
from airlock_client import _client, _part_files, provenance
from airlock_client._part_files import OutputSwapped
from tests.unit.migrate_helpers import answer, tiny_safetensors
from tests.unit.shared_tmp import private_file, swap

SOURCE = b"source bytes"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_streamed_output_swapped_for_a_link_changes_nothing_the_link_points_to(
        tmp_path: Path) -> None:
    key = create_key(tmp_path / "state" / "key.pem")
    secret = private_file(tmp_path / "home" / "credentials")
    team = tmp_path / "team"
    team.mkdir()
    data = tiny_safetensors()
    out = team / "m.safetensors"

    header, asked = answer(key, data, "safetensors", SOURCE)

    def responses() -> Iterator[pb.ConvertResponse]:
        yield pb.ConvertResponse(result=header)
        swap(team, r"\.m\.safetensors\.\w{8}\.part", secret)  # while the output streams in
        yield pb.ConvertResponse(chunk=pb.Chunk(data=data, crc32=zlib.crc32(data)))

    with pytest.raises(OutputSwapped) as caught:
        _client._receive(responses(), out, asked, hashlib.sha256(SOURCE), key.public_pem,
                         "test")
    assert caught.value.reason == "OUTPUT_SWAPPED"
    assert _mode(secret) == 0o600  # was 0644: chmod by name followed the link
    assert not out.is_symlink() and not out.exists()  # was the link, reported as converted
    assert secret.read_bytes().startswith(b"aws_secret")
    assert (team / "moved-away").read_bytes() == data  # the one written is where it was moved


def test_a_provenance_record_swapped_for_a_link_changes_nothing_the_link_points_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = private_file(tmp_path / "home" / "id_ed25519")
    team = tmp_path / "team"
    team.mkdir()
    target = team / "m.onnx.provenance.json"
    made = _part_files.new_file

    def made_then_swapped(output: Path) -> _part_files.Part:
        part = made(output)
        swap(team, r"\.m\.onnx\.provenance\.json\.\w{8}\.part", secret)
        return part

    monkeypatch.setattr(_part_files, "new_file", made_then_swapped)
    with pytest.raises(OutputSwapped):
        provenance.replace_file(target, b"{}")
    assert _mode(secret) == 0o600
    assert not target.is_symlink() and not target.exists()


def test_a_converted_file_swapped_for_a_link_before_its_final_rename_is_not_put_in_place(
        tmp_path: Path) -> None:
    """``airlock convert`` writes ``.m.pkl.<run>.airlock-out`` and renames it to ``m.onnx``
    once the format is known; a link put at the first name was renamed into place."""
    from airlock_client import ConversionReport, ConversionResult
    from airlock_client._converted_file import default_output, placed

    secret = private_file(tmp_path / "home" / "model.onnx", b"someone's own model")
    team = tmp_path / "team"
    team.mkdir()
    temporary = default_output(team / "m.pkl")
    temporary.write_bytes(b"converted")
    result = ConversionResult(
        job_id="job-1", output=temporary, format="onnx", sha256="0" * 64, size=9,
        input_sha256="1" * 64, input_size=3, detected_format="pickle",
        assurance="format_safe_only", loading_policy="allow_code", duration_seconds=0.1,
        image_id="img", runtime="runc", report=ConversionReport())
    swap(team, re.escape(temporary.name), secret)
    with pytest.raises(OutputSwapped):
        placed(result, temporary, team / "m.pkl")
    assert not (team / "m.onnx").exists() and not (team / "m.onnx").is_symlink()
    assert placed(result, team / "moved-away", team / "m.pkl").output == team / "m.onnx"

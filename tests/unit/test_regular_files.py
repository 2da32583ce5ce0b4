"""Files a user names are read so that what someone else put at the name cannot stall or
flood a command: a FIFO is refused at once (a plain open waited for a writer for ever), and a
small file is read up to its cap (``_regular_files``). Each case below hung, or ran out of
memory, on the code before. The model file itself is in
tests/integration/test_local_transfer.py (the fast path's open)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from airlock_broker.security.keys import create_key
from airlock_client import _channel, _cli_connection, _client, _provenance_cli, cli, provenance
from airlock_client._errors import ProvenanceError
from airlock_client._regular_files import NOT_REGULAR, read_small
from tests.unit.shared_tmp import returns_within


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_a_fifo_is_refused_at_once_and_a_file_over_its_cap_is_not_read_whole(
        tmp_path: Path) -> None:
    fifo = _fifo(tmp_path / "key.pem")
    refused = returns_within(lambda: read_small(fifo, 100), fifo)
    assert isinstance(refused, OSError) and refused.strerror == NOT_REGULAR
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    with pytest.raises(OSError, match="larger than 100 bytes"):
        read_small(big, 100)
    assert read_small(big, 101) == b"x" * 101


def test_verify_refuses_a_fifo_put_beside_the_file_as_its_record(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = create_key(tmp_path / "state" / "key.pem")
    public = tmp_path / "airlock.pub.pem"
    public.write_text(key.public_pem)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx bytes")
    fifo = _fifo(tmp_path / "model.onnx.provenance.json")
    code = returns_within(lambda: cli.main(["verify", str(model), "--public-key", str(public)]),
                          fifo)
    assert code != 0
    assert "not a regular file" in capsys.readouterr().err


def test_a_public_key_a_sample_a_token_or_a_certificate_at_a_fifo_is_refused(
        tmp_path: Path) -> None:
    fifo = _fifo(tmp_path / "named")
    key = returns_within(lambda: provenance.load_public_key(str(fifo)), fifo)
    assert isinstance(key, ProvenanceError) and key.reason == "BAD_PUBLIC_KEY"
    sample = returns_within(lambda: _client.read_sample(str(fifo)), fifo)
    assert isinstance(sample, ValueError) and NOT_REGULAR in str(sample)
    args = argparse.Namespace(token_file=fifo, tls=False, tls_ca=None, client_cert=None,
                              client_key=None)
    token = returns_within(lambda: _cli_connection.client_options(args), fifo)
    assert isinstance(token, ValueError) and NOT_REGULAR in str(token)
    certificate = returns_within(lambda: _channel._read(fifo), fifo)
    assert isinstance(certificate, ValueError) and NOT_REGULAR in str(certificate)


def test_keys_fetch_reads_no_more_of_the_file_it_would_replace_than_a_key_holds(
        tmp_path: Path) -> None:
    """``airlock keys fetch -o FILE`` looks at what FILE holds (a key pinned earlier must not
    be replaced silently). A 64 GiB file put there was read whole: MemoryError."""
    planted = tmp_path / "airlock.pub.pem"
    with planted.open("wb") as fh:
        fh.truncate(64 << 30)  # sparse: no disk used
    assert _provenance_cli._pinned_elsewhere(planted, "ab" * 32) is None  # not a key: replaced

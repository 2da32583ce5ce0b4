"""The checkpoint reading answers alone (integrity_verified, torch never loads the file) only
when it reads what ``torch.load(weights_only=True)`` reads (tenth review, of the integrity
reading). Each checkpoint here is one the reading answered alone, refusing nothing, with
tensors that were not torch's:

* torch finds a zip's records as miniz does, by the bytes of their names and ignoring ASCII
  case: a ``BYTEORDER`` record saying ``big`` makes torch byte-swap every tensor while the
  reading, looking for ``byteorder``, did not;
* a record named ``data/é`` with the UTF-8 flag and another with the same bytes and no flag
  (``zipfile``: ``data/├⌐``) are one name to torch and two to ``zipfile``: each read its own;
* a BUILD on an ``OrderedDict`` sets ``items`` in its ``__dict__`` under torch, so the
  converter's flattening (and any consumer calling ``items()``) sees no tensors there; the
  reading dropped that state and answered with them.

Each case passes when the reading fails, or records a refused global (the broker then runs
the conversion and compares), or writes exactly what the conversion writes."""

from __future__ import annotations

import collections
import io
import struct
import zipfile
import zlib
from pathlib import Path

import torch

from airlock_sandbox.contract import JobMode
from tests.unit.test_worker_extract import extract_only, run


def _entries(path: Path) -> list[tuple[bytes, int, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(i.filename.encode("ascii"), 0, zf.read(i)) for i in zf.infolist()]


def _write_zip(path: Path, entries: list[tuple[bytes, int, bytes]]) -> None:
    """Stored records (name bytes, general-purpose flags, data), 64-byte aligned as
    torch.save aligns them; no descriptors, no Zip64."""
    buf = io.BytesIO()
    central = []
    for name, flag, data in entries:
        at = buf.tell()
        pad = (-(at + 30 + len(name) + 4)) % 64
        extra = struct.pack("<HH", 0x4654, pad) + b"Z" * pad
        crc = zlib.crc32(data)
        buf.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flag, 0, 0, 0, crc, len(data),
                              len(data), len(name), len(extra)))
        buf.write(name + extra + data)
        central.append((name, flag, crc, len(data), at))
    cd = buf.tell()
    for name, flag, crc, size, at in central:
        buf.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flag, 0, 0, 0, crc,
                              size, size, len(name), 0, 0, 0, 0, 0, at))
        buf.write(name)
    buf.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central),
                          buf.tell() - cd, cd, 0))
    path.write_bytes(buf.getvalue())


def _tensors(outcome) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in outcome.tensors().items()}


def _answers_only_as_torch(tmp: Path, artifact: Path) -> None:
    ext = extract_only(tmp, artifact)
    if ext.error is not None or ext.report.refused_globals:
        return  # no answer alone: the conversion runs and is compared
    conv = run(tmp, artifact, JobMode.CONVERT)
    assert conv.error is None, conv.error
    assert _tensors(ext) == _tensors(conv), "the reading answered alone with other tensors"


def test_a_byteorder_record_torch_finds_in_another_case_is_read(tmp_path: Path) -> None:
    src = tmp_path / "src.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, src)
    entries = []
    for name, flag, data in _entries(src):
        if name.endswith(b"/byteorder"):
            name, data = name[:-len(b"byteorder")] + b"BYTEORDER", b"big"
        entries.append((name, flag, data))
    artifact = tmp_path / "upper.pt"
    _write_zip(artifact, entries)
    swapped = torch.arange(4, dtype=torch.float32).numpy().byteswap().tobytes()
    assert torch.load(artifact, weights_only=True)["w"].numpy().tobytes() == swapped
    _answers_only_as_torch(tmp_path, artifact)


def test_two_records_torch_cannot_tell_apart_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, src)
    other = (torch.arange(4, dtype=torch.float32) * -7).numpy().tobytes()
    entries = []
    for name, flag, data in _entries(src):
        if name.endswith(b"/data.pkl"):  # storage key "0" -> "é"
            data = data.replace(b"X\x01\x00\x00\x000", b"X\x02\x00\x00\x00\xc3\xa9")
        if name.endswith(b"/data/0"):
            named = name[:-1] + b"\xc3\xa9"
            entries += [(named, 0x800, data), (named, 0, other)]  # "é", and "├⌐" to zipfile
            continue
        entries.append((name, flag, data))
    artifact = tmp_path / "flags.pt"
    _write_zip(artifact, entries)
    assert torch.load(artifact, weights_only=True)["w"].numpy().tobytes() == other
    _answers_only_as_torch(tmp_path, artifact)


def test_an_ordered_dict_whose_items_torch_shadows_is_not_answered_alone(
        tmp_path: Path) -> None:
    src = tmp_path / "src.pt"
    enc = collections.OrderedDict(w=torch.arange(4, dtype=torch.float32))
    enc._metadata = "MARKER"  # type: ignore[attr-defined]
    torch.save({"enc": enc, "dec": {"w": torch.ones(2)}}, src)
    entries = []
    for name, flag, data in _entries(src):
        if name.endswith(b"/data.pkl"):  # BUILD {'_metadata': 'MARKER'} -> {'items': OrderedDict}
            end = data.index(b"X\x06\x00\x00\x00MARKER") + 11
            start = data.rindex(b"X\t\x00\x00\x00_metadata", 0, end)
            data = (data[:start] + b"X\x05\x00\x00\x00items"
                    + b"ccollections\nOrderedDict\n" + data[end:])
        entries.append((name, flag, data))
    artifact = tmp_path / "shadow.pt"
    _write_zip(artifact, entries)
    loaded = torch.load(artifact, weights_only=True)
    assert list(loaded["enc"].items()) == []  # what the converter's flattening calls
    _answers_only_as_torch(tmp_path, artifact)
    # contract.DICT_ATTRIBUTES_GLOBAL (named here, so that the test runs on the code before)
    assert extract_only(tmp_path / "again", artifact).report.refused_globals == [
        "collections.OrderedDict.__dict__"]


def test_a_state_dicts_metadata_is_still_answered_alone(tmp_path: Path) -> None:
    artifact = tmp_path / "sd.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).state_dict(),
               artifact)
    ext = extract_only(tmp_path / "alone", artifact)
    assert ext.error is None and ext.report.refused_globals == []
    _answers_only_as_torch(tmp_path, artifact)


def test_a_bytes_storage_key_is_not_read_as_the_string_key(tmp_path: Path) -> None:
    """``("storage", FloatStorage, b"0", ...)``: torch's weights_only loader refuses the
    opcode, so the converter (and any torch before 2.6) loads the file fully, which reads the
    record ``data/b'0'``; the reading decoded the key and read ``data/0``."""
    src = tmp_path / "src.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, src)
    other = (torch.arange(4, dtype=torch.float32) * -7).numpy().tobytes()
    entries = []
    for name, flag, data in _entries(src):
        if name.endswith(b"/data.pkl"):
            data = data.replace(b"X\x01\x00\x00\x000", b"C\x010")  # SHORT_BINBYTES b"0"
        entries.append((name, flag, data))
        if name.endswith(b"/data/0"):
            entries.append((name[:-1] + b"b'0'", flag, other))
    artifact = tmp_path / "bytes-key.pt"
    _write_zip(artifact, entries)
    assert torch.load(artifact, weights_only=False)["w"].numpy().tobytes() == other
    _answers_only_as_torch(tmp_path, artifact)


def test_storage_keys_that_torch_finds_in_one_record_are_refused(tmp_path: Path) -> None:
    """Keys ``a`` and ``A`` find the one record ``data/a`` (as torch finds it): two storages
    of one record, which torch's mmap load shares (and the converter deduplicates) and the
    reading would not."""
    src = tmp_path / "src.pt"
    t = torch.arange(4, dtype=torch.float32)
    torch.save({"u": t, "v": t.clone()}, src)
    entries = []
    for name, flag, data in _entries(src):
        if name.endswith(b"/data.pkl"):
            data = (data.replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x00a")
                    .replace(b"X\x01\x00\x00\x001", b"X\x01\x00\x00\x00A"))
        if name.endswith(b"/data/1"):
            continue
        if name.endswith(b"/data/0"):
            name = name[:-1] + b"a"
        entries.append((name, flag, data))
    artifact = tmp_path / "one-record.pt"
    _write_zip(artifact, entries)
    assert torch.load(artifact, weights_only=True)["v"].tolist() == t.tolist()
    ext = extract_only(tmp_path, artifact)
    assert ext.error is not None  # (before the lookup folded case: "data/A is missing")


def test_an_empty_storage_referenced_with_two_dtypes_is_refused(tmp_path: Path) -> None:
    """torch caches only storages with data: a plain ``torch.load`` makes an empty storage
    again for each reference (``b`` is float64), ``mmap=True`` (the converter) keeps the
    first (float32), and so did the reading, which answered alone for a dtype torch.load
    does not give."""
    src = tmp_path / "src.pt"
    torch.save({"a": torch.zeros(0), "b": torch.zeros(0, dtype=torch.float64),
                "w": torch.ones(2)}, src)
    entries = []
    for name, flag, data in _entries(src):
        if name.endswith(b"/data.pkl"):  # b's storage is a's: key "1" -> "0"
            data = data.replace(b"X\x01\x00\x00\x001", b"X\x01\x00\x00\x000")
        if not name.endswith(b"/data/1"):
            entries.append((name, flag, data))
    artifact = tmp_path / "empty.pt"
    _write_zip(artifact, entries)
    assert torch.load(artifact, weights_only=True)["b"].dtype is torch.float64
    ext = extract_only(tmp_path, artifact)
    assert ext.error is not None and "empty storage" in ext.error.message


def test_tuple_keys_of_dtypes_and_devices_are_named_as_torch_names_them(tmp_path: Path) -> None:
    """A key ``(torch.float32,)`` is the tensor name ``m.(torch.float32,)`` to the converter;
    the reading printed its stand-ins' own reprs (``m.(DType(name='float32', ...),)``,
    ``m.('cpu',)``) and answered alone with names torch's state dict does not have."""
    artifact = tmp_path / "keys.pt"
    torch.save({"m": {(torch.float32,): torch.ones(2), (torch.device("cpu"),): torch.zeros(2),
                      (torch.device("cpu", 0),): torch.ones(3), torch.float16: torch.ones(1),
                      (torch.Size([2]),): torch.ones(4),
                      (collections.OrderedDict,): torch.ones(5)}}, artifact)
    _answers_only_as_torch(tmp_path, artifact)
    assert extract_only(tmp_path / "again", artifact).report.refused_globals == []

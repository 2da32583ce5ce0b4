"""Integrity extraction (DESIGN §5): the worker's EXTRACT_WEIGHTS mode reads a PyTorch zip
checkpoint without executing it and writes what the CONVERT mode writes, byte for byte.

Benign checkpoints generated here run through *both* modes of the worker on the host (CONVERT
loads them with ``torch.load(weights_only=True)``: they are ours and hold only tensors).
Hostile ones (``tests/adversarial/sabotage.py``) go through EXTRACT only: if the extractor ever
called what a pickle names, the payloads here would only create a marker file, and the tests
assert that it does not exist."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from airlock_broker.validation.safetensors_canonical import canonical_header_bytes
from airlock_sandbox.contract import (
    ARTIFACT_NAME,
    OUTPUT_NAMES,
    TENSOR_ATTRIBUTES_GLOBAL,
    JobMode,
    JobSpec,
    OutputFormat,
    Target,
    WorkerExit,
)
from airlock_sandbox.formats import PREFIX_BYTES, detect_prefix
from airlock_worker import extract, extract_stand_ins, extract_unpickler, output
from airlock_worker import job as worker_job
from airlock_worker.errors import WorkerError
from airlock_worker.report import Report
from tests.adversarial import sabotage
from tests.fixtures import models

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = OUTPUT_NAMES[OutputFormat.SAFETENSORS]


class Outcome:
    def __init__(self, out_dir: Path, report: Report, error: WorkerError | None) -> None:
        self.path = out_dir / OUTPUT
        self.report = report
        self.error = error

    @property
    def raw(self) -> bytes:
        assert self.error is None, f"the job failed: {self.error.exit.name}: {self.error.message}"
        return self.path.read_bytes()

    def split(self) -> tuple[dict[str, Any], bytes]:
        raw = self.raw
        (n,) = struct.unpack("<Q", raw[:8])
        return json.loads(raw[8:8 + n]), raw[8 + n:]

    def tensors(self) -> dict[str, np.ndarray]:
        """Raw bytes per tensor (numpy has no bf16; the bytes are what is compared)."""
        header, data = self.split()
        return {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]], np.uint8)
                for k, v in header.items() if k != "__metadata__"}


def run(tmp: Path, artifact: Path, mode: JobMode, **spec: Any) -> Outcome:
    """One job through the worker's own entry (detect -> dispatch -> write). With
    ``output_in_place`` the output exists, empty, as the broker makes it."""
    base = tmp / f"{artifact.stem}-{mode.value}"
    in_dir, out_dir = base / "in", base / "out"
    in_dir.mkdir(parents=True)
    out_dir.mkdir()
    os.link(artifact, in_dir / ARTIFACT_NAME)
    if spec.get("output_in_place"):
        (out_dir / OUTPUT).touch()
    report = Report()
    raw = artifact.read_bytes()[:PREFIX_BYTES]  # as the broker decides an undeclared one
    decided = detect_prefix(raw, artifact.stat().st_size)
    try:
        worker_job.run(JobSpec(job_id="t", artifact_format=decided, mode=mode, **spec),
                       str(in_dir), str(out_dir), report)
    except WorkerError as exc:
        assert (not (out_dir / OUTPUT).exists() or mode is JobMode.CONVERT
                or spec.get("output_in_place"))
        return Outcome(out_dir, report, exc)
    return Outcome(out_dir, report, None)


def extract_only(tmp: Path, artifact: Path, **spec: Any) -> Outcome:
    return run(tmp, artifact, JobMode.EXTRACT_WEIGHTS, **spec)


#: What a reading records for a tensor that carries attributes (extract_unpickler._attributes).
SET_OBJ_STATE = TENSOR_ATTRIBUTES_GLOBAL


def assert_same_as_convert(tmp: Path, artifact: Path, *, attributes: bool = False,
                           **spec: Any) -> tuple[Outcome, Outcome]:
    """Both readings agree byte for byte; the reading refused nothing, or (``attributes``)
    only tensors' attributes, which send it to this very comparison."""
    conv = run(tmp, artifact, JobMode.CONVERT, **spec)
    ext = run(tmp, artifact, JobMode.EXTRACT_WEIGHTS, **spec)
    (hc, dc), (he, de) = conv.split(), ext.split()
    assert he == hc  # names, dtypes, shapes, offsets (data order) and __metadata__
    assert de == dc  # the data sections, byte for byte
    # The reading writes the broker's canonical header, so that the file hashed as it was
    # written is the file answered (output_tail.py).
    (n,) = struct.unpack("<Q", ext.raw[:8])
    metadata = he.pop("__metadata__", None)
    assert ext.raw[:8 + n] == canonical_header_bytes(he, metadata)
    refused = [SET_OBJ_STATE] if attributes else []
    assert ext.report.refused_globals == refused
    assert [w for w in ext.report.warnings if SET_OBJ_STATE not in w] == conv.report.warnings
    assert ext.report.tensor_count == conv.report.tensor_count
    fmt = detect_prefix(artifact.read_bytes()[:PREFIX_BYTES], artifact.stat().st_size)
    assert ext.report.loader == extract.LOADERS.get(fmt, "restricted-zip-reader")
    assert ext.report.executed_artifact_code is False
    return conv, ext


def assert_same_file(ext: Outcome, conv: Outcome) -> None:
    """The same file as the broker compares them: the same header (its keys in any order:
    the reading's is canonical, the converter's the reference writer's) and the same data."""
    (he, de), (hc, dc) = ext.split(), conv.split()
    assert he == hc
    assert de == dc


def assert_holds(outcome: Outcome, truth: dict[str, np.ndarray]) -> None:
    got = outcome.tensors()
    assert sorted(got) == sorted(truth)
    for name, want in truth.items():
        assert got[name].tobytes() == np.ascontiguousarray(want).tobytes(), name


# -- extract == convert on benign checkpoints ---------------------------------------------------


FIXTURES: dict[str, Callable[[Path], tuple[Path, models.Check]]] = {
    "state_dict": models.make_state_dict,
    "lightning_checkpoint": models.make_lightning_checkpoint,
    "tied_state_dict": models.make_tied_state_dict,
    "large_state_dict": lambda d: models.make_large_state_dict(d / "large.pt", size_mb=40),
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_extraction_equals_conversion_for_the_fixture_checkpoints(tmp_path: Path,
                                                                  name: str) -> None:
    artifact, check = FIXTURES[name](tmp_path / "src")
    _, ext = assert_same_as_convert(tmp_path, artifact)
    header, _ = ext.split()
    assert {k: v for k, v in header["__metadata__"].items() if k != "format"} == check.tied
    if name != "large_state_dict":  # its check holds names only
        assert_holds(ext, check.expected)


def _edge_checkpoint(path: Path, protocol: int = 2) -> Path:
    gen = torch.Generator().manual_seed(5)
    shared = torch.arange(24, dtype=torch.float32)
    tied = torch.randn(4, 3, generator=gen)
    with_attr = torch.randn(3, generator=gen)
    with_attr.note = "an attribute"  # type: ignore[attr-defined]
    param = torch.nn.Parameter(torch.randn(2, 2, generator=gen))
    param.extra = 1  # type: ignore[attr-defined]
    state = {
        "bf16": torch.randn(5, 3, generator=gen).to(torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "int_scalar": torch.tensor(7),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(3, 5, generator=gen).t(),
        "bf16_transposed": torch.randn(4, 6, generator=gen).to(torch.bfloat16).t(),
        "whole": shared,
        "slice": shared[4:10],
        "strided_slice": shared.view(4, 6)[:, ::2],
        "embed": tied,
        "lm_head": tied,
        "half": torch.randn(4, generator=gen).half(),
        "bool": torch.tensor([True, False, True]),
        "int8": torch.tensor([-3, 4], dtype=torch.int8),
        "uint16": torch.tensor([1, 65535], dtype=torch.uint16),
        "fp8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
        "complex": torch.randn(3, dtype=torch.complex64, generator=gen),
        "complex128": torch.zeros(2, dtype=torch.complex128),
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
        "with_attr": with_attr,
        "param": param,
        "block": {"inner": {"w": torch.ones(2)}, "lr": 0.1, "dt": torch.float16,
                  "size": torch.Size([2, 3]), "dev": torch.device("cpu"), "names": ["a"]},
        "step": 12,
    }
    torch.save(state, path, pickle_protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, 5])
def test_extraction_equals_conversion_on_edge_cases(tmp_path: Path, protocol: int) -> None:
    """bf16, 0-dim, zero-size, transposed (non-contiguous), slices and strided views of one
    storage, a same-view alias (deduplicated), fp8/uint16 (saved via UntypedStorage),
    complex128 (skipped by both), a tensor and a parameter carrying attributes; pickled with
    torch's default protocol and with protocol 5 (STACK_GLOBAL, MEMOIZE, FRAME)."""
    artifact = _edge_checkpoint(tmp_path / "edge.pt", protocol)
    _, ext = assert_same_as_convert(tmp_path, artifact, attributes=True)
    header, _ = ext.split()
    assert header["__metadata__"] == {"format": "pt", "lm_head": "embed"}
    assert "complex128" not in header and "slice" in header and "whole" in header
    assert header["bf16_transposed"]["shape"] == [6, 4]
    assert any("complex128" in w for w in ext.report.warnings)


def _random_checkpoint(seed: int) -> dict[str, Any]:
    """A state dict of ``seed``'s making: nested dicts, several dtypes, views of shared
    storages (slices, strided, transposed), 0-dim and empty tensors, now and then a tensor
    with a harmless attribute. No two entries are the same view (the reader would tie them)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool]
    state: dict[str, Any] = {}
    for i in range(int(rng.integers(1, 8))):
        dtype = dtypes[int(rng.integers(len(dtypes)))]
        shape = tuple(int(n) for n in rng.integers(0, 5, size=int(rng.integers(0, 4))))
        base = torch.randn(24, 6, generator=gen).mul(10)
        base = base.to(dtype) if dtype is not torch.bool else base > 0
        kind = int(rng.integers(4))
        if kind == 0:
            tensor = torch.zeros(shape).to(base.dtype)
        elif kind == 1:
            tensor = base[int(rng.integers(0, 12)):][::2]
        elif kind == 2:
            tensor = base.t()
        else:
            tensor = base
        if rng.random() < 0.05:
            tensor.__dict__["note"] = "x"
        home = state if rng.random() < 0.6 else state.setdefault(f"block{i % 2}", {})
        home[f"t{i}"] = tensor
    return state


def _flat_bytes(obj: Any, prefix: str = "") -> dict[str, bytes]:
    """Each tensor's bytes, contiguous, by its dotted name (bfloat16 as its raw bits)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous()
        if t.dtype is torch.bfloat16:
            t = t.view(torch.int16)
        return {prefix: t.numpy().tobytes()}
    out: dict[str, bytes] = {}
    for key, value in obj.items():
        out.update(_flat_bytes(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("seed", range(16))
def test_a_reading_that_would_answer_alone_holds_what_torch_loads(tmp_path: Path, seed: int,
                                                                   layout: str) -> None:
    """The rule the reading answers alone by, checked against torch itself on generated
    checkpoints: when it refuses nothing, its tensors are byte for byte what
    ``torch.load(weights_only=True)`` returns."""
    state = _random_checkpoint(seed)
    artifact = tmp_path / f"{seed}.pt"
    torch.save(state, artifact, _use_new_zipfile_serialization=layout == "zip")
    out = extract_only(tmp_path, artifact)
    truth = _flat_bytes(torch.load(artifact, weights_only=True))
    if out.error is not None or out.report.refused_globals:
        return  # not an answer alone: the conversion runs and is compared
    got = out.tensors()
    assert sorted(got) == sorted(truth)
    for name, data in truth.items():
        assert got[name].tobytes() == data, name


@pytest.mark.parametrize("legacy", [False, True])
def test_a_digest_only_reading_reports_its_data_sections_sha256_and_writes_a_hole(
        tmp_path: Path, legacy: bool) -> None:
    """For an output on disk the broker asks the reading for its data's digest alone
    (JobSpec.data_digest_only): the same header and size as the full reading, the data
    section a hole on disk, and the sha256 of the bytes the full reading writes."""
    gen = torch.Generator().manual_seed(9)
    state = {"big": torch.randn(1024, 1024, generator=gen), "bf16": torch.randn(
        7, 3, generator=gen).to(torch.bfloat16), "tied": (tied := torch.ones(5)), "tie": tied}
    artifact = tmp_path / "ckpt.pt"
    torch.save(state, artifact, _use_new_zipfile_serialization=not legacy)
    full = extract_only(tmp_path / "full", artifact)
    digest = extract_only(tmp_path / "digest", artifact, data_digest_only=True)
    (hf, df), (hd, dd) = full.split(), digest.split()
    assert hd == hf and len(dd) == len(df) > 4 * 1024 * 1024
    assert dd == bytes(len(dd))  # not written: a hole reads as zeros...
    assert digest.path.stat().st_blocks * 512 < 1024 * 1024  # ...and takes no room
    assert digest.report.data_sha256 == hashlib.sha256(df).hexdigest()
    assert full.report.data_sha256 == ""
    assert digest.report.tensor_count == full.report.tensor_count == 3


def test_a_reading_writes_in_place_the_file_the_broker_made(tmp_path: Path) -> None:
    """JobSpec.output_in_place: the same bytes as a reading that makes its own file, appended
    to the broker's (here a plain file; test_output_tail.py runs it into an append-only one,
    which only O_APPEND may write); the broker's file missing, or not empty, fails the
    reading; a hole cannot be appended."""
    artifact, _check = models.make_state_dict(tmp_path)
    staged = extract_only(tmp_path / "staged", artifact)
    placed = extract_only(tmp_path / "placed", artifact, output_in_place=True)
    assert placed.raw == staged.raw
    assert not list(placed.path.parent.glob(".*partial"))
    holed = extract_only(tmp_path / "holed", artifact, output_in_place=True,
                         data_digest_only=True)
    assert holed.error is not None and "hole" in holed.error.message
    with pytest.raises(WorkerError, match="does not exist"), \
            output.in_place(str(tmp_path), OutputFormat.SAFETENSORS, 1024):
        pass
    (tmp_path / OUTPUT).write_bytes(b"x")
    with pytest.raises(WorkerError, match="not empty"), \
            output.in_place(str(tmp_path), OutputFormat.SAFETENSORS, 1024):
        pass


def test_extraction_of_a_root_tensor_and_of_nested_state_dicts(tmp_path: Path) -> None:
    torch.save(torch.arange(5.0), tmp_path / "root.pt")
    assert_same_as_convert(tmp_path, tmp_path / "root.pt")
    torch.save({"state_dict": {"enc": {"w": torch.ones(3)}, "dec.w": torch.zeros(2)},
                "optimizer_states": [{"state": {}}]}, tmp_path / "nested.pt")
    assert_same_as_convert(tmp_path, tmp_path / "nested.pt")


def test_a_deflated_checkpoint_is_inflated_under_the_caps(tmp_path: Path) -> None:
    """torch.save never compresses, but a re-zipped checkpoint must still read true."""
    src, check = models.make_state_dict(tmp_path / "src")
    zipped = tmp_path / "deflated.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    assert_holds(extract_only(tmp_path, zipped), check.expected)


# -- what is not extractable: format-safe only --------------------------------------------------


@pytest.mark.parametrize("maker", [models.make_torchscript, models.make_npz],
                         ids=["torchscript", "npz"])
def test_other_formats_are_unsupported(tmp_path: Path, maker: Any) -> None:
    artifact, _ = maker(tmp_path / "src")
    out = extract_only(tmp_path, artifact)
    assert out.error is not None and out.error.exit is WorkerExit.UNSUPPORTED_MODEL
    assert "supports PyTorch zip and legacy checkpoints only" in out.error.message


def test_a_pickled_module_cannot_be_extracted_and_nothing_runs(tmp_path: Path) -> None:
    artifact, _ = models.make_full_module(tmp_path / "src")
    out = extract_only(tmp_path, artifact)
    assert out.error is not None and out.error.exit is WorkerExit.UNSUPPORTED_MODEL
    assert "without executing the artifact" in out.error.message
    assert not out.path.exists()
    assert out.report.executed_artifact_code is False


def test_tensors_inside_an_unknown_object_are_not_guessed(tmp_path: Path) -> None:
    """A module beside other entries: only its code could say which tensors it contributes."""
    torch.save({"model": models.torch_mlp(), "w": torch.ones(2)}, tmp_path / "m.pt")
    out = extract_only(tmp_path, tmp_path / "m.pt")
    assert out.error is not None and out.error.exit is WorkerExit.UNSUPPORTED_MODEL
    assert "torch.nn.modules" in out.error.message


class _TensorSubclass(torch.Tensor):
    """Its rebuild would run this class's code: the extractor records it instead."""


def test_a_tensor_subclass_is_not_guessed(tmp_path: Path) -> None:
    t = torch.ones(3).as_subclass(_TensorSubclass)
    torch.save({"w": t, "b": torch.zeros(2)}, tmp_path / "sub.pt")
    out = extract_only(tmp_path, tmp_path / "sub.pt")
    assert out.error is not None and out.error.exit is WorkerExit.UNSUPPORTED_MODEL
    assert "_TensorSubclass" in " ".join(out.report.warnings)


def test_a_dict_key_made_by_code_is_not_guessed(tmp_path: Path) -> None:
    key = sabotage._Exec("pass")
    torch.save({"w": torch.ones(2), key: 1}, tmp_path / "k.pt")
    out = extract_only(tmp_path, tmp_path / "k.pt")
    assert out.error is not None and out.error.exit is WorkerExit.UNSUPPORTED_MODEL


def test_a_big_endian_checkpoint_is_unsupported(tmp_path: Path) -> None:
    ref, data = sabotage.float_storage("0", np.zeros(2, np.float32))
    path = sabotage.write_checkpoint(tmp_path / "be.pt", {"w": sabotage.TensorRef(
        ref, 0, (2,), (1,))}, data, byteorder=b"big")
    out = extract_only(tmp_path, path)
    assert out.error is not None and out.error.exit is WorkerExit.UNSUPPORTED_MODEL
    assert "little-endian" in out.error.message


def test_onnx_target_is_refused(tmp_path: Path) -> None:
    artifact, _ = models.make_state_dict(tmp_path / "src")
    out = extract_only(tmp_path, artifact, target=Target.ONNX)
    assert out.error is not None and out.error.exit is WorkerExit.UNSUPPORTED_MODEL


# -- hostile checkpoints: nothing runs, malformed ones are refused ------------------------------


@pytest.mark.parametrize("via", ["exec", "system"])
def test_code_named_by_the_pickle_is_never_called(tmp_path: Path, via: str) -> None:
    marker = tmp_path / f"ran-{via}"
    artifact, truth = sabotage.make_marker_checkpoint(tmp_path / f"{via}.pt", marker, via)
    out = extract_only(tmp_path, artifact)
    assert not marker.exists(), "the extractor executed a global named by the artifact"
    assert_holds(out, truth)
    assert any(("exec" if via == "exec" else "system") in w for w in out.report.warnings)
    assert out.report.executed_artifact_code is False


def test_the_sabotaged_checkpoint_extracts_its_true_weights(tmp_path: Path) -> None:
    """The CONVERT side of this runs in the sandbox only (tests/adversarial)."""
    artifact, truth = sabotage.make_sabotaged_checkpoint(tmp_path / "sabotaged.pt")
    out = extract_only(tmp_path, artifact)
    assert_holds(out, truth)
    assert any("builtins.exec" in w for w in out.report.warnings)


@pytest.mark.parametrize("how", ["parameter", "tensor"])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_attributes_a_tensor_is_given_on_load_are_never_passed_over(tmp_path: Path, how: str,
                                                                    layout: str) -> None:
    """``torch.load`` sets a tensor's pickled attributes on it, and ``data`` swaps its
    weights: a checkpoint naming only allowed globals loads as B while its first storage
    holds A. The reading does not model attributes, so it says so as a refused global: it
    is then never the answer alone, and the conversion's B is compared with its A."""
    artifact, a, b = sabotage.make_attribute_swap_checkpoint(
        tmp_path / f"{how}-{layout}.pt", how, legacy=layout == "legacy")
    assert np.array_equal(torch.load(artifact, weights_only=True)["w"].detach().numpy(), b)
    out = extract_only(tmp_path, artifact)
    assert out.report.refused_globals == [SET_OBJ_STATE]
    assert out.report.executed_artifact_code is False
    converted = run(tmp_path, artifact, JobMode.CONVERT)
    assert out.tensors()["w"].tobytes() == a.tobytes()
    assert converted.tensors()["w"].tobytes() == b.tobytes()  # what the comparison refuses


def test_a_zip_whose_readers_would_list_different_archives_is_refused(tmp_path: Path) -> None:
    """Bytes before the archive: ``zipfile`` reads the second checkpoint, torch the first.
    The reading refuses the file rather than answer for weights torch never loads."""
    artifact, a, _b = sabotage.make_two_archive_checkpoint(tmp_path / "two.pt")
    assert np.array_equal(torch.load(artifact, weights_only=True)["w"].numpy(), a)
    out = extract_only(tmp_path, artifact)
    assert out.error is not None and "different archives" in out.error.message


@pytest.mark.parametrize(("state", "says"), [
    ({0: torch.zeros(2), "0": torch.ones(3)}, "would be given twice"),
    ({"a": {"b": torch.zeros(2)}, "a.b": torch.ones(3)}, "would be given twice"),
    ({"__metadata__": torch.zeros(2), "w": torch.ones(3)}, "reserves for the file's metadata"),
])
def test_names_a_safetensors_file_cannot_hold_are_refused_by_both_readers(
        tmp_path: Path, state: dict[Any, Any], says: str) -> None:
    """Before, the first of two tensors under one name was kept and the other dropped with a
    warning (an index lists the survivor, so nothing downstream noticed); a tensor named
    __metadata__ made a file the broker's validator refused as malformed."""
    artifact = tmp_path / "names.pt"
    torch.save(state, artifact)
    for mode in (JobMode.CONVERT, JobMode.EXTRACT_WEIGHTS):
        out = run(tmp_path / mode.value, artifact, mode)
        assert out.error is not None and says in out.error.message, (mode, out.error)
        assert out.error.exit is WorkerExit.UNSUPPORTED_MODEL


def test_a_harmless_attribute_still_sends_the_checkpoint_to_the_comparison(
        tmp_path: Path) -> None:
    """An attribute that changes no byte (a library's flag on a parameter) is not told apart
    from ``data``: the reading refuses to answer alone, and agrees with the conversion."""
    w = torch.nn.Parameter(torch.arange(4.0))
    w.__dict__["_is_hf_initialized"] = True
    artifact = tmp_path / "flagged.pt"
    torch.save({"w": w, "b": torch.ones(2)}, artifact)
    assert_same_as_convert(tmp_path, artifact, attributes=True)


def test_poison_is_inert_whatever_the_pickle_does_with_it() -> None:
    """getattr(__import__('os'), 'system')('...'), BUILD, SETITEMS, APPENDS on a poisoned
    object: all recorded, nothing called."""
    body = (b"\x80\x02}"                                   # {}
            b"X\x01\x00\x00\x00p"                          # "p":
            b"cbuiltins\ngetattr\n"
            b"cbuiltins\n__import__\nX\x02\x00\x00\x00os\x85R"  # __import__("os")
            b"X\x06\x00\x00\x00system\x86R"                     # getattr(., "system")
            b"X\x04\x00\x00\x00true\x85R"                        # (.)("true")
            b"}X\x01\x00\x00\x00aK\x01sb"                        # BUILD {"a": 1}
            b"(X\x01\x00\x00\x00kK\x01u"                         # SETITEMS
            b"s"                                                # SETITEM "p"
            b"X\x01\x00\x00\x00qcos\nsystem\n)\x81(K\x01K\x02es.")  # NEWOBJ + APPENDS
    reader = extract_unpickler.RestrictedUnpickler(body, archive=None)  # type: ignore[arg-type]
    obj = reader.load()
    assert isinstance(obj["p"], extract_unpickler.Poison)
    assert isinstance(obj["q"], extract_unpickler.Poison)
    assert set(reader.poisoned) == {"builtins.getattr", "builtins.__import__", "os.system"}
    with pytest.raises(WorkerError):
        str(obj["p"])  # a poison can never name a tensor


@pytest.mark.parametrize("target", [b"ctorch\nfloat32\n", b"ctorch\nFloatStorage\n",
                                    b"ctorch\nTensor\n", b"ctorch._utils\n_rebuild_tensor_v2\n",
                                    b"ccollections\nOrderedDict\n", b"cos\nsystem\n"])
@pytest.mark.parametrize("state", [b"}X\x04\x00\x00\x00nameK\x01sb",        # BUILD {"name": 1}
                                   b"N}X\x04\x00\x00\x00nameK\x01s\x86b",  # BUILD (None, {...})
                                   b"(K\x01K\x02K\x03lb"])                   # BUILD [1, 2, 3]
def test_what_find_class_hands_out_cannot_be_modified(target: bytes, state: bytes) -> None:
    """A frozen dataclass would take BUILD through its generated __setstate__ and a pickle
    could redefine torch.float32 for the rest of the reading."""
    reader = extract_unpickler.RestrictedUnpickler(b"\x80\x02" + target + state + b".",
                                                   archive=None)  # type: ignore[arg-type]
    with pytest.raises(Exception):  # noqa: B017 - refused, whichever way
        reader.load()
    assert extract_stand_ins.DTYPES["float32"] == extract_stand_ins.DType("float32", 4, "F32")


def test_an_ordered_dict_cannot_be_given_attributes_that_shadow_its_methods() -> None:
    body = (b"\x80\x02ccollections\nOrderedDict\n)R"
            b"}X\x05\x00\x00\x00itemsccollections\nOrderedDict\nsb"  # BUILD {"items": ...}
            b"X\x01\x00\x00\x00aK\x01s.")
    obj = extract_unpickler.RestrictedUnpickler(body, archive=None).load()  # type: ignore[arg-type]
    assert list(obj.items()) == [("a", 1)]


@pytest.mark.parametrize("how", ["size", "offset", "stride", "negative"])
def test_views_outside_their_storage_are_refused(tmp_path: Path, how: str) -> None:
    out = extract_only(tmp_path, sabotage.make_out_of_bounds_checkpoint(tmp_path / "o.pt", how))
    assert out.error is not None and out.error.exit is WorkerExit.CONVERSION_FAILED
    assert ("past its storage" if how != "negative" else "non-negative") in out.error.message


def test_a_missing_storage_record_is_refused(tmp_path: Path) -> None:
    out = extract_only(tmp_path, sabotage.make_missing_storage_checkpoint(tmp_path / "m.pt"))
    assert out.error is not None and out.error.exit is WorkerExit.CONVERSION_FAILED
    assert "missing" in out.error.message


def test_a_storage_record_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    ref = sabotage.StorageRef("0", 100)
    path = sabotage.write_checkpoint(tmp_path / "s.pt", {"w": sabotage.TensorRef(
        ref, 0, (4,), (1,))}, {"0": bytes(16)})
    out = extract_only(tmp_path, path)
    assert out.error is not None and out.error.exit is WorkerExit.CONVERSION_FAILED


def test_a_zip_bomb_record_is_refused_before_inflating(tmp_path: Path) -> None:
    out = extract_only(tmp_path, sabotage.make_zip_bomb_checkpoint(tmp_path / "b.pt"))
    assert out.error is not None and out.error.exit is WorkerExit.CONVERSION_FAILED
    assert "zip bomb" in out.error.message


def test_an_oversized_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    artifact, _ = models.make_state_dict(tmp_path / "src")
    monkeypatch.setattr(extract, "MAX_PICKLE_BYTES", 64)
    out = extract_only(tmp_path, artifact)
    assert out.error is not None and out.error.exit is WorkerExit.CONVERSION_FAILED


def test_overlapping_or_duplicate_zip_entries_are_refused(tmp_path: Path) -> None:
    artifact, _ = models.make_state_dict(tmp_path / "src")
    dup = tmp_path / "dup.pt"
    with zipfile.ZipFile(artifact) as zin, zipfile.ZipFile(dup, "w") as zout:
        infos = zin.infolist()
        for info in infos:
            zout.writestr(info.filename, zin.read(info.filename))
        with pytest.warns(UserWarning):
            zout.writestr(infos[-2].filename, b"\0" * infos[-2].file_size)
    out = extract_only(tmp_path, dup)
    assert out.error is not None and "duplicate" in out.error.message


def test_deep_nesting_is_capped_not_recursed(tmp_path: Path) -> None:
    artifact, truth = sabotage.make_deep_checkpoint(tmp_path / "deep.pt", depth=20_000)
    out = extract_only(tmp_path, artifact)
    assert_holds(out, truth)  # the tensor 20 000 levels down is skipped, as the converter does
    assert any("deep.x.x" in w for w in out.report.warnings)


def test_deep_nesting_matches_the_converter(tmp_path: Path) -> None:
    artifact, _ = sabotage.make_deep_checkpoint(tmp_path / "deep.pt", depth=40)
    assert_same_as_convert(tmp_path, artifact)


def test_extraction_never_imports_torch(tmp_path: Path) -> None:
    """The reading must not depend on the loader a payload could have patched."""
    artifact, _ = models.make_tied_state_dict(tmp_path / "src")
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    os.link(artifact, tmp_path / "in" / ARTIFACT_NAME)
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
sys.path.insert(0, {str(ROOT / "sandbox")!r})
from airlock_sandbox.contract import JobMode, JobSpec
from airlock_sandbox.formats import ArtifactFormat
from airlock_worker import job
from airlock_worker.report import Report
report = Report()
job.run(JobSpec(job_id="t", artifact_format=ArtifactFormat.ZIP, mode=JobMode.EXTRACT_WEIGHTS),
        {str(tmp_path / "in")!r},
        {str(tmp_path / "out")!r}, report)
assert report.tensor_count == 2, report
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / OUTPUT).stat().st_size > 0

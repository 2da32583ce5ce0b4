"""Hugging Face model directories on the client: reading the directory (links, special files,
the index as attacker data), which files are carried over and which skipped, the index built
from the converted shards' headers, and the directory's conversion with a fake client (one
shard's failure or disagreement fails it all, atomically; the weakest assurance wins)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import stat
import struct
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from airlock_client import (
    Assurance,
    ConversionError,
    ConversionReport,
    ConversionResult,
    ModelSourceError,
    _hf_dir,
    _part_files,
    _st_header,
    model_dir,
)
from airlock_client._errors import AirlockError, IntegrityError
from airlock_client._part_files import OutputSwapped
from airlock_client.model_dir import INDEX_MISMATCH, ModelDirError, convert_directory
from airlock_client.provenance import MAX_SUBJECT, check_subject
from airlock_sandbox import data_files
from tests.unit import shared_tmp

INDEX = _hf_dir.WEIGHTS_INDEX


def hf_dir(root: Path, shards: dict[str, list[str]] | None = None,
           index: Any = None) -> Path:
    """Shards are opaque bytes here: nothing on the client opens them."""
    shards = shards or {"pytorch_model-00001-of-00002.bin": ["a", "b"],
                        "pytorch_model-00002-of-00002.bin": ["c"]}
    root.mkdir()
    for name in shards:
        (root / name).write_bytes(b"PK\x03\x04 opaque weights")
    if index is None:
        index = {"metadata": {"total_size": 1},
                 "weight_map": {t: f for f, names in shards.items() for t in names}}
    (root / INDEX).write_text(index if isinstance(index, str) else json.dumps(index))
    (root / "config.json").write_text('{"hidden_size": 8}')
    return root


# -- detection and the directory's entries -----------------------------------------------------


def test_an_mlmodel_file_keeps_a_directory_mlflow(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "m")
    assert _hf_dir.kind(root) == "pytorch"
    (root / "MLmodel").write_text("flavors: {}")
    assert _hf_dir.kind(root) == "mlflow"
    (tmp_path / "empty").mkdir()
    assert _hf_dir.kind(tmp_path / "empty") is None
    assert _hf_dir.kind(root / "config.json") is None


def test_shards_are_named_the_transformers_way(tmp_path: Path) -> None:
    model = _hf_dir.inspect(hf_dir(tmp_path / "m"))
    assert [(s.source.name, s.output_name, sorted(s.names or ())) for s in model.shards] == [
        ("pytorch_model-00001-of-00002.bin", "model-00001-of-00002.safetensors", ["a", "b"]),
        ("pytorch_model-00002-of-00002.bin", "model-00002-of-00002.safetensors", ["c"])]
    assert model.sharded


def test_an_unsharded_directory_becomes_model_safetensors(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "pytorch_model.bin").write_bytes(b"PK opaque")
    model = _hf_dir.inspect(root)
    assert [(s.output_name, s.names) for s in model.shards] == [("model.safetensors", None)]
    assert not model.sharded


def test_a_peft_adapter_directory_becomes_adapter_model_safetensors(tmp_path: Path) -> None:
    """A LoRA-style adapter saved as a pickle: ``adapter_model.bin`` becomes what ``peft``
    loads instead, its ``adapter_config.json`` carried; beside a model's own weights it is
    refused (which of the two is meant is unclear), with the command for the adapter."""
    root = tmp_path / "lora"
    root.mkdir()
    (root / "adapter_model.bin").write_bytes(b"PK opaque")
    (root / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    assert _hf_dir.kind(root) == "pytorch"
    model = _hf_dir.inspect(root)
    assert [(s.source.name, s.output_name, s.names) for s in model.shards] == [
        ("adapter_model.bin", "adapter_model.safetensors", None)]
    assert [d.name for d in model.data_files] == ["adapter_config.json"]
    (root / "pytorch_model.bin").write_bytes(b"PK opaque")
    with pytest.raises(ModelSourceError, match="convert the adapter on its own") as caught:
        _hf_dir.inspect(root)
    assert caught.value.reason == _hf_dir.INDEX_INVALID


def test_an_adapter_output_is_replaced_by_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "lora"
    root.mkdir()
    (root / "adapter_model.bin").write_bytes(b"PK opaque")
    out = tmp_path / "out"
    client = FakeClient({"adapter_model.bin": ["base.lora_A.weight"]})
    convert_directory(client, root, out)  # type: ignore[arg-type]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_model.safetensors", "adapter_model.safetensors.provenance.json"]
    convert_directory(client, root, out, overwrite=True)  # type: ignore[arg-type]
    assert client.calls == ["adapter_model.bin"] * 2


@pytest.mark.parametrize("make", ["symlink", "fifo", "hardlink"])
def test_a_link_or_special_file_refuses_the_directory(tmp_path: Path, make: str) -> None:
    root = hf_dir(tmp_path / "m")
    target = root / "README.md"
    if make == "symlink":
        target.symlink_to("/etc/passwd")
    elif make == "fifo":
        os.mkfifo(target)
    else:
        os.link(root / "config.json", target)
    with pytest.raises(ModelSourceError) as caught:
        _hf_dir.inspect(root)
    assert caught.value.reason == "UNSAFE_MODEL_DIR"


def test_a_shard_that_is_a_link_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    root = hf_dir(tmp_path / "m")
    os.unlink(root / "pytorch_model-00002-of-00002.bin")
    (root / "pytorch_model-00002-of-00002.bin").symlink_to(outside)
    with pytest.raises(ModelSourceError, match="symbolic link"):
        _hf_dir.inspect(root)


# -- an MLflow transformers model holding a Hugging Face directory -----------------------------


def mlflow_transformers(root: Path, *, framework: str = "pt", binary: str = "model",
                        components: Any = ("tokenizer",)) -> Path:
    """The layout mlflow.transformers.save_model writes (weights saved as pickles)."""
    root.mkdir()
    hf_dir(root / binary if "/" not in binary and binary not in ("", "..") else root / "w")
    tokenizer = root / "components" / "tokenizer"
    tokenizer.mkdir(parents=True)
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0"}')
    (tokenizer / "vocab.txt").write_text("[PAD]\nhello\n")
    (tokenizer / "special_tokens_map.pkl").write_bytes(b"\x80\x04 a pickle")
    conf = {"transformers_version": "4.44.0", "framework": framework, "task": "fill-mask",
            "model_binary": binary, "components": list(components)}
    (root / "MLmodel").write_text(json.dumps({"flavors": {"transformers": conf,
                                                          "python_function": {}}}))
    (root / "requirements.txt").write_text("transformers\n")
    return root


def test_an_mlflow_transformers_model_is_its_hugging_face_directory(tmp_path: Path) -> None:
    root = mlflow_transformers(tmp_path / "bundle")
    assert _hf_dir.kind(root) == "pytorch"
    model = _hf_dir.inspect(root)
    assert model.root == root
    assert [s.source.path for s in model.shards] == [
        root / "model" / "pytorch_model-00001-of-00002.bin",
        root / "model" / "pytorch_model-00002-of-00002.bin"]
    # the tokenizer is carried beside the weights, as from_pretrained expects it
    assert [d.name for d in model.data_files] == ["config.json", "tokenizer.json", "vocab.txt"]
    skipped = {s.name: s.why for s in model.skipped}
    assert "pickle" in skipped["components/tokenizer/special_tokens_map.pkl"]
    assert "MLflow's own" in skipped["MLmodel"] and "MLflow's own" in skipped["requirements.txt"]


def test_a_component_named_many_times_is_read_once(tmp_path: Path) -> None:
    """Found by review: ``components`` naming one component over and over listed it once per
    name, a skipped entry for each of its files every time: a 1 MiB MLmodel names 520,000,
    and the client ran out of memory before anything was sent (a MemoryError after 68 s
    under a 2 GB cap). A registry's writer chooses the MLmodel of a version ``migrate``
    reads."""
    root = mlflow_transformers(tmp_path / "bundle", components=["tokenizer"] * 16)
    model = _hf_dir.inspect(root)
    assert [s.name for s in model.skipped].count(
        "components/tokenizer/special_tokens_map.pkl") == 1
    assert [d.name for d in model.data_files] == ["config.json", "tokenizer.json", "vocab.txt"]


def test_more_components_than_a_pipeline_saves_refuse_the_model(tmp_path: Path) -> None:
    root = mlflow_transformers(tmp_path / "bundle", components=["tokenizer"] * 50_000)
    with pytest.raises(ModelSourceError, match=r"names 50000 components \(limit 16\)"):
        _hf_dir.inspect(root)


def test_the_weights_and_the_components_share_one_entry_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each directory within the limit, together beyond it."""
    root = mlflow_transformers(tmp_path / "bundle", components=["tokenizer", "processor"])
    processor = root / "components" / "processor"
    processor.mkdir()
    for i in range(3):
        (processor / f"extra{i}.txt").write_text("x")
    model_entries = len(os.listdir(root / "model"))
    tokenizer_entries = len(os.listdir(root / "components" / "tokenizer"))
    monkeypatch.setattr(_hf_dir, "MAX_ENTRIES", model_entries + tokenizer_entries + 3)
    assert len(_hf_dir.inspect(root).skipped) > 0  # exactly at the limit: read
    (processor / "extra3.txt").write_text("x")
    with pytest.raises(ModelSourceError, match="more than 3 entries"):
        _hf_dir.inspect(root)


@pytest.mark.parametrize("change", ["tensorflow", "safetensors weights", "another flavor"])
def test_other_mlflow_models_stay_mlflow_models(tmp_path: Path, change: str) -> None:
    root = mlflow_transformers(tmp_path / "bundle",
                               framework="tf" if change == "tensorflow" else "pt")
    if change == "safetensors weights":
        for f in (root / "model").iterdir():
            f.unlink()
        (root / "model" / "model.safetensors").write_bytes(b"{}")
    if change == "another flavor":
        (root / "MLmodel").write_text(json.dumps({"flavors": {"sklearn": {}}}))
    assert _hf_dir.kind(root) == "mlflow"


@pytest.mark.parametrize("binary", ["../outside", "/etc", "a/b"])
def test_a_model_binary_leading_out_of_the_bundle_refuses_it(tmp_path: Path,
                                                             binary: str) -> None:
    root = mlflow_transformers(tmp_path / "bundle", binary=binary)
    with pytest.raises(ModelSourceError) as caught:
        _hf_dir.kind(root)
    assert caught.value.reason == "UNSAFE_MODEL_DIR"


def test_a_weights_directory_that_is_a_link_refuses_the_bundle(tmp_path: Path) -> None:
    elsewhere = hf_dir(tmp_path / "elsewhere")
    root = mlflow_transformers(tmp_path / "bundle", binary="weights")
    (root / "weights").rename(tmp_path / "unused")
    (root / "weights").symlink_to(elsewhere)
    with pytest.raises(ModelSourceError, match="symbolic link"):
        _hf_dir.inspect(root)


# -- the index ---------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["../outside.bin", "/etc/passwd", "sub/shard.bin", "..",
                                      "a\\b.bin", "", "x\x1b.bin"])
def test_an_index_naming_a_file_outside_the_directory_is_refused(tmp_path: Path,
                                                                  filename: str) -> None:
    (tmp_path / "outside.bin").write_bytes(b"secret")
    root = hf_dir(tmp_path / "m", index={"weight_map": {"a": filename}})
    (root / "sub").mkdir()
    (root / "sub" / "shard.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError) as caught:
        _hf_dir.inspect(root)
    assert caught.value.reason == "UNSAFE_MODEL_DIR", caught.value.message


@pytest.mark.parametrize("index, why", [
    ('{"weight_map": {"a": "pytorch_model-00001-of-00002.bin", '
     '"a": "pytorch_model-00002-of-00002.bin"}}', "duplicate key"),
    ('{"weight_map": {"a": NaN}}', "non-standard constant"),
    ('[1, 2]', "no 'weight_map'"),
    ('{"weight_map": {}}', "no 'weight_map'"),
    ('{"weight_map": {"a": 3}}', "not a tensor name and a file name"),
    ('{"weight_map": {"a": "missing.bin"}}', "not a regular file"),
    ('{"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}, "metadata": 1}', "metadata"),
    (' {"weight_map": {}}', "leading whitespace"),
    ('\xff', "not strict JSON"),
])
def test_a_malformed_index_is_refused_with_a_reason(tmp_path: Path, index: str,
                                                    why: str) -> None:
    root = hf_dir(tmp_path / "m", index="{}")
    (root / INDEX).write_bytes(index.encode("utf-8", "surrogateescape")
                               if index != "\xff" else b"\xff")
    with pytest.raises(ModelSourceError, match=why) as caught:
        _hf_dir.inspect(root)
    assert caught.value.reason == _hf_dir.INDEX_INVALID


def test_an_oversized_index_is_refused_before_it_is_read(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = hf_dir(tmp_path / "m")
    monkeypatch.setattr(_hf_dir, "MAX_INDEX_BYTES", 64)
    with pytest.raises(ModelSourceError, match="limit 64") as caught:
        _hf_dir.inspect(root)
    assert caught.value.reason == _hf_dir.INDEX_INVALID


def test_weights_up_to_64_gib_in_all_are_taken_and_more_are_refused(tmp_path: Path) -> None:
    """The directory cap counts the shards' sizes (sparse files here: nothing is read)."""
    root = hf_dir(tmp_path / "m")
    first, second = sorted(root.glob("pytorch_model-*.bin"))
    half = _hf_dir.MAX_WEIGHT_BYTES // 2
    for shard in (first, second):
        with shard.open("r+b") as fh:
            fh.truncate(half)
    assert _hf_dir.inspect(root).weight_bytes == 64 * 1024**3
    with second.open("r+b") as fh:
        fh.truncate(half + 1)
    with pytest.raises(ModelSourceError, match=f"limit {64 * 1024**3}") as caught:
        _hf_dir.inspect(root)
    assert caught.value.reason == "UNSAFE_MODEL_DIR"


def test_weights_and_an_index_together_are_ambiguous(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "m")
    (root / "pytorch_model.bin").write_bytes(b"PK")
    with pytest.raises(ModelSourceError, match="unclear"):
        _hf_dir.inspect(root)


def test_a_directory_without_weights_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError) as caught:
        _hf_dir.inspect(tmp_path / "m")
    assert caught.value.reason == "NOT_A_MODEL_DIR"


def test_one_checkpoint_is_a_directorys_weights_and_a_trainers_state_never_is(
        tmp_path: Path) -> None:
    """A Lightning ``model.ckpt`` (or a loop's ``best.pt``) beside its config: the directory's
    weights, converted to ``model.safetensors``; the optimizer's and scheduler's state are
    pickles that are never carried, and never taken for the model."""
    root = tmp_path / "m"
    root.mkdir()
    for name in ("model.ckpt", "optimizer.pt", "scheduler.pt", "rng_state_0.pth"):
        (root / name).write_bytes(b"PK")
    (root / "config.json").write_text("{}")
    assert _hf_dir.kind(root) == "pytorch"
    model = _hf_dir.inspect(root)
    assert [(s.source.name, s.output_name) for s in model.shards] == [
        ("model.ckpt", "model.safetensors")]
    assert [d.name for d in model.data_files] == ["config.json"]
    assert {s.name for s in model.skipped} == {"optimizer.pt", "scheduler.pt",
                                                "rng_state_0.pth"}


@pytest.mark.parametrize("names", [
    # a Trainer's checkpoint-500/: its weights are safe already
    ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "config.json"],
    ["model.safetensors", "ema.pt"],
    ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "optimizer_0.pt"],
    ["adapter_model.safetensors", "adapter_config.json", "grad_scaler.pt"],
    ["Optimizer.pt", "Scheduler-1.PTH"],
    # found by the last review: weights in another format, and more trainers' state
    ["model.onnx", "ema.pt"],
    ["tf_model.h5", "best.ckpt"],
    ["recipe_state.pt"], ["optim.pt"], ["training_state.pt"],
])
def test_a_stray_checkpoint_beside_safe_weights_or_a_trainers_state_is_never_the_model(
        tmp_path: Path, names: list[str]) -> None:
    """Found by review: ``ema.pt`` beside ``model.safetensors`` was taken for the weights, and
    an optimizer's moments would have been signed as the model."""
    root = tmp_path / "m"
    root.mkdir()
    for name in names:
        (root / name).write_bytes(b"{}" if name.endswith(".json") else b"PK")
    assert _hf_dir.kind(root) is None
    assert _hf_dir.checkpoints(names) == []


def test_two_checkpoints_are_ambiguous_and_a_trainers_state_alone_is_no_model(
        tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    for name in ("last.ckpt", "best.ckpt"):
        (root / name).write_bytes(b"PK")
    with pytest.raises(ModelSourceError) as caught:
        _hf_dir.inspect(root)
    assert caught.value.reason == "NOT_A_MODEL_DIR" and "unclear" in caught.value.message
    assert "airlock convert" in caught.value.message
    state = tmp_path / "state"
    state.mkdir()
    (state / "optimizer.pt").write_bytes(b"PK")
    assert _hf_dir.kind(state) is None


# -- data files --------------------------------------------------------------------------------


def test_data_files_are_carried_and_everything_else_skipped_with_why(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "m")
    (root / "tokenizer.json").write_text('{"model": {}}')
    (root / "vocab.txt").write_text("a\nb\n")
    (root / "README.md").write_text("# tiny\n")
    (root / "preprocessor_config.json").write_text('{"do_resize": true}')
    (root / "chat_template.json").write_text('{"chat_template": "{{ messages }}"}')
    (root / "modeling_tiny.py").write_text("import os")
    (root / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (root / "optimizer.pt").write_bytes(b"PK")
    (root / "extra.pkl").write_bytes(b"\x80\x04")
    (root / "pytorch_model-00009-of-00009.bin").write_bytes(b"PK")
    (root / "model.safetensors").write_bytes(b"\0" * 8)
    (root / "notes").mkdir()
    model = _hf_dir.inspect(root)
    assert [d.name for d in model.data_files] == ["README.md", "chat_template.json",
                                                  "config.json", "preprocessor_config.json",
                                                  "tokenizer.json", "vocab.txt"]
    why = {s.name: s.why for s in model.skipped}
    assert set(why) == {"modeling_tiny.py", "training_args.bin", "optimizer.pt", "extra.pkl",
                        "pytorch_model-00009-of-00009.bin", "model.safetensors", "notes/"}
    assert "trust_remote_code" in why["modeling_tiny.py"]
    assert "pickle" in why["training_args.bin"] and "pickle" in why["optimizer.pt"]
    assert "does not name" in why["pytorch_model-00009-of-00009.bin"]
    assert "directory" in why["notes/"]


@pytest.mark.parametrize("name, data, why", [
    ("config.json", b'{"a": 1, "a": 2}', "duplicate key"),
    ("config.json", b"{not json", "not strict JSON"),
    ("tokenizer_config.json", b'{"x": "\xff"}', "not UTF-8"),
    ("vocab.txt", b"a\x00b", "NUL"),
    ("merges.txt", b"\xc3\x28", "not UTF-8"),
])
def test_a_data_file_that_is_not_what_it_claims_is_skipped(tmp_path: Path, name: str,
                                                           data: bytes, why: str) -> None:
    """The client reads no data file: each is sent as what its name says, and one its
    sandbox refuses as not that (FORMAT_MISMATCH, the broker's double here) is skipped with
    the broker's reason; the directory converts without it."""
    root = hf_dir(tmp_path / "m", SHARDS)
    (root / name).write_bytes(data)
    assert name in [d.name for d in _hf_dir.inspect(root).data_files]  # chosen by name
    result = convert_directory(FakeClient(GOOD), root, tmp_path / "out",  # type: ignore[arg-type]
                               jobs=2)
    assert name not in result.carried and not (tmp_path / "out" / name).exists()
    assert not (tmp_path / "out" / f"{name}.provenance.json").exists()
    skipped = {s.name: s.why for s in result.skipped}
    assert why in skipped[name] and skipped[name].startswith("declared ")


def test_a_refused_data_file_fails_the_directory_before_any_shard_when_all_are_wanted(
        tmp_path: Path) -> None:
    """``all_data_files`` (what migrate asks: a twin must hold every one): a data file its
    sandbox refuses fails the directory with why, before a shard is sent, and leaves
    nothing behind."""
    from airlock_client.model_dir import DATA_FILE_REFUSED

    root = hf_dir(tmp_path / "m", SHARDS)
    (root / "config.json").write_bytes(b"{not json")
    client = FakeClient(GOOD)
    with pytest.raises(ModelDirError) as caught:
        convert_directory(client, root, tmp_path / "out", jobs=2,  # type: ignore[arg-type]
                          all_data_files=True)
    assert caught.value.reason == DATA_FILE_REFUSED
    assert "config.json" in caught.value.message and "not strict JSON" in caught.value.message
    assert client.calls == [], client.calls  # no shard was sent
    assert not (tmp_path / "out").exists()


def test_an_oversized_data_file_is_skipped_unread(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = hf_dir(tmp_path / "m")
    monkeypatch.setattr(_hf_dir, "MAX_DATA_FILE_BYTES", 10)
    model = _hf_dir.inspect(root)
    assert "over the 10-byte cap" in {s.name: s.why for s in model.skipped}["config.json"]


# -- headers and the index written from them ---------------------------------------------------


def _safetensors(path: Path, names: list[str], metadata: dict[str, str] | None = None) -> None:
    save_file({n: np.full((2, 3), i, dtype=np.float32) for i, n in enumerate(names)},
              str(path), metadata=metadata)


def test_the_index_is_written_from_the_shards_headers(tmp_path: Path) -> None:
    _safetensors(tmp_path / "model-00001-of-00002.safetensors", ["embed", "norm"],
                 {"format": "pt", "lm_head": "embed"})
    _safetensors(tmp_path / "model-00002-of-00002.safetensors", ["layer.0"], {"format": "pt"})
    headers = [(n, _st_header.read_header(tmp_path / n))
               for n in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")]
    assert headers[0][1].deduplicated == {"lm_head": "embed"}
    doc = json.loads(_st_header.index_document(headers))
    assert doc == {"metadata": {"total_size": 3 * 24, "deduplicated": {"lm_head": "embed"}},
                   "weight_map": {"embed": "model-00001-of-00002.safetensors",
                                  "norm": "model-00001-of-00002.safetensors",
                                  "layer.0": "model-00002-of-00002.safetensors"}}


@pytest.mark.parametrize("header, why", [
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "duplicate"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}', "hold 8 bytes"),
    (b'{"a": {"dtype": "F32", "shape": [1]}}', "data_offsets"),
    (b'[]', "not an object"),
])
def test_a_header_that_does_not_read_is_an_integrity_error(tmp_path: Path, header: bytes,
                                                           why: str) -> None:
    header += b" " * (-len(header) % 8)
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                             + b"\0" * 4)
    with pytest.raises(IntegrityError, match=why):
        _st_header.read_header(tmp_path / "x.safetensors")


def test_a_header_length_beyond_the_file_is_refused_unread(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(IntegrityError, match="header length"):
        _st_header.read_header(tmp_path / "x.safetensors")


# -- the directory's conversion, with a fake client ---------------------------------------------


class FakeClient:
    """Writes, for each shard, a safetensors file with the tensor names ``outputs`` gives (by
    source file name), or raises what ``errors`` gives, with the report ``reports`` gives;
    records how many ran at once and the loading policy each was asked for."""

    def __init__(self, outputs: dict[str, list[str]], errors: dict[str, Exception] | None = None,
                 assurance: dict[str, str] | None = None,
                 meanwhile: Any = None,
                 reports: dict[str, ConversionReport] | None = None) -> None:
        self.meanwhile = meanwhile
        self.outputs = outputs
        self.errors = errors or {}
        self.assurance = assurance or {}
        self.reports = reports or {}
        self.running = 0
        self.most = 0
        self.calls: list[str] = []
        self.policies: list[str] = []
        self.closed = False
        self.asked_jobs: list[str] = []
        self.carried: list[tuple[str, str]] = []
        self.subjects: list[str] = []
        self._lock = threading.Lock()

    def close(self) -> None:  # what a second Ctrl-C calls (batch.run_bounded's abandon)
        self.closed = True

    def convert(self, artifact: Path, output: Path, **kwargs: Any) -> ConversionResult:
        name = kwargs.get("filename") or Path(artifact).name  # as Client.convert
        self.subjects.append(check_subject(kwargs.get("subject", "")))  # as Client.convert
        if kwargs.get("declared_format") in ("json", "text", "sentencepiece"):
            assert kwargs["loading_policy"] == "safe_only"
            return self._carry(Path(artifact), Path(output), kwargs["declared_format"], name)
        with self._lock:
            self.calls.append(name)
            self.policies.append(kwargs["loading_policy"])
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if self.meanwhile is not None:
                self.meanwhile()
            if name in self.errors:
                raise self.errors[name]
            names = self.outputs[name]
            kept = [n for n in names if not n.startswith("tied:")]
            tied = {n[5:].split("=")[0]: n.split("=")[1] for n in names if n.startswith("tied:")}
            _safetensors(Path(output), kept, {"format": "pt", **tied})
            return ConversionResult(
                job_id=f"job-{name}", output=Path(output), format="safetensors",
                sha256="0" * 64, size=Path(output).stat().st_size, input_sha256="1" * 64,
                input_size=Path(artifact).stat().st_size, detected_format="pytorch_zip",
                assurance=Assurance(self.assurance.get(name, "integrity_verified")),
                loading_policy=kwargs["loading_policy"], duration_seconds=0.1,
                image_id="img", runtime="runc",
                report=self.reports.get(name, ConversionReport()),
                integrity_note=("no extraction" if name in self.assurance else ""),
                provenance=b'{"signed": true}')
        finally:
            with self._lock:
                self.running -= 1

    def _carry(self, artifact: Path, output: Path, declared: str,
               name: str) -> ConversionResult:
        """A data file, as the broker returns one: unchanged, with its own record, or refused
        as its sandbox refuses one that is not what it was declared to be."""
        data = artifact.read_bytes()
        with self._lock:
            self.carried.append((name, declared))
        if name in self.errors:
            raise self.errors[name]
        why = data_files.problem(data_files.KINDS[declared], data)
        if why is not None:
            raise ConversionError("FORMAT_MISMATCH", f"declared {declared}, but {why}",
                                  kind="rejected", code="INVALID_ARGUMENT")
        output.write_bytes(data)
        return ConversionResult(
            job_id=f"job-{name}", output=output, format="data",
            sha256=hashlib.sha256(data).hexdigest(), size=len(data),
            input_sha256=hashlib.sha256(data).hexdigest(), input_size=len(data),
            detected_format=declared, assurance=Assurance.INTEGRITY_VERIFIED,
            loading_policy="allow_code", duration_seconds=0.01, image_id="img",
            runtime="runc", report=ConversionReport(), integrity_note="",
            provenance=b'{"signed": "data"}')

    def attest_index(self, index: bytes, shards: list[tuple[str, bytes]], *,
                     subject: str = "") -> bytes:
        self.attested = (index, list(shards), subject)
        return b'{"index": "signed"}'

    def default_jobs(self, profile: str = "sklearn") -> int:
        self.asked_jobs.append(profile)
        return 2


SHARDS = {f"pytorch_model-0000{i}-of-00003.bin": names
          for i, names in enumerate([["embed", "lm_head"], ["layer.1"], ["layer.2"]], start=1)}
GOOD = {"pytorch_model-00001-of-00003.bin": ["embed", "tied:lm_head=embed"],
        "pytorch_model-00002-of-00003.bin": ["layer.1"],
        "pytorch_model-00003-of-00003.bin": ["layer.2"]}


def test_a_directory_converts_into_place_with_index_data_and_provenance(tmp_path: Path) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    (src / "modeling_x.py").write_text("import os")
    client = FakeClient(GOOD)
    seen: list[str] = []
    result = convert_directory(client, src, tmp_path / "out", jobs=2,  # type: ignore[arg-type]
                               progress=lambda p: seen.append(p.line()))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "config.json.provenance.json", "model-00001-of-00003.safetensors",
        "model-00001-of-00003.safetensors.provenance.json", "model-00002-of-00003.safetensors",
        "model-00002-of-00003.safetensors.provenance.json", "model-00003-of-00003.safetensors",
        "model-00003-of-00003.safetensors.provenance.json", "model.safetensors.index.json",
        "model.safetensors.index.json.provenance.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    # the index's record, asked for with the index as written and every shard's record
    attested, records, _ = client.attested
    assert attested == (out / "model.safetensors.index.json").read_bytes()
    assert [name for name, _ in records] == [f"model-0000{i}-of-00003.safetensors"
                                             for i in (1, 2, 3)]
    assert (out / "model.safetensors.index.json.provenance.json").read_bytes() \
        == b'{"index": "signed"}'
    assert index["weight_map"] == {"embed": "model-00001-of-00003.safetensors",
                                   "layer.1": "model-00002-of-00003.safetensors",
                                   "layer.2": "model-00003-of-00003.safetensors"}
    assert index["metadata"] == {"total_size": 72, "deduplicated": {"lm_head": "embed"}}
    assert result.deduplicated == {"lm_head": "embed"} and result.total_size == 72
    assert result.integrity_verified and result.integrity_note == ""
    assert [s.output for s in result.shards] == sorted(s.output for s in result.shards)
    assert all(s.result.output.parent == out and s.provenance.parent == out
               for s in result.shards)
    assert result.carried == ("config.json",)
    # carried through the broker, declared as what its name says, with its record beside it
    assert client.carried == [("config.json", "json")]
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (out / "config.json.provenance.json").read_bytes() == b'{"signed": "data"}'
    assert [s.name for s in result.skipped] == ["modeling_x.py"]
    assert len(seen) == 3 and seen[-1].startswith("shards 3/3 done") and client.most <= 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left"


def test_a_rerun_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    """A run killed mid-way (SIGKILL, a third Ctrl-C) leaves its temporary directory; the
    next conversion to the same destination removes it (_part_files.py says how it knows
    that run is dead)."""
    left = tmp_path / ".out.k1lled_1.airlock-part"
    left.mkdir()
    (left / "model-00001-of-00003.safetensors").write_bytes(b"half")
    os.utime(left, (0, 0))
    convert_directory(FakeClient(GOOD), hf_dir(tmp_path / "m", SHARDS),  # type: ignore[arg-type]
                      tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]


def test_the_shards_convert_jobs_at_a_time(tmp_path: Path) -> None:
    """``jobs=2``: the first two shards are in flight together (each waits for the other),
    never a third beside them."""
    together = threading.Barrier(2, timeout=60)
    entered = itertools.count()

    def meanwhile() -> None:
        if next(entered) < 2:
            together.wait()  # breaks (the shard fails) unless both run at once

    client = FakeClient(GOOD, meanwhile=meanwhile)
    result = convert_directory(client, hf_dir(tmp_path / "m", SHARDS),  # type: ignore[arg-type]
                               tmp_path / "out", jobs=2)
    assert len(result.shards) == 3 and client.most == 2


def test_without_jobs_a_directory_asks_the_broker_for_its_shards_pool(tmp_path: Path) -> None:
    """``jobs`` unset: what the broker runs at once, asked for the torch pool (the shards'),
    after the directory was inspected; a one-shard directory asks nothing."""
    client = FakeClient(GOOD)
    convert_directory(client, hf_dir(tmp_path / "m", SHARDS),  # type: ignore[arg-type]
                      tmp_path / "out")
    assert client.asked_jobs == ["torch"]
    single = tmp_path / "s"
    single.mkdir()
    (single / "pytorch_model.bin").write_bytes(b"PK opaque")
    one = FakeClient({"pytorch_model.bin": ["w"]})
    convert_directory(one, single, tmp_path / "out1")  # type: ignore[arg-type]
    assert one.asked_jobs == [] and one.calls == ["pytorch_model.bin"]


def test_a_destination_without_room_for_the_output_is_refused_before_any_shard(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The output will take about what the weights and data files take: a filesystem with
    less free space is refused (``NO_SPACE``, with both figures) before any shard is sent,
    and nothing is left; with just enough, the directory converts."""
    src = hf_dir(tmp_path / "m", SHARDS)
    needed = sum(p.stat().st_size for p in src.iterdir()
                 if p.name.endswith(".bin") or p.name == "config.json")
    asked: list[Path] = []

    def free(space: int, blocks: int = 10**6) -> Any:
        def usage(where: str | os.PathLike[str]) -> Any:
            asked.append(Path(where))
            return SimpleNamespace(f_bavail=space, f_frsize=1, f_blocks=blocks)
        return usage

    monkeypatch.setattr(model_dir.os, "statvfs", free(needed - 1))
    client = FakeClient(GOOD)
    with pytest.raises(AirlockError) as refused:
        convert_directory(client, src, tmp_path / "out" / "m")  # type: ignore[arg-type]
    assert refused.value.reason == model_dir.NO_SPACE
    assert f"needs about {needed} bytes" in refused.value.message
    assert f"has {needed - 1} bytes free" in refused.value.message
    assert client.calls == [] and asked == [tmp_path / "out"]
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(model_dir.os, "statvfs", free(needed))
    convert_directory(client, src, tmp_path / "out" / "m")  # type: ignore[arg-type]
    assert len(client.calls) == 3
    # A filesystem that reports no size at all (some FUSE mounts) is not judged.
    monkeypatch.setattr(model_dir.os, "statvfs", free(0, blocks=0))
    convert_directory(client, src, tmp_path / "out" / "m2")  # type: ignore[arg-type]
    assert len(client.calls) == 6


def test_the_weakest_shard_names_the_directory_assurance(tmp_path: Path) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    client = FakeClient(GOOD, assurance={"pytorch_model-00002-of-00003.bin": "format_safe_only"})
    result = convert_directory(client, src, tmp_path / "out")  # type: ignore[arg-type]
    assert result.assurance == Assurance.FORMAT_SAFE_ONLY and not result.integrity_verified
    assert result.integrity_note == ("pytorch_model-00002-of-00003.bin: format_safe_only "
                                     "(no extraction)")


def test_a_failed_shard_fails_the_directory_and_leaves_nothing(tmp_path: Path) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    bad = "pytorch_model-00002-of-00003.bin"
    client = FakeClient(GOOD, errors={bad: ConversionError(
        "POLICY_VIOLATION", "the loader would run code", kind="rejected", code="X")})
    with pytest.raises(ModelDirError) as caught:
        convert_directory(client, src, tmp_path / "out", jobs=1)  # type: ignore[arg-type]
    assert (caught.value.reason, caught.value.shard, caught.value.kind) == (
        "POLICY_VIOLATION", bad, "rejected")
    assert bad in caught.value.message
    assert isinstance(caught.value.cause, ConversionError)
    assert client.calls == sorted(SHARDS)[:2], "nothing new starts after a failure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "partial output left behind"
    # A re-run converts again.
    assert convert_directory(FakeClient(GOOD), src, tmp_path / "out").shards  # type: ignore[arg-type]


def test_a_file_its_client_skipped_after_a_failure_is_neither_the_failure_nor_a_line(
        tmp_path: Path) -> None:
    """``airlock migrate``'s client skips a file that waited for a lane while another failed
    (``FileSkipped``): the directory fails with the first failure, whichever of the two the
    batch yields first, and only that one gets a progress line."""
    from airlock_client._errors import FileSkipped

    src = hf_dir(tmp_path / "m", SHARDS)
    bad, skipped = "pytorch_model-00001-of-00003.bin", "pytorch_model-00002-of-00003.bin"
    both_in = threading.Barrier(2, timeout=30)
    client = FakeClient(GOOD, meanwhile=both_in.wait, errors={
        bad: ConversionError("POLICY_VIOLATION", "the loader would run code",
                             kind="rejected", code="X"),
        skipped: FileSkipped("not converted: another file of its version failed first")})
    lines: list[str] = []
    with pytest.raises(ModelDirError) as caught:
        convert_directory(client, src, tmp_path / "out", jobs=2,  # type: ignore[arg-type]
                          progress=lambda p: lines.append(f"{p.shard} {p.ok}"))
    assert (caught.value.reason, caught.value.shard) == ("POLICY_VIOLATION", bad)
    assert lines == [f"{bad} False"]
    # The same for a data file skipped after one that was not what its name says.
    (src / "tokenizer.json").write_text("{}")
    (src / "vocab.txt").write_text("a\nb\n")
    carrying = FakeClient(GOOD, errors={
        "tokenizer.json": ConversionError("FORMAT_MISMATCH", "declared json, but it is not",
                                          kind="rejected", code="X"),
        "vocab.txt": FileSkipped("not converted: another file of its version failed first")})
    with pytest.raises(ModelDirError) as caught:
        convert_directory(carrying, src, tmp_path / "out2", jobs=2,  # type: ignore[arg-type]
                          all_data_files=True)
    assert caught.value.reason == "DATA_FILE_REFUSED" and "tokenizer.json" in str(caught.value)


def test_a_shard_whose_tensors_disagree_with_the_index_is_refused(tmp_path: Path) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    wrong = {**GOOD, "pytorch_model-00003-of-00003.bin": ["layer.2", "sneaky"]}
    with pytest.raises(ModelDirError) as caught:
        convert_directory(FakeClient(wrong), src, tmp_path / "out")  # type: ignore[arg-type]
    assert caught.value.reason == INDEX_MISMATCH
    assert caught.value.shard == "pytorch_model-00003-of-00003.bin"
    assert "'sneaky'" in caught.value.message
    missing = {**GOOD, "pytorch_model-00001-of-00003.bin": ["embed"]}
    with pytest.raises(ModelDirError, match="missing 1 the index names \\('lm_head'\\)"):
        convert_directory(FakeClient(missing), src, tmp_path / "out")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_shard_swapped_for_a_link_after_inspection_is_refused(tmp_path: Path) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    (tmp_path / "elsewhere.bin").write_bytes(b"PK\x03\x04 opaque weights")
    victim = src / "pytorch_model-00002-of-00003.bin"

    def swap() -> None:
        if not victim.is_symlink():
            victim.unlink()
            victim.symlink_to(tmp_path / "elsewhere.bin")

    client = FakeClient(GOOD, meanwhile=swap)
    with pytest.raises(ModelDirError) as caught:
        convert_directory(client, src, tmp_path / "out", jobs=1)  # type: ignore[arg-type]
    assert (caught.value.reason, caught.value.shard) == ("UNSAFE_MODEL_DIR", victim.name)
    assert victim.name not in client.calls


def test_an_existing_destination_is_refused_unless_empty_or_overwritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    out = tmp_path / "out"
    out.mkdir()
    convert_directory(FakeClient(GOOD), src, out)  # type: ignore[arg-type]  # empty: fine
    with pytest.raises(FileExistsError, match="not empty"):
        convert_directory(FakeClient(GOOD), src, out)  # type: ignore[arg-type]
    swapped: list[bool] = []
    exchange = _part_files.exchange
    for swap in (True, False):  # in one step (renameat2), or where it cannot, two renames

        def noted(a: Path, b: Path, swap: bool = swap) -> bool:
            swapped.append(swap and exchange(a, b))
            return swapped[-1]

        (out / "model-00001-of-00003.safetensors").write_bytes(b"an older output")
        monkeypatch.setattr(_part_files, "exchange", noted)
        convert_directory(FakeClient(GOOD), src, out, overwrite=True)  # type: ignore[arg-type]
        assert (out / "model-00001-of-00003.safetensors").read_bytes() != b"an older output"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]
    assert swapped == [True, False]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        convert_directory(FakeClient(GOOD), src, tmp_path / "file")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source directory"):
        convert_directory(FakeClient(GOOD), src, src, overwrite=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source directory"):
        convert_directory(FakeClient(GOOD), src, tmp_path, overwrite=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("stranger", ["notes.txt", "model.safetensors.bak", "sub/",
                                      "tokenizer.json/"])
def test_overwrite_never_deletes_a_directory_that_is_not_an_airlock_output(
        tmp_path: Path, stranger: str) -> None:
    """``-o ~/work --overwrite`` by mistake: only a directory holding what an Airlock
    output holds (shards, index, provenance records, carried data files) is replaced."""
    src = hf_dir(tmp_path / "m", SHARDS)
    out = tmp_path / "out"
    convert_directory(FakeClient(GOOD), src, out)  # type: ignore[arg-type]
    before = sorted(p.name for p in out.iterdir())
    (out / stranger).mkdir() if stranger.endswith("/") else (out / stranger).write_text("mine")
    name = stranger.rstrip("/")
    client = FakeClient(GOOD)
    with pytest.raises(FileExistsError, match=re.escape(f"'{name}'")) as caught:
        convert_directory(client, src, out, overwrite=True)  # type: ignore[arg-type]
    assert "not an Airlock output" in str(caught.value)
    assert client.calls == [], "refused before any shard is sent"
    assert (out / name).exists() and sorted(p.name for p in out.iterdir()) == sorted(
        [*before, name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]


def test_overwrite_never_deletes_a_save_pretrained_directory_of_the_same_names(
        tmp_path: Path) -> None:
    """Found by review: a user's own ``save_pretrained`` output uses an Airlock output's file
    names (shards, index, config, tokenizer) and was replaced by ``--overwrite``. Every file
    of an Airlock output has its provenance record beside it; one without is the user's."""
    src = hf_dir(tmp_path / "m", SHARDS)
    out = tmp_path / "hf"
    convert_directory(FakeClient(GOOD), src, out)  # type: ignore[arg-type]
    for record in out.glob("*.provenance.json"):
        record.unlink()  # what save_pretrained writes: the same names, no records
    before = sorted(p.name for p in out.iterdir())
    client = FakeClient(GOOD)
    with pytest.raises(FileExistsError, match="not an Airlock output"):
        convert_directory(client, src, out, overwrite=True)  # type: ignore[arg-type]
    assert client.calls == [] and sorted(p.name for p in out.iterdir()) == before


def test_overwrite_checks_the_destination_again_before_replacing_it(tmp_path: Path) -> None:
    src = hf_dir(tmp_path / "m", SHARDS)
    out = tmp_path / "out"
    convert_directory(FakeClient(GOOD), src, out)  # type: ignore[arg-type]

    def meanwhile() -> None:
        (out / "written-meanwhile.txt").write_text("mine")

    with pytest.raises(FileExistsError, match=r"'written-meanwhile\.txt'"):
        convert_directory(FakeClient(GOOD, meanwhile=meanwhile), src, out,  # type: ignore[arg-type]
                          overwrite=True)
    assert (out / "written-meanwhile.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]


# -- the command line's usage errors (no broker is contacted) -----------------------------------


@pytest.mark.parametrize("args, why", [
    (["{plain}"], "neither an MLflow model"),
    (["{model}", "--to", "onnx"], "safetensors only"),
    (["{model}", "--input-shape", "1,2"], "do not apply"),
    (["{model}", "--jobs", "0"], "--jobs must be between 1 and"),
    (["{model}", "--keep-training-state"], "the model's weights only"),
    (["{model}/config.json", "--jobs", "2"], "applies to a PyTorch model directory only"),
    (["{model}", "-o", "{model}", "--overwrite"], "source directory"),
])
def test_the_cli_says_what_is_wrong_before_it_connects(tmp_path: Path, args: list[str], why: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from airlock_client.cli import main

    model = hf_dir(tmp_path / "m")
    (tmp_path / "plain").mkdir()
    argv = [a.format(model=model, plain=tmp_path / "plain") for a in args]
    assert main(["convert", *argv, "--server", "127.0.0.1:9"]) == 2
    assert why in capsys.readouterr().err


@pytest.mark.parametrize("total, line", [
    (500, "1/2 done, "), (1500, "0.8/1.5 kB"), (3 * 10**9, "1.5/3.0 GB"), (500, "250/500 bytes"),
])
def test_the_progress_line_counts_shards_and_bytes(total: int, line: str) -> None:
    from airlock_client.batch import Throughput
    from airlock_client.model_dir import DirectoryProgress

    throughput = Throughput(total=2)
    throughput.add(True)
    step = DirectoryProgress("a.bin", True, 1, 2, total // 2, total, throughput)
    assert line in step.line()


def test_the_eta_counts_bytes_and_the_rate_says_its_unit() -> None:
    """One small shard of two done after a minute, 900 of 1000 bytes still to go: about nine
    minutes left, not the one minute that counting shards would say."""
    import time

    from airlock_client.batch import Throughput
    from airlock_client.model_dir import DirectoryProgress

    throughput = Throughput(total=2, began=time.monotonic() - 60)
    throughput.add(True)
    line = DirectoryProgress("a.bin", True, 1, 2, 100, 1000, throughput).line()
    assert "about 9m00s left" in line and "shards/min" in line, line
    assert line.startswith("shards 1/2 done, 1.0 shards/min; 0.1/1.0 kB, about"), line
    done = DirectoryProgress("b.bin", True, 2, 2, 1000, 1000, throughput).line()
    assert "left" not in done, done


def test_a_data_file_the_broker_fails_fails_the_directory_before_any_shard(
        tmp_path: Path) -> None:
    """Data files go first: one that fails for any reason but not being what its name says
    (here: an output that was not the input) fails the directory under its name, and no
    shard is sent."""
    src = hf_dir(tmp_path / "m", SHARDS)
    failed = ConversionError("OUTPUT_INVALID", "the data file's output is not the input",
                             kind="failed", code="INTERNAL")
    client = FakeClient(GOOD, errors={"config.json": failed})
    with pytest.raises(ModelDirError, match=r"config\.json: the data file's") as caught:
        convert_directory(client, src, tmp_path / "out", jobs=2)  # type: ignore[arg-type]
    assert caught.value.reason == "OUTPUT_INVALID" and caught.value.shard == "config.json"
    assert client.calls == [] and not (tmp_path / "out").exists()


def test_a_subject_as_long_as_allowed_still_names_every_file(tmp_path: Path) -> None:
    """Each shard and data file is signed as SUBJECT/NAME, clipped at the front when that is
    too long (as the CLI clips a long path): a subject of the longest length allowed fails
    nothing (a data file's was sent unclipped, and refused)."""
    src = hf_dir(tmp_path / "m", SHARDS)
    client = FakeClient(GOOD)
    convert_directory(client, src, tmp_path / "out", jobs=1,  # type: ignore[arg-type]
                      subject="/" + "x" * (MAX_SUBJECT - 1))
    assert len(client.subjects) == len(SHARDS) + 1
    assert all(len(s) == MAX_SUBJECT and s.startswith("…") for s in client.subjects)
    assert sorted(s.rpartition("/")[2] for s in client.subjects) == sorted(
        ["config.json", *SHARDS])


def test_a_data_file_swapped_for_a_link_while_it_was_sent_is_carried_as_listed(
        tmp_path: Path) -> None:
    """A link swapped in while the file is sent (here, to a file of the same size the caller
    may read and the directory's author may not) and swapped back after is not what is sent:
    the file goes by its descriptor, opened without following links when it was listed."""
    src = hf_dir(tmp_path / "m", SHARDS)
    config = src / "config.json"
    listed = config.read_bytes()
    secret = tmp_path / "secret.json"
    secret.write_bytes(b'{"k": "' + b"x" * (config.stat().st_size - 9) + b'"}')
    assert secret.stat().st_size == config.stat().st_size

    class Swapping(FakeClient):
        def _carry(self, artifact: Path, output: Path, declared: str,
                   name: str) -> ConversionResult:
            kept = tmp_path / "kept"
            config.rename(kept)
            config.symlink_to(secret)
            try:
                return super()._carry(artifact, output, declared, name)
            finally:
                config.unlink()
                kept.rename(config)

    convert_directory(Swapping(GOOD), src, tmp_path / "out", jobs=1)  # type: ignore[arg-type]
    assert (tmp_path / "out" / "config.json").read_bytes() == listed


def test_a_shard_swapped_for_a_link_while_it_is_sent_is_sent_as_listed(tmp_path: Path) -> None:
    """The same for a shard, swapped during its own conversion (a check before sending
    cannot see it): what the client reads is the file listed."""
    src = hf_dir(tmp_path / "m", SHARDS)
    victim = src / "pytorch_model-00002-of-00003.bin"
    listed = victim.read_bytes()
    (tmp_path / "elsewhere.bin").write_bytes(b"Z" * len(listed))
    sent: dict[str, bytes] = {}

    class Swapping(FakeClient):
        def convert(self, artifact: Path, output: Path, **kwargs: Any) -> ConversionResult:
            if kwargs.get("filename") == victim.name:
                victim.rename(tmp_path / "kept")
                victim.symlink_to(tmp_path / "elsewhere.bin")
                try:
                    sent[victim.name] = Path(artifact).read_bytes()
                    return super().convert(artifact, output, **kwargs)
                finally:
                    victim.unlink()
                    (tmp_path / "kept").rename(victim)
            return super().convert(artifact, output, **kwargs)

    convert_directory(Swapping(GOOD), src, tmp_path / "out", jobs=1)  # type: ignore[arg-type]
    assert sent[victim.name] == listed


def test_an_empty_data_file_is_skipped_unsent(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "m", SHARDS)
    (root / "generation_config.json").write_bytes(b"")
    client = FakeClient(GOOD)
    result = convert_directory(client, root, tmp_path / "out", jobs=1)  # type: ignore[arg-type]
    assert {s.name: s.why for s in result.skipped}["generation_config.json"] == \
        "empty: nothing to carry"
    assert [name for name, _ in client.carried] == ["config.json"]


def test_a_ctrl_c_between_the_two_renames_leaves_the_new_output_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the output cannot be swapped in one step, it takes two renames; a Ctrl-C between
    them used to leave no output at all (the new one removed by the ``finally``, the old one
    under a temporary name). It is held until both are done, then raised."""
    import signal

    from airlock_client import model_dir

    src = hf_dir(tmp_path / "m", SHARDS)
    out = tmp_path / "out"
    convert_directory(FakeClient(GOOD), src, out)  # type: ignore[arg-type]
    (out / "model-00001-of-00003.safetensors").write_bytes(b"an older output")
    monkeypatch.setattr(_part_files, "exchange", lambda a, b: False)
    real_rename = os.rename
    renames: list[str] = []

    def rename(a: Any, b: Any) -> None:
        real_rename(a, b)
        renames.append(str(b))
        if len(renames) == 1:  # the old output moved aside: the user presses Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(model_dir.os, "rename", rename)
    # Another thread, as a gRPC channel has: the kernel may hand it the process's signal.
    idle = threading.Event()
    other = threading.Thread(target=idle.wait, args=(60,), daemon=True)
    other.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            convert_directory(FakeClient(GOOD), src, out,  # type: ignore[arg-type]
                              overwrite=True)
    finally:
        idle.set()
        other.join()
    assert len(renames) == 2
    assert (out / "model-00001-of-00003.safetensors").read_bytes() != b"an older output"


def test_a_temporary_output_swapped_for_a_link_to_home_changes_nothing_there(
        tmp_path: Path) -> None:
    """Another user who may write the output's directory (a team's 2775) renames the
    temporary output away while the shards convert and links its name to the user's home:
    the home was made 0755, the shards written into it, and the output left a link to it,
    reported as converted (test_output_swap.py has the single file's case)."""
    src = hf_dir(tmp_path / "m", SHARDS)
    home = shared_tmp.private_file(tmp_path / "home" / ".bashrc").parent
    team = tmp_path / "team"
    team.mkdir()
    out = team / "out"
    swapped: list[Path] = []
    once = threading.Lock()

    def meanwhile() -> None:  # as the shards convert (side by side)
        with once:
            if not swapped:
                swapped.append(shared_tmp.swap(team, r"\.out\.\w{8}\.airlock-part", home))

    with pytest.raises(OutputSwapped):
        convert_directory(FakeClient(GOOD, meanwhile=meanwhile), src,  # type: ignore[arg-type]
                          out)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert sorted(p.name for p in home.iterdir()) == [".bashrc"]
    assert not out.is_symlink() and not out.exists()
    assert len(list(swapped[0].glob("*.safetensors"))) == 3  # written where the directory is


def test_a_header_a_broker_may_allow_is_read_whatever_its_size(tmp_path: Path) -> None:
    """A broker's header cap can be raised to the reference parser's 100 MB
    (``OutputLimits``); the client held signed shards to 16 MiB, so a raised broker's
    directories failed to assemble ("not readable safetensors")."""
    from airlock_broker.validation.limits import OutputLimits
    from airlock_client._st_header import read_header

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (17 * 1024 * 1024 - len(header))  # padded, as safetensors allows
    path = tmp_path / "big-header.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert OutputLimits(max_safetensors_header_bytes=len(header)).max_safetensors_header_bytes
    assert read_header(path).tensors == ("w",)

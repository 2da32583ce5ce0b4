"""A directory of a model swapped for a link between the check that it is no link and its
listing (review of directory conversions): what is listed, and then sent and written to the
output, must be what the bundle holds, never a directory of the caller's the link leads to.

The attacker is whoever wrote the MLflow bundle (its ``model/`` and ``components/``
directories are theirs to rename): the race is played here at the exact moment, as a loop of
``rename`` + ``symlink`` in their directory would win it now and then."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from airlock_client import ModelSourceError, _hf_dir, model_dir
from tests.unit.test_hf_model_dir import GOOD, SHARDS, FakeClient, hf_dir, mlflow_transformers


def _swap_before_listing(monkeypatch: pytest.MonkeyPatch, directory: Path,
                         target: Path, swapped_one: Path | None = None) -> list[Path]:
    """Swap ``directory`` for a link to ``target`` after it was checked to be no link, just
    before it is listed."""
    top_level = _hf_dir._top_level
    swapped: list[Path] = []

    def racing(where: Path, *args: Any, **kwargs: Any) -> Any:
        if Path(where) == directory and not swapped:
            gone = swapped_one or directory  # it, or a directory above it
            gone.rename(gone.with_name(gone.name + ".real"))
            gone.symlink_to(target)
            swapped.append(gone)
        return top_level(where, *args, **kwargs)

    monkeypatch.setattr(_hf_dir, "_top_level", racing)
    return swapped


def _callers_model(where: Path) -> Path:
    """A model of the caller's own, which the bundle's author may not read."""
    private = hf_dir(where, SHARDS)
    (private / "config.json").write_text('{"secret": "the caller\'s"}')
    private.chmod(0o700)
    return private


def test_a_weights_directory_swapped_for_a_link_before_its_listing_is_not_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    private = _callers_model(tmp_path / "private")
    root = mlflow_transformers(tmp_path / "bundle")
    swapped = _swap_before_listing(monkeypatch, root / "model", private)
    try:
        model = _hf_dir.inspect(root)
    except ModelSourceError:
        return  # refused: nothing of the caller's is read
    assert swapped
    listed = {s.source.path.resolve().parent for s in model.shards}
    listed |= {d.source.path.resolve().parent for d in model.data_files}
    assert private not in listed, "the caller's own directory was listed as the bundle's"


def test_a_component_directory_swapped_for_a_link_before_its_listing_is_not_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    private = tmp_path / "private-tokenizer"
    private.mkdir(mode=0o700)
    (private / "tokenizer.json").write_text('{"secret": "the caller\'s tokenizer"}')
    (private / "README.md").write_text("the caller's notes\n")
    root = mlflow_transformers(tmp_path / "bundle")
    (root / "model" / "config.json").unlink()
    _swap_before_listing(monkeypatch, root / "components" / "tokenizer", private)
    try:
        model = _hf_dir.inspect(root)
    except ModelSourceError:
        return
    assert not [d for d in model.data_files if d.source.path.resolve().parent == private]


def test_a_swapped_weights_directory_never_puts_the_callers_files_in_the_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end with a fake broker: the output (beside the bundle, perhaps where its author
    can read it) must not hold the caller's config."""
    private = _callers_model(tmp_path / "private")
    root = mlflow_transformers(tmp_path / "bundle")
    (root / "model" / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {t: f for f, names in SHARDS.items() for t in names}}))
    for name in SHARDS:
        (root / "model" / name).write_bytes(b"PK\x03\x04 the bundle's weights")
    for name in [n for n in os.listdir(root / "model") if n not in SHARDS]:
        if name.startswith("pytorch_model-"):
            (root / "model" / name).unlink()
    _swap_before_listing(monkeypatch, root / "model", private)
    out = tmp_path / "out"
    try:
        model_dir.convert_directory(FakeClient(GOOD), root, out, jobs=1)  # type: ignore[arg-type]
    except ModelSourceError:
        return
    assert "secret" not in (out / "config.json").read_text()


def test_a_directory_above_a_component_swapped_for_a_link_is_not_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``components`` itself swapped, for a link to a directory of the caller's that holds a
    ``tokenizer`` directory: every name below the bundle is opened without following one."""
    callers = tmp_path / "callers"
    (callers / "tokenizer").mkdir(parents=True)
    (callers / "tokenizer" / "tokenizer.json").write_text('{"secret": "the caller\'s"}')
    root = mlflow_transformers(tmp_path / "bundle")
    _swap_before_listing(monkeypatch, root / "components" / "tokenizer", callers,
                         swapped_one=root / "components")
    try:
        model = _hf_dir.inspect(root)
    except ModelSourceError:
        return
    assert not [d for d in model.data_files
                if d.source.path.resolve().parent == callers / "tokenizer"]


def test_a_directory_of_an_mlflow_model_swapped_for_a_link_before_its_listing_is_not_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same race in any MLflow model directory's walk (``_bundle.inspect``): the bundle
    packed from it would hold the caller's files, for the model's own code (allow_code) to
    read in its sandbox and write into the output."""
    from airlock_client import _bundle

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "id_ed25519").write_text("the caller's key\n")
    root = tmp_path / "m"
    root.mkdir()
    (root / "MLmodel").write_text("flavors:\n  python_function: {loader_module: m, code: code}\n")
    (root / "code").mkdir()
    (root / "code" / "m.py").write_text("x = 1\n")
    checked_entry = _bundle.checked_entry
    swapped: list[bool] = []

    def racing(entry: Any, name: str) -> Any:
        found = checked_entry(entry, name)
        if name == "code" and found is None and not swapped:  # checked: a directory
            (root / "code").rename(root / "code.real")
            (root / "code").symlink_to(private)
            swapped.append(True)
        return found

    monkeypatch.setattr(_bundle, "checked_entry", racing)
    try:
        model = _bundle.inspect(root)
    except ModelSourceError:
        return
    assert swapped
    assert "code/id_ed25519" not in [f.name for f in model.files]

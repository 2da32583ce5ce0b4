"""A model directory's listing is read only as far as its cap (``_bundle.listed``): a
directory with more entries than any model has is refused after cap + 1 of them, not read
whole first, and directories count towards the cap as files do.

On the code before, both inspections listed every entry of a directory before counting
(a 200,000-entry directory was read whole: the first two tests saw all of them pulled), and
an MLflow model of a few files and thousands of empty directories was accepted (seen)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from airlock_client import _bundle, _hf_dir
from airlock_client._errors import ModelSourceError

_MANY = 200_000


class _EndlessScan:
    """``os.scandir`` of a directory with ``_MANY`` entries, made as they are read."""

    def __init__(self, entry: os.DirEntry[str], pulled: list[int]) -> None:
        self.entry = entry
        self.pulled = pulled

    def __iter__(self) -> Iterator[os.DirEntry[str]]:
        for _ in range(_MANY):
            self.pulled[0] += 1
            yield self.entry

    def __enter__(self) -> _EndlessScan:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        pass


@pytest.fixture
def huge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[int]]:
    """A directory whose listing holds ``_MANY`` entries; how many were read."""
    directory = tmp_path / "huge"
    directory.mkdir()
    (directory / "MLmodel").write_text("flavors: {}\n")
    pulled = [0]
    real = os.scandir
    with real(directory) as scan:
        entry = next(iter(scan))

    ident = (directory.stat().st_dev, directory.stat().st_ino)

    def scandir(path: int | str | os.PathLike[str]) -> object:
        # By path, or by a descriptor of it (a listing goes through one: test_model_dir_swaps)
        if isinstance(path, int):
            opened = os.fstat(path)
            if (opened.st_dev, opened.st_ino) == ident:
                return _EndlessScan(entry, pulled)
        elif os.fspath(path) == os.fspath(directory):
            return _EndlessScan(entry, pulled)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return directory, pulled


def test_an_mlflow_model_directory_is_listed_only_up_to_its_cap(
        huge: tuple[Path, list[int]]) -> None:
    directory, pulled = huge
    with pytest.raises(ModelSourceError) as refused:
        _bundle.inspect(directory, max_files=100)
    assert refused.value.reason == "UNSAFE_MODEL_DIR"
    assert "more than 100 files and directories" in refused.value.message
    assert pulled[0] == 101


def test_a_hugging_face_directory_is_listed_only_up_to_its_cap(
        huge: tuple[Path, list[int]]) -> None:
    directory, pulled = huge
    with pytest.raises(ModelSourceError) as refused:
        _hf_dir.inspect(directory)
    assert refused.value.reason == "UNSAFE_MODEL_DIR"
    assert f"more than {_hf_dir.MAX_ENTRIES} entries" in refused.value.message
    assert pulled[0] == _hf_dir.MAX_ENTRIES + 1


def test_empty_directories_count_towards_the_cap(tmp_path: Path) -> None:
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    for i in range(12):
        (tmp_path / f"d{i}").mkdir()
    with pytest.raises(ModelSourceError) as refused:
        _bundle.inspect(tmp_path, max_files=10)
    assert "more than 10 files and directories" in refused.value.message
    assert _bundle.inspect(tmp_path, max_files=13).files  # 13 entries: within the cap


def test_telling_what_a_directory_is_reads_its_listing_only_up_to_the_cap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``airlock convert DIR`` asks what DIR is (``_hf_dir.kind``) before it inspects it: a
    directory of no model's files was listed whole there (``os.listdir``; 500,000 entries
    took 54 MB and 0.65 s, a directory of ten million some 1 GB), past the cap that
    ``inspect`` keeps (found in the tenth review)."""
    directory = tmp_path / "many"
    directory.mkdir()
    (directory / "notes.txt").write_text("x")
    pulled = [0]
    real_scandir = os.scandir
    with real_scandir(directory) as scan:
        entry = next(iter(scan))

    def listdir(path: str | os.PathLike[str]) -> list[str]:
        return [entry.name for entry in _EndlessScan(entry, pulled)]

    def scandir(path: int | str | os.PathLike[str]) -> object:
        if not isinstance(path, int) and os.fspath(path) == os.fspath(directory):
            return _EndlessScan(entry, pulled)
        return real_scandir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "scandir", scandir)
    # taken for a model directory, for inspect() to refuse as one with too many entries
    assert _hf_dir.kind(directory) == "pytorch"
    assert pulled[0] == _hf_dir.MAX_ENTRIES + 1

"""What ``airlock convert INPUT`` names: a file, an MLflow model directory, or a ``models:/``
/ ``runs:/`` URI fetched into a temporary directory that lives as long as the conversion."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from airlock_client import mlflow_source
from airlock_client._run_dir import scratch_dir
from airlock_client.provenance import clip_subject, escape_subject, path_subject


@dataclass(frozen=True)
class Source:
    path: Path  # a file or a checked model directory, on this host
    #: The converted file is named after this (suffix replaced), as for a plain file.
    output_base: Path
    is_directory: bool


def usage_problem(text: str) -> str | None:
    """Why ``text`` cannot be an input at all (a usage error), or None."""
    if mlflow_source.is_uri(text):
        return None
    path = Path(text)
    if path.is_file() or path.is_dir():
        return None
    return f"{text} is not a readable file, model directory or models:/ or runs:/ URI"


def default_subject(text: str) -> str:
    """What ``airlock convert`` signs as the input's subject unless ``--subject`` says: the URI
    as given, or the absolute path; escaped, and clipped at the front when too long (the end of
    a path says the most)."""
    if not mlflow_source.is_uri(text):
        return path_subject(text)
    return clip_subject("".join(escape_subject(ch) for ch in text))  # per character


@contextlib.contextmanager
def opened(text: str, tracking_uri: str | None) -> Iterator[Source]:
    """Yield the local source; a downloaded model is removed when the block ends."""
    if not mlflow_source.is_uri(text):
        path = Path(text)
        yield Source(path, path, path.is_dir())
        return
    with scratch_dir("airlock-mlflow") as tmp:
        model_dir = mlflow_source.resolve(text, tmp, tracking_uri=tracking_uri)
        yield Source(model_dir, Path.cwd() / mlflow_source.suggested_name(text), True)

"""Flattening a loaded checkpoint into ``{dotted.name: tensor}`` (Hugging Face convert
semantics, extended): unwrap a top-level ``state_dict``; a flat dict of tensors is used as
is; nested dicts are flattened with dotted names; everything else is skipped and listed.

Pure logic over callbacks, so it serves torch tensors and numpy arrays alike and can be
unit-tested without either library."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Checkpoints are shallow; a deeper tree is more likely a trap than a model.
MAX_DEPTH = 32


@dataclass
class Flattened:
    tensors: dict[str, Any] = field(default_factory=dict)
    #: ``name (type)`` of every value that was not a tensor and not a mapping.
    skipped: list[str] = field(default_factory=list)
    #: names that collided after flattening (``{"a.b": t}`` beside ``{"a": {"b": t}}``).
    collisions: list[str] = field(default_factory=list)


def unwrap(obj: Any) -> Any:
    """HF semantics: a dict with a ``state_dict`` mapping means that mapping is the weights."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"]
    return obj


def flatten(
    obj: Any,
    is_tensor: Callable[[Any], bool],
    expand: Callable[[Any], Mapping[str, Any] | None] = lambda _: None,
) -> Flattened:
    """Flatten ``unwrap(obj)``. ``expand`` may turn a non-mapping (e.g. an ``nn.Module``)
    into a mapping of its tensors; it returns ``None`` for anything else."""
    out = Flattened()
    _walk(unwrap(obj), "", is_tensor, expand, out, 0)
    return out


def _walk(
    node: Any,
    prefix: str,
    is_tensor: Callable[[Any], bool],
    expand: Callable[[Any], Mapping[str, Any] | None],
    out: Flattened,
    depth: int,
) -> None:
    if is_tensor(node):
        name = prefix or "tensor"
        if name in out.tensors:
            out.collisions.append(name)
        else:
            out.tensors[name] = node
        return
    mapping = node if isinstance(node, Mapping) else expand(node)
    if mapping is None or depth >= MAX_DEPTH:
        out.skipped.append(f"{prefix or '<root>'} ({type(node).__name__})")
        return
    for key, value in mapping.items():
        child = str(key) if not prefix else f"{prefix}.{key}"
        _walk(value, child, is_tensor, expand, out, depth + 1)

"""Flattening a loaded checkpoint into ``{dotted.name: tensor}`` (Hugging Face convert
semantics, extended): a training checkpoint's state dict is picked out (:func:`select`),
everything beside it is left out and counted; a flat dict of tensors is used as is; nested
dicts are flattened with dotted names; everything else is skipped and listed.

Pure logic over callbacks, so it serves torch tensors, numpy arrays and the integrity
reading's stand-ins alike, and can be unit-tested without torch. The converting reader and
the integrity reader both call :func:`flatten`: whatever it selects and names, they select
and name identically, which the broker's byte comparison relies on."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Checkpoints are shallow; a deeper tree is more likely a trap than a model.
MAX_DEPTH = 32

#: Where training loops put the model's state dict, in the order they are tried: PyTorch
#: Lightning and Hugging Face's convert (``state_dict``), the PyTorch tutorial's loop
#: (``model_state_dict``), timm / DeiT / ConvNeXt-style scripts (``model``), DeepSpeed
#: (``module``), and ``net``.
WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


#: The name a safetensors header reserves for the file's metadata: no tensor may have it.
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class LeftOut:
    """A top-level entry of a training checkpoint that is not its state dict (optimizer
    state, schedulers, loops, callbacks, hyper-parameters...): what it held, for the report."""

    key: str
    tensors: int
    nbytes: int


@dataclass
class Flattened:
    tensors: dict[str, Any] = field(default_factory=dict)
    #: ``name (type)`` of every value that was not a tensor and not a mapping.
    skipped: list[str] = field(default_factory=list)
    #: names that collided after flattening (``{"a.b": t}`` beside ``{"a": {"b": t}}``).
    collisions: list[str] = field(default_factory=list)
    #: the key whose value was taken as the state dict (:func:`select`); None: the whole tree.
    selected: str | None = None
    #: the training checkpoint's other entries whose tensors were kept (``keep_rest``).
    kept: list[str] = field(default_factory=list)
    #: the training checkpoint's other top-level entries, in their order.
    left_out: list[LeftOut] = field(default_factory=list)


def select(obj: Any, is_tensor: Callable[[Any], bool]) -> str | None:
    """The key of the model's state dict when ``obj`` is a training checkpoint, else None
    (``obj`` itself is flattened, as a plain state dict always was).

    ``obj`` is a training checkpoint when it is a mapping with one of :data:`WEIGHT_KEYS`
    whose value is a mapping; the first such key in that order wins. ``state_dict`` is taken
    whatever it holds (Hugging Face's convert does so, and nested state dicts exist). The
    other names are common words that may hold a config, so their mapping must look like a
    state dict: flat (no mapping, list or tuple among its values) and holding a tensor.
    Flat rather than all tensors: a value one reader sees as a tensor and the other cannot
    rebuild (a meta or quantized tensor) must not change what either selects."""
    if not isinstance(obj, Mapping):
        return None
    for key in WEIGHT_KEYS:
        value = obj.get(key)
        if isinstance(value, Mapping) and (key == "state_dict" or _flat_with_tensors(
                value, is_tensor)):
            return key
    return None


def _flat_with_tensors(mapping: Mapping[Any, Any], is_tensor: Callable[[Any], bool]) -> bool:
    values = list(mapping.values())
    return (any(is_tensor(v) for v in values)
            and not any(isinstance(v, (Mapping, list, tuple)) for v in values))


def flatten(
    obj: Any,
    is_tensor: Callable[[Any], bool],
    expand: Callable[[Any], Mapping[str, Any] | None] = lambda _: None,
    *,
    keep_rest: bool = False,
) -> Flattened:
    """Flatten the state dict :func:`select` picks out of ``obj`` (or ``obj`` itself).
    ``expand`` may turn a non-mapping (e.g. an ``nn.Module``) into a mapping of its
    tensors; it returns ``None`` for anything else. Every tensor has an ``nbytes``.

    ``keep_rest`` (the caller asked for the training state too): a training checkpoint's
    other entries are kept rather than left out, their tensors named under the entry's key
    (``optimizer_states.0.state.3.exp_avg``: lists are walked there, by index, since
    optimizers keep their state in them); the state dict's names stay as they are."""
    out = Flattened(selected=select(obj, is_tensor))
    if out.selected is None:
        _walk(obj, "", is_tensor, expand, out, 0)
        return out
    _walk(obj[out.selected], "", is_tensor, expand, out, 0)
    for key, value in obj.items():
        if isinstance(key, str) and key == out.selected:
            continue
        before = len(out.tensors)
        if keep_rest and isinstance(key, str):
            _walk(value, key, is_tensor, expand, out, 0, lists=True)
        if len(out.tensors) > before:
            out.kept.append(key)
        else:
            count, nbytes = _count(value, is_tensor)
            out.left_out.append(LeftOut(_key_name(key), count, nbytes))
    return out


def _walk(
    node: Any,
    prefix: str,
    is_tensor: Callable[[Any], bool],
    expand: Callable[[Any], Mapping[str, Any] | None],
    out: Flattened,
    depth: int,
    *,
    lists: bool = False,
) -> None:
    if is_tensor(node):
        name = prefix or "tensor"
        if name in out.tensors:
            out.collisions.append(name)
        else:
            out.tensors[name] = node
        return
    if lists and isinstance(node, (list, tuple)):
        mapping: Mapping[Any, Any] | None = dict(enumerate(node))
    else:
        mapping = node if isinstance(node, Mapping) else expand(node)
    if mapping is None or depth >= MAX_DEPTH:
        # Hyper-parameters beside the optimizer state (lr, betas, step) are not news.
        if not (lists and isinstance(node, (bool, int, float, str, type(None)))):
            out.skipped.append(f"{prefix or '<root>'} ({type(node).__name__})")
        return
    for key, value in mapping.items():
        child = str(key) if not prefix else f"{prefix}.{key}"
        _walk(value, child, is_tensor, expand, out, depth + 1, lists=lists)


def _key_name(key: Any) -> str:
    """A left-out entry's name for the report. Only plain keys are printed: an object key's
    ``__str__`` is the artifact's (or, in the integrity reader, refuses to name a tensor)."""
    return str(key) if isinstance(key, (str, int, float)) else f"<{type(key).__name__}>"


def _count(root: Any, is_tensor: Callable[[Any], bool]) -> tuple[int, int]:
    """Tensors (and their bytes) reachable from a left-out entry through mappings, lists and
    tuples, each object once (a pickle can share and nest containers, even in a cycle). Other
    objects are not looked into: neither reader can without running code."""
    count = nbytes = 0
    seen: set[int] = set()
    stack = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen or depth > MAX_DEPTH:
            continue
        seen.add(id(node))
        if is_tensor(node):
            count += 1
            nbytes += _nbytes(node)
        elif isinstance(node, Mapping):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)
    return count, nbytes


def _nbytes(tensor: Any) -> int:
    try:
        return int(tensor.nbytes)
    except RuntimeError:  # torch gives no nbytes for a sparse tensor: counted, not sized
        return 0


#: Left-out entries holding tensors get a sentence each, up to this many.
MAX_LEFT_OUT_SENTENCES = 6


def left_out_sentences(flat: Flattened) -> list[str]:
    """The report's account of a training checkpoint: which entry became the weights, and
    what was left out (entries with tensors one by one, with counts; the rest together)."""
    if flat.selected is None:
        return []
    if flat.kept:
        lines = [f"training checkpoint: converted its {flat.selected!r} entry (the model's "
                 "state dict, names as load_state_dict expects) and, as asked, the tensors of "
                 + ", ".join(repr(k[:40]) for k in flat.kept[:10])
                 + " under their entry's name"]
    else:
        lines = [f"training checkpoint: converted its {flat.selected!r} entry (the model's "
                 "state dict) only, names as load_state_dict expects"]
    heavy = [e for e in flat.left_out if e.tensors]
    light = [e.key for e in flat.left_out if not e.tensors]
    for e in heavy[:MAX_LEFT_OUT_SENTENCES]:
        lines.append(f"left out {e.key[:80]!r}: {e.tensors} tensor(s), {_size(e.nbytes)}")
    rest = heavy[MAX_LEFT_OUT_SENTENCES:]
    if rest:
        lines.append(f"left out {len(rest)} more {_entries(len(rest))} with tensors: "
                     f"{sum(e.tensors for e in rest)} tensor(s), "
                     f"{_size(sum(e.nbytes for e in rest))}")
    if light:
        more = ", ..." if len(light) > 10 else ""
        lines.append(f"left out {len(light)} {_entries(len(light))} without tensors: "
                     + ", ".join(k[:40] for k in light[:10]) + more)
    return lines


def _entries(n: int) -> str:
    return "entry" if n == 1 else "entries"


def _size(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} bytes"
    value, unit = nbytes / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"

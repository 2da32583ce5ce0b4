"""A Hugging Face-style PyTorch model directory, read on the host without opening a weight.

Such a directory holds ``pytorch_model.bin``, or shards (``pytorch_model-00001-of-00003.bin``,
...) named by ``pytorch_model.bin.index.json``, beside plain data files (``config.json``,
tokenizer files, a README) and often code or other pickles. A directory holding none of these
but exactly one checkpoint (``*.ckpt``, ``*.pt``, ``*.pth``: a Lightning ``model.ckpt``, a
training loop's ``best.pt``) is a model directory too, that file its weights; a trainer's own
state beside it (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ...) is never taken
for the model, and two or more candidates are refused (which one is the model is unclear).
Only its top level is read, with ``lstat`` and the checks :mod:`._bundle` applies to MLflow
directories: a symbolic link, a hard link or a special file anywhere at the top level refuses
the whole directory (the user asked us to read it; we do not guess which entry they meant).
Subdirectories are skipped. Each directory read is listed through a descriptor opened name by
name from the root without following a link (``_opened_below``), never by its path: a
directory swapped for a link after it was checked is refused, not listed.

An MLflow ``transformers`` model saved with PyTorch weights is the same thing inside its
bundle: ``MLmodel`` names the weights directory (``flavors.transformers.model_binary``,
``model``) and its components (``components/tokenizer``, ...). The weights directory is read as
above, each component directory's top level for data files only (a tokenizer's JSON and text
files, carried beside the weights as ``from_pretrained`` expects them); MLflow's own files
are not carried. A bundle of another flavor, or of TensorFlow weights, stays an MLflow model.

The index is attacker data: size-capped, parsed strictly (no duplicate keys, no ``NaN``), and
every file it names must be a plain name of a regular file at the top level. The weights are
never opened here: each is sent to the broker as it is. Nor are the data files: chosen by name
and size here, each goes through the broker (model_dir.py), whose sandbox checks it as what
its name says (strict JSON, UTF-8 text without NUL, or a SentencePiece model:
airlock_sandbox.data_files); one it finds is not is skipped with its reason.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from airlock_client import _bundle
from airlock_client._bundle import ModelFile
from airlock_client._errors import ModelSourceError
from airlock_sandbox import data_files
from airlock_sandbox.bundle import MLMODEL
from airlock_sandbox.formats import ArtifactFormat
from airlock_sandbox.strict_json import StrictJSONError, loads_strict

WEIGHTS = "pytorch_model.bin"
WEIGHTS_INDEX = "pytorch_model.bin.index.json"
SHARD_NAME = re.compile(r"pytorch_model-\d{5}-of-\d{5}\.bin")
#: Outputs, named as ``transformers.save_pretrained`` names them.
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
SAFE_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
#: A PEFT adapter (LoRA and the like) saved as a pickle, and what ``peft`` loads instead.
ADAPTER_WEIGHTS = "adapter_model.bin"
SAFE_ADAPTER_WEIGHTS = "adapter_model.safetensors"

#: What the broker signs the output's index with at the most (its index_attestation.py;
#: tests/unit/test_index_attestation.py holds the two equal), checked before any shard is
#: converted: about 25 000 tensors (Llama-70B's index is 60 KiB, BLOOM-176B's 72 shards 80).
MAX_INDEX_BYTES = 2 * 1024 * 1024
#: Per data file (what the sandbox that checks it accepts).
MAX_DATA_FILE_BYTES = data_files.MAX_DATA_BYTES
#: The weights of one directory together (a 30B-parameter model in fp16 is ~60 GB).
MAX_WEIGHT_BYTES = 64 * 1024**3
#: Top-level entries; as for an MLflow bundle. An MLflow transformers model's weights
#: directory and its components count together.
MAX_ENTRIES = _bundle.MAX_FILES
#: Names in an MLflow transformers model's ``components`` (a pipeline saves a tokenizer, a
#: feature extractor, an image processor, a processor: four at most today).
MAX_COMPONENTS = 16
#: Distinct weight files one index may name (as MAX_INDEX_BYTES: what the broker attests).
MAX_SHARDS = 1024

#: Where MLflow's transformers flavor keeps what the pipeline's components saved.
MLFLOW_COMPONENTS = "components"

#: Data files carried over, and what each must be.
JSON_FILES = frozenset({"config.json", "generation_config.json", "tokenizer.json",
                        "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "added_tokens.json", "preprocessor_config.json",
                        "processor_config.json", "chat_template.json",
                        "adapter_config.json"})
TEXT_FILES = frozenset({"vocab.txt", "merges.txt", "README.md"})
#: SentencePiece models (Llama, T5, Gemma, XLM-R), checked on the protobuf wire format
#: (airlock_sandbox.sentencepiece).
SENTENCEPIECE_FILES = frozenset({"tokenizer.model", "spiece.model", "sentencepiece.bpe.model"})
CARRIED_FILES = JSON_FILES | TEXT_FILES | SENTENCEPIECE_FILES
#: Suffixes of files that are (or may be) pickles or code, named as such in the skip list.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy",
                    ".npz")
#: A checkpoint that may be a directory's weights when it holds no ``pytorch_model.bin``.
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
#: What a trainer saves beside a model (Hugging Face's Trainer, Accelerate, Lightning loops):
#: never the model's weights.
TRAINING_STATE = re.compile(r"(optimizer|optim|optimizer_state|scheduler|lr_scheduler|scaler|"
                            r"grad_scaler|training_args|training_state|trainer_state|"
                            r"recipe_state|rng_state|random_states)([_-]\d+)?\.(pt|pth|bin)",
                            re.IGNORECASE)
#: Weights in another format (safetensors, ONNX, Keras/TF, GGUF, Flax): a directory holding
#: any is not a checkpoint's (a stray checkpoint beside them is not the model).
OTHER_WEIGHTS = (".safetensors", ".onnx", ".h5", ".keras", ".gguf", ".msgpack", ".tflite")
_CODE_SUFFIXES = (".py", ".pyc", ".so")

NOT_A_MODEL = _bundle.NOT_A_MODEL
UNSAFE = _bundle.UNSAFE
INDEX_INVALID = "MODEL_INDEX_INVALID"


@dataclass(frozen=True)
class Skipped:
    """A file of the source directory that is not in the output, and why."""

    name: str
    why: str


@dataclass(frozen=True)
class DataFile:
    """A data file to carry over, by its name and size; its sandbox checks its bytes as what
    its name says (``kind``) when the broker converts it (model_dir.py)."""

    name: str
    source: ModelFile
    #: Where it is, for a message: the directory relative to the one converted ("" at the
    #: top; ``components/tokenizer/`` in an MLflow bundle).
    where: str = ""

    @property
    def shown(self) -> str:
        return self.where + self.name

    @property
    def kind(self) -> ArtifactFormat:
        return kind_of(self.name)


@dataclass(frozen=True)
class Shard:
    """One weights file and the safetensors file it becomes."""

    source: ModelFile
    output_name: str
    #: The tensor names the source index puts in this file (None: there is no index).
    names: frozenset[str] | None


@dataclass(frozen=True)
class HfModelDir:
    root: Path
    shards: tuple[Shard, ...]
    data_files: tuple[DataFile, ...]
    skipped: tuple[Skipped, ...]

    @property
    def sharded(self) -> bool:
        return any(s.names is not None for s in self.shards)

    @property
    def weight_bytes(self) -> int:
        return sum(s.source.size for s in self.shards)


@dataclass(frozen=True)
class MlflowTransformers:
    """Where an MLflow transformers bundle keeps its Hugging Face directories."""

    weights: Path
    components: tuple[Path, ...]
    #: The bundle's own entries, which are not carried.
    skipped: tuple[Skipped, ...]


def kind(path: str | os.PathLike[str]) -> str | None:
    """``"pytorch"`` (PyTorch weights as Hugging Face lays them out, or an MLflow transformers
    model holding them), ``"mlflow"`` (any other ``MLmodel`` directory) or None, for a
    directory. Raises :class:`ModelSourceError` for an MLflow bundle that is unsafe to read."""
    base = Path(path)
    if not base.is_dir():
        return None
    if os.path.lexists(base / MLMODEL):
        return "pytorch" if mlflow_transformers(Path(os.path.realpath(base))) else "mlflow"
    if any(os.path.lexists(base / name) for name in (WEIGHTS, WEIGHTS_INDEX, ADAPTER_WEIGHTS)):
        return "pytorch"
    try:  # up to the cap, as inspect() reads it: not a listing of millions into memory
        entries = _bundle.listed(base, MAX_ENTRIES, str(base))
    except ModelSourceError:
        return None
    if len(entries) > MAX_ENTRIES:
        return "pytorch"  # for inspect() to refuse, saying why (more entries than a model's)
    return "pytorch" if checkpoints(e.name for e in entries) else None


def checkpoints(names: Iterable[str]) -> list[str]:
    """The names that may be a directory's one checkpoint (``CHECKPOINT_SUFFIXES``, not a
    trainer's own state), sorted; none when the directory holds weights in another format
    (a Trainer's ``checkpoint-500/`` with ``model.safetensors``: its ``optimizer.pt`` is not
    the model)."""
    names = list(names)
    if any(n.lower().endswith(OTHER_WEIGHTS) or n == SAFE_WEIGHTS_INDEX for n in names):
        return []
    return sorted(n for n in names
                  if n.endswith(CHECKPOINT_SUFFIXES) and not TRAINING_STATE.fullmatch(n))


def mlflow_transformers(base: Path) -> MlflowTransformers | None:
    """The layout of an MLflow transformers model with PyTorch weights in ``base``, or None
    (no ``MLmodel``, another flavor, another framework, or weights that are not PyTorch's)."""
    files, directories = _top_level(base, root=base)
    if MLMODEL not in files:
        return None
    conf = _bundle.read_mlmodel(files[MLMODEL])["flavors"].get("transformers")
    if not isinstance(conf, dict) or conf.get("framework", "pt") != "pt":
        return None
    binary = conf.get("model_binary")
    if not isinstance(binary, str):
        return None
    weights = _subdirectory(base, binary, "flavors.transformers.model_binary")
    if weights is None or not (os.path.lexists(weights / WEIGHTS)
                               or os.path.lexists(weights / WEIGHTS_INDEX)):
        return None
    names = conf.get("components")
    components_dir = _subdirectory(base, MLFLOW_COMPONENTS, MLFLOW_COMPONENTS)
    components: list[Path] = []
    if isinstance(names, list) and components_dir is not None:
        if len(names) > MAX_COMPONENTS:  # a 1 MiB MLmodel holds 520,000 of one name
            raise _bundle.refuse(f"{MLMODEL}: flavors.transformers.components names "
                                 f"{len(names)} components (limit {MAX_COMPONENTS})")
        for name in dict.fromkeys(n for n in names if isinstance(n, str)):  # each once
            found = _subdirectory(components_dir, name, "flavors.transformers.components")
            if found is not None:
                components.append(found)
    kept = {binary, MLFLOW_COMPONENTS}
    entries = sorted([*files, *(d.name for d in directories)])  # a directory's ends in "/"
    skipped = tuple(Skipped(name, "MLflow's own file or directory: the output is the Hugging "
                                  "Face model directory")
                    for name in entries if name.rstrip("/") not in kept)
    return MlflowTransformers(weights, tuple(components), skipped)


def _subdirectory(base: Path, name: str, what: str) -> Path | None:
    """``base/name`` when it is a real directory (None when absent); a name that leads out of
    ``base`` or a link refuses the bundle."""
    if "/" in name or "\\" in name or name in {"", ".", ".."}:
        raise _bundle.refuse(f"{MLMODEL}: {what} = {name[:80]!r} is not a plain directory "
                             "name inside the model directory")
    _bundle.check_name(name)
    try:
        info = os.lstat(base / name)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise _bundle.refuse(f"{base / name} is a symbolic link")
    return base / name if stat.S_ISDIR(info.st_mode) else None


def inspect(root: str | os.PathLike[str]) -> HfModelDir:
    """Read the directory's top level; raise :class:`ModelSourceError` if it is unsafe or is
    not a PyTorch model directory (or an MLflow transformers model holding one)."""
    base = Path(os.path.realpath(root))  # the root may be a link the user made; nothing below
    if not base.is_dir():
        raise ModelSourceError(NOT_A_MODEL, f"{root} is not a directory")
    layout = mlflow_transformers(base) if os.path.lexists(base / MLMODEL) else None
    if layout is None:
        return _inspect(base, base, (), [])
    return _inspect(base, layout.weights, layout.components, list(layout.skipped))


def _inspect(base: Path, weights_dir: Path, components: tuple[Path, ...],
             skipped: list[Skipped]) -> HfModelDir:
    files, found_skipped = _top_level(weights_dir, MAX_ENTRIES, root=base)
    room = MAX_ENTRIES - len(files) - len(found_skipped)
    where = "" if weights_dir == base else f"{weights_dir.relative_to(base)}/"
    skipped += [Skipped(where + s.name, s.why) for s in found_skipped]
    if WEIGHTS in files and WEIGHTS_INDEX in files:
        raise ModelSourceError(INDEX_INVALID, f"{weights_dir} holds both {WEIGHTS} and "
                               f"{WEIGHTS_INDEX}: which one is the model is unclear")
    if ADAPTER_WEIGHTS in files and (WEIGHTS in files or WEIGHTS_INDEX in files):
        raise ModelSourceError(INDEX_INVALID, f"{weights_dir} holds a model's weights and a "
                               f"PEFT adapter ({ADAPTER_WEIGHTS}); convert the adapter on its "
                               f"own: airlock convert {weights_dir / ADAPTER_WEIGHTS} -o "
                               f"{weights_dir / SAFE_ADAPTER_WEIGHTS}")
    if WEIGHTS_INDEX in files:
        entry = files[WEIGHTS_INDEX]
        if entry.size > MAX_INDEX_BYTES:
            raise ModelSourceError(INDEX_INVALID, f"{WEIGHTS_INDEX} is {entry.size} bytes "
                                   f"(limit {MAX_INDEX_BYTES})")
        by_file = parse_index(_bundle.read_exact(entry, MAX_INDEX_BYTES), set(files))
        count = len(by_file)
        shards = tuple(Shard(files[name], f"model-{i:05d}-of-{count:05d}.safetensors",
                             frozenset(by_file[name]))
                       for i, name in enumerate(sorted(by_file), start=1))
    elif WEIGHTS in files:
        shards = (Shard(files[WEIGHTS], SAFE_WEIGHTS, None),)
    elif ADAPTER_WEIGHTS in files:  # a PEFT adapter directory
        shards = (Shard(files[ADAPTER_WEIGHTS], SAFE_ADAPTER_WEIGHTS, None),)
    elif len(candidates := checkpoints(files)) == 1:  # a Lightning model.ckpt, a loop's best.pt
        shards = (Shard(files[candidates[0]], SAFE_WEIGHTS, None),)
    elif candidates:
        shown = ", ".join(candidates[:4]) + (", ..." if len(candidates) > 4 else "")
        raise ModelSourceError(NOT_A_MODEL, f"{weights_dir} holds {len(candidates)} checkpoints "
                               f"({shown}) and no {WEIGHTS}: which one is the model is "
                               f"unclear; convert one on its own: airlock convert "
                               f"{weights_dir / candidates[0]}")
    else:
        raise ModelSourceError(NOT_A_MODEL, f"{weights_dir} holds none of {WEIGHTS}, "
                               f"{WEIGHTS_INDEX}, {ADAPTER_WEIGHTS} or one checkpoint "
                               f"({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)})")
    total = sum(s.source.size for s in shards)
    if total > MAX_WEIGHT_BYTES:
        raise ModelSourceError(UNSAFE, f"the weights are {total} bytes in all "
                               f"(limit {MAX_WEIGHT_BYTES})")
    used = {s.source.name for s in shards} | {WEIGHTS_INDEX}
    data: dict[str, DataFile] = {}
    sources = [(where, {n: f for n, f in files.items() if n not in used})]
    for component in components:
        component_files, component_skipped = _top_level(component, room, root=base)
        room -= len(component_files) + len(component_skipped)
        at = f"{component.relative_to(base)}/"
        skipped += [Skipped(at + s.name, s.why) for s in component_skipped]
        sources.append((at, component_files))
    for at, found in sources:
        for name in sorted(found):
            why = data_file_problem(name, found[name])
            if why is None and name in data:
                why = f"{at}{name} has the same name as a file carried already"
            if why is None:
                data[name] = DataFile(name, found[name], at)
                continue
            skipped.append(Skipped(at + name, why))
    return HfModelDir(base, shards, tuple(data[n] for n in sorted(data)),
                      tuple(sorted(skipped, key=lambda s: s.name)))


def _top_level(base: Path, room: int = MAX_ENTRIES, *,
               root: Path) -> tuple[dict[str, ModelFile], list[Skipped]]:
    """``base``'s entries (``root`` or a directory below it): its files, and what is skipped;
    more than ``room`` of them (what is left of ``MAX_ENTRIES`` for the whole model) refuses
    the model. Listed through a descriptor (``_opened_below``): a directory swapped for a
    link since it was looked at is refused, never listed."""
    files: dict[str, ModelFile] = {}
    skipped: list[Skipped] = []
    fd = _opened_below(root, base)
    try:
        entries = _bundle.listed(fd, room, str(base))
        if len(entries) > room:
            raise _bundle.refuse(f"{base} has more than {room} entries (the model's files, "
                                 f"with its components', are limited to {MAX_ENTRIES} entries)")
        for entry in entries:  # stat-ed through ``fd`` (fstatat), which must stay open
            found = _bundle.checked_entry(entry, entry.name)
            if found is None:
                skipped.append(Skipped(f"{entry.name}/",
                                       "a directory: only the top level is read"))
            else:  # opened later by this name, and proved to be this file (open_checked)
                files[entry.name] = replace(found, path=base / entry.name)
    finally:
        os.close(fd)
    return files, skipped


def _opened_below(root: Path, directory: Path) -> int:
    """A descriptor of ``directory``: ``root`` (a real path), then each plain name below it,
    each opened without following a link from the one before. A directory is checked to be
    no link (``_subdirectory``) and listed later: in between, whoever wrote the bundle can
    swap it (or a directory above it) for a link to a directory of the caller's, whose files
    would be listed, then sent and written to the output as the model's. Such a swap now
    fails the open (``UNSAFE_MODEL_DIR``)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(root, flags)
    except OSError as exc:
        raise _bundle.refuse(f"cannot read {root}: {exc.strerror}") from None
    try:
        for name in directory.relative_to(root).parts:
            inner = os.open(name, flags, dir_fd=fd)
            os.close(fd)
            fd = inner
    except OSError as exc:
        os.close(fd)
        raise _bundle.refuse(f"{directory} changed while being read (a link put in place of "
                             f"a directory?): {exc.strerror}") from None
    return fd


def parse_index(raw: bytes, present: set[str]) -> dict[str, set[str]]:
    """The tensor names per weights file, from ``pytorch_model.bin.index.json``'s bytes.

    Each file named must be a plain name (no ``/``, ``..`` or absolute path; reason
    ``UNSAFE_MODEL_DIR``) of a regular file in ``present`` (reason ``MODEL_INDEX_INVALID``)."""
    try:
        doc = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, StrictJSONError) as exc:
        raise ModelSourceError(INDEX_INVALID, f"{WEIGHTS_INDEX} is not strict JSON: "
                               f"{str(exc)[:200]}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelSourceError(INDEX_INVALID, f"{WEIGHTS_INDEX} has no 'weight_map' object "
                               "of tensor names to file names")
    if not isinstance(doc.get("metadata", {}), dict):
        raise ModelSourceError(INDEX_INVALID, f"{WEIGHTS_INDEX}: 'metadata' is not an object")
    by_file: dict[str, set[str]] = {}
    for tensor, filename in weight_map.items():
        if not tensor or not isinstance(filename, str):
            raise ModelSourceError(INDEX_INVALID, f"{WEIGHTS_INDEX}: the entry for "
                                   f"{tensor[:80]!r} is not a tensor name and a file name")
        check_plain_name(filename)
        if filename not in present:
            raise ModelSourceError(INDEX_INVALID, f"{WEIGHTS_INDEX} names {filename[:80]!r}, "
                                   "which is not a regular file in the directory")
        by_file.setdefault(filename, set()).add(tensor)
        if len(by_file) > MAX_SHARDS:
            raise ModelSourceError(INDEX_INVALID, f"{WEIGHTS_INDEX} names more than "
                                   f"{MAX_SHARDS} files")
    return by_file


def check_plain_name(filename: str) -> None:
    """A file name at the top level of the directory, nothing that could lead out of it."""
    if "/" in filename or "\\" in filename or filename in {"", ".", ".."}:
        raise _bundle.refuse(f"{WEIGHTS_INDEX} names {filename[:80]!r}, which is not a plain "
                             "file name inside the directory")
    _bundle.check_name(filename)


def data_file_problem(name: str, entry: ModelFile) -> str | None:
    """Why ``name`` is not carried over, judging by its name and size (None: send it, for its
    sandbox to check its bytes)."""
    lower = name.lower()
    if lower.endswith(_CODE_SUFFIXES):
        return "code (trust_remote_code): never carried over"
    if SHARD_NAME.fullmatch(name):
        return f"a weights shard {WEIGHTS_INDEX} does not name"
    if lower.endswith(_PICKLE_SUFFIXES):
        return "a pickle or other serialized object: never carried over"
    if name not in JSON_FILES and name not in TEXT_FILES and name not in SENTENCEPIECE_FILES:
        return "not a known data file: not carried over"
    if entry.size == 0:
        return "empty: nothing to carry"
    if entry.size > MAX_DATA_FILE_BYTES:
        return f"{entry.size} bytes, over the {MAX_DATA_FILE_BYTES}-byte cap for data files"
    return None


def kind_of(name: str) -> ArtifactFormat:
    """What a carried file named ``name`` must be: the format it is declared as."""
    if name in SENTENCEPIECE_FILES:
        return ArtifactFormat.DATA_SENTENCEPIECE
    return ArtifactFormat.DATA_JSON if name in JSON_FILES else ArtifactFormat.DATA_TEXT


def tensor_names_problem(expected: frozenset[str], converted: Mapping[str, object],
                         deduplicated: Mapping[str, str]) -> str | None:
    """How a shard's converted tensors (kept and de-duplicated names) disagree with what the
    index says the shard holds, or None."""
    got = set(converted) | set(deduplicated)
    missing = sorted(expected - got)
    extra = sorted(got - expected)
    if not missing and not extra:
        return None
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} the index names ({_some(missing)})")
    if extra:
        parts.append(f"{len(extra)} the index does not name ({_some(extra)})")
    return "its tensors disagree with the index: " + "; ".join(parts)


def _some(names: list[str], shown: int = 5) -> str:
    head = ", ".join(repr(n[:80]) for n in names[:shown])
    return head + (f" and {len(names) - shown} more" if len(names) > shown else "")


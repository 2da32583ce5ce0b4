"""Integrity extraction (DESIGN §5, JobMode.EXTRACT_WEIGHTS): the tensors of a PyTorch zip or
legacy checkpoint, read without executing anything the artifact names.

A conversion loads the checkpoint with torch, and a checkpoint that holds more than tensors
runs its own code in the converter's process, which can then write any weights it likes and
pass the converter's own reload check ("Silent Sabotage"). This module is the second, fresh
reading that the broker compares with the conversion byte for byte:

* the zip is opened with :mod:`zipfile`; ``<prefix>/data.pkl`` is parsed by
  :class:`RestrictedUnpickler`, whose ``find_class`` hands out only our own stand-ins for the
  tensor-rebuild globals (``RestrictedUnpickler.allowed``: ``torch._utils._rebuild_tensor*``
  and ``_rebuild_parameter*``, ``torch._tensor._rebuild_from_type_v2`` for plain tensors and
  parameters, ``collections.OrderedDict``, the ``torch.*Storage`` types, dtypes, ``torch.Size``,
  ``torch.device``, ``torch.serialization.get_layout``), all immune to BUILD. Every other
  global (``builtins.exec``, ``os.system``, a user class, ``torch.nn.Linear``) becomes a
  :class:`Poison` class: calling, instantiating or building it records an inert object and
  runs nothing;
* storages are ``<prefix>/data/<key>`` records read as raw bytes (stored records through one
  read-only mmap, deflated ones inflated under a ratio cap and a total cap); a tensor is a
  bounds-checked strided view of its storage, kept as raw little-endian bytes of its width
  (bf16, fp8 and friends need no numpy dtype);
* the tree gets exactly the converter's semantics: :func:`tensor_tree.flatten` itself (pure,
  torch-free) for picking a training checkpoint's state dict (``tensor_tree.select``), dotted
  names and skipping; the converter's storable-dtype filter and same-view dedupe from
  ``st_torch`` are mirrored here without torch (``st_torch`` needs torch), with the same
  ``__metadata__``;
* the safetensors file is written by hand: tensors ordered as ``safetensors`` 0.8 orders them
  (by dtype, widest first, then name), so that for the same checkpoint the data section is
  byte-identical to the converter's; the header is the broker's canonical one (compact JSON,
  keys sorted, padded with spaces to 8 bytes), so that the file the broker hashed as it was
  written is the canonical file it answers with (JobSpec.output_in_place).

A :class:`Poison` is dropped like any other non-tensor value, as the converter drops it. Where
the converter could draw tensors from code (the whole checkpoint is a pickled object, or a
value the flattening visits is an unknown object that holds tensors or storages, or names a
tensor with an unknown key) the weights cannot be extracted without executing the artifact:
``UNSUPPORTED_MODEL``, and the result stays *format-safe only*. A structurally broken or
hostile archive (bounds, sizes, bombs, missing records) is ``CONVERSION_FAILED``.

torch is never imported here: this reading must not depend on the loader a payload could
patch, and the light profile can run it.

A legacy checkpoint (torch < 1.6's layout: pickles in a row, then the raw storages) is read
by ``extract_legacy`` with the same unpickler and stand-ins; only where its storages' bytes are
differs.

This module is the job (read, flatten, write); the parts live beside it: ``extract_archive``
(the zip, opened once and checked), ``extract_legacy`` (the legacy layout),
``extract_unpickler`` (the pickles read with stand-ins and poison), ``extract_stand_ins``
(the inert dtypes, storages and tensors it builds), ``extract_safetensors`` (the
converter's dedupe mirrored, and the hand-written file) and ``extract_errors``
(``Unextractable`` and ``Refused``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from airlock_sandbox.contract import OutputFormat, WorkerExit
from airlock_sandbox.formats import ArtifactFormat

from . import output
from .errors import WorkerError, describe
from .extract_archive import Archive
from .extract_errors import NOT_EXTRACTABLE, Refused, Unextractable
from .extract_legacy import LegacyFile
from .extract_safetensors import prepare, write_safetensors
from .extract_stand_ins import Tensor, is_tensor
from .extract_unpickler import Poison, RestrictedUnpickler, holds_data
from .job import Job

#: The checkpoint layouts read here, and the loader name each reports.
LOADERS = {
    ArtifactFormat.PYTORCH_ZIP: "restricted-zip-reader",
    ArtifactFormat.PYTORCH_LEGACY: "restricted-legacy-reader",
}
CONVERTER = "airlock_worker.extract (hand-written safetensors)"

#: data.pkl of a checkpoint is ~100 bytes per tensor; 256 MiB is millions of tensors.
MAX_PICKLE_BYTES = 256 * 1024**2


def extract_weights(job: Job) -> None:
    """Read the checkpoint's tensors without running it; write them as the converter would."""
    loader = LOADERS.get(job.fmt)
    if loader is None:
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL,
                          "integrity extraction supports PyTorch zip and legacy checkpoints "
                          f"only (this artifact is {job.fmt.value})")
    job.refuse_target(OutputFormat.ONNX, "integrity extraction writes safetensors only")
    job.loaded_safely(loader)
    job.report.converter = CONVERTER
    if job.fmt is ArtifactFormat.PYTORCH_LEGACY:
        legacy = LegacyFile(job.artifact_path())
        try:
            _extract(job, legacy.read)
        finally:  # every view of the mmap died with _extract's frame
            legacy.close()
        return
    archive = Archive(job.artifact_path())
    try:
        _extract(job, lambda: _unpickle(archive))
    finally:
        archive.close()


def _extract(job: Job, read: Callable[[], tuple[Any, list[str]]]) -> None:
    started = time.perf_counter()
    obj, poisoned = read()
    if poisoned:  # the broker then converts too, and compares (it never answers alone)
        job.report.refused_globals = poisoned[:10]
        job.report.warn(f"{len(poisoned)} global(s) named by the pickle were not called: "
                        + ", ".join(poisoned[:10]))
    tensors = _flatten(job, obj)
    job.report.timings["extract_read_s"] = round(time.perf_counter() - started, 4)
    ready, metadata = prepare(tensors, job.report.warn)
    if len(metadata) > 1:
        job.report.warn(f"{len(metadata) - 1} tied tensor name(s) deduplicated "
                        "(removed -> kept in __metadata__)")
    started = time.perf_counter()
    spec = job.spec
    if spec.output_in_place and spec.data_digest_only:  # a hole cannot be appended
        raise WorkerError(WorkerExit.CONVERSION_FAILED,
                          "an output written in place cannot leave its data a hole")
    place = output.in_place if spec.output_in_place else output.staged
    with place(job.out_dir, OutputFormat.SAFETENSORS, spec.max_output_bytes) as path:
        job.report.tensor_count, job.report.data_sha256 = write_safetensors(
            ready, metadata, path, spec.max_output_bytes,
            digest_only=spec.data_digest_only, in_place=spec.output_in_place)
    job.report.output_format = OutputFormat.SAFETENSORS.value
    job.report.timings["extract_write_s"] = round(time.perf_counter() - started, 4)


def _unpickle(archive: Archive) -> tuple[Any, list[str]]:
    byteorder = archive.record("byteorder")
    if byteorder is not None:
        mark = bytes(archive.record_bytes(byteorder, limit=16))
        if mark == b"big":
            raise Unextractable("integrity extraction supports little-endian checkpoints only")
        if mark != b"little":
            raise Refused("unknown byteorder record")
    pkl = archive.record("data.pkl")
    if pkl is None:
        raise Refused(f"no {archive.prefix}data.pkl in the archive")
    data = archive.record_bytes(pkl, limit=MAX_PICKLE_BYTES)
    unpickler = RestrictedUnpickler(data, archive)
    try:
        obj = unpickler.load()
    except WorkerError:
        raise
    except RecursionError:
        raise Refused("data.pkl nests too deeply") from None
    except Exception as exc:  # a malformed pickle: UnpicklingError, EOFError, TypeError...
        raise Refused(f"data.pkl could not be read: {describe(exc)}") from None
    return obj, unpickler.poisoned


def _flatten(job: Job, obj: Any) -> dict[str, Tensor]:
    """:func:`tensor_tree.flatten` with the converter's semantics; an unknown object that the
    flattening visits and that holds tensor data is where only code could say what it is."""
    def expand(node: Any) -> None:
        if isinstance(node, Poison) and holds_data(node):
            raise Unextractable(f"{NOT_EXTRACTABLE}: its tensors sit inside a "
                                f"{node.global_name} object")
        return None

    flat = job.flatten(obj, is_tensor, expand)
    if not flat.tensors:
        if isinstance(obj, Poison):
            raise Unextractable(f"{NOT_EXTRACTABLE}: the checkpoint is a pickled "
                                f"{obj.global_name} object")
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL,
                          f"the checkpoint holds no tensors (a {type(obj).__name__})")
    job.note_flattened(flat)
    return flat.tensors


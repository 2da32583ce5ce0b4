"""The in-container worker: detect an artifact by magic bytes, load it (safe loaders first),
convert it to ONNX or safetensors, self-check, and write one output file plus a report.

This is the only code in Airlock that opens untrusted bytes, and it runs only inside the
sandbox container (``python3 -m airlock_worker``). It imports nothing from the host side; the
host<->sandbox contract lives in :mod:`airlock_sandbox.contract`.

Modules, one job each:

* ``__main__``: arguments, warm-up imports, waiting for the job spec, exit codes.
* ``profiles``: which libraries each container profile imports before a job arrives.
* ``priming``: one throw-away conversion of a model built from code during warm-up, so that
  the job does not pay the libraries' first-call costs.
* ``job``: the per-job context (spec, paths, policy gate, report) and the dispatch table.
* ``detect``: magic-byte detection plus zip refinement.
* ``errors``: the one exception type, carrying a :class:`WorkerExit`.
* ``spec_types``: dtype/shape mapping from the request's tensor specs.
* ``tensor_tree``: flattening checkpoints into dotted-name tensor dicts, a training
  checkpoint's state dict picked out by one rule (pure logic, shared by both readers).
* ``st_torch`` / ``st_numpy``: writing and byte-verifying safetensors from torch / numpy;
  ``st_verify``: checking a written file in place (mmap) against what was meant.
* ``sklearn_convert``, ``torch_convert``, ``numpy_convert``, ``passthrough``: the loaders
  and converters per detected format.
* ``skops_import``: ``import skops.io`` without the torch import sklearn's estimator walk
  would drag in (MLflow 3 saves sklearn models as skops).
* ``onnx_out``: finishing an ONNX model (opsets, no external data, checker, size cap).
* ``parity``: ONNX Runtime against the original model on seeded inputs.
* ``output`` / ``report``: the atomic output file and the informational report.
"""

"""A model directory's data file (``config.json``, a tokenizer, a README): checked as what it
was declared to be (airlock_sandbox.data_files) and written unchanged. Nothing in it runs; the
broker accepts the output only if it is the input, byte for byte."""

from __future__ import annotations

from airlock_sandbox.contract import OutputFormat, WorkerExit
from airlock_sandbox.data_files import MAX_DATA_BYTES, problem

from . import output
from .errors import WorkerError
from .job import Job


def carry(job: Job) -> None:
    with job.open_artifact() as f:
        raw = f.read(MAX_DATA_BYTES + 1)
    job.loaded_safely("airlock_sandbox.data_files")
    why = problem(job.fmt, raw)
    if why is not None:
        raise WorkerError(WorkerExit.FORMAT_MISMATCH, f"declared {job.fmt.value}, but {why}")
    job.report.converter = "unchanged"
    job.report.output_format = OutputFormat.DATA.value
    output.write_bytes(job.out_dir, OutputFormat.DATA, raw, job.spec.max_output_bytes)

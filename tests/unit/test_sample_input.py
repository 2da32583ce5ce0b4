"""The caller's parity sample (``--sample-input``): bytes checked for size and magic by the
client and the broker, handed to the sandbox as a file, parsed only by the worker with
``numpy.load(allow_pickle=False)`` and fitted strictly to the model's input; parity then runs
on it alone and says so (``parity_inputs``).

Models are fitted here from code; nothing is unpickled."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.api.wire import job_request
from airlock_broker.config import BrokerConfig
from airlock_broker.errors import STATUS_TABLE, AirlockError, Reason
from airlock_broker.sandboxes.pools import PoolSettings
from airlock_client import Client, ConversionError
from airlock_client._client import read_sample
from airlock_client.cli import build_parser
from airlock_sandbox.contract import (
    MAX_SAMPLE_BYTES,
    OUTPUT_NAMES,
    SAMPLE_NAME,
    JobSpec,
    OutputFormat,
    SampleTooLarge,
    WorkerExit,
    check_sample,
)
from airlock_sandbox.formats import ArtifactFormat
from airlock_worker import job as worker_job
from airlock_worker import parity, sample_input, sklearn_convert
from airlock_worker.errors import WorkerError
from airlock_worker.job import Job
from tests.unit.fakes import Behaviour, FakeSandbox, running_broker
from tests.unit.test_broker import PICKLE

SPEC = [{"name": "X", "dtype": "float32", "shape": [-1, 4]}]
BrokerFactory = Callable[[Behaviour], tuple[str, FakeSandbox]]


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[BrokerFactory]:
    with contextlib.ExitStack() as stack:
        def _make(behaviour: Behaviour) -> tuple[str, FakeSandbox]:
            config = BrokerConfig(listen="127.0.0.1:0", state_root=tmp_path / "spool",
                                  pools=PoolSettings(min_warm=0), selftest_on_start=False,
                                  provenance_key=tmp_path / "provenance-key.pem")
            backend = FakeSandbox(config.spool_root, behaviour)
            broker = stack.enter_context(running_broker(config, backend))
            return f"127.0.0.1:{broker.port}", backend

        yield _make


def npy(array: Any, *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _written(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / SAMPLE_NAME
    path.write_bytes(data)
    return str(path)


def _refusal(call: Any) -> str:
    with pytest.raises(WorkerError) as err:
        call()
    assert err.value.exit is WorkerExit.SAMPLE_INVALID
    return err.value.message


# -- the shared check: size and magic -----------------------------------------------------


def test_the_size_cap_is_a_sentence_with_both_numbers() -> None:
    with pytest.raises(SampleTooLarge) as err:
        check_sample(b"\x93NUMPY" + b"\0" * MAX_SAMPLE_BYTES)
    assert f"{MAX_SAMPLE_BYTES + 6} bytes" in str(err.value)
    assert f"at most {MAX_SAMPLE_BYTES} bytes (1024 KiB)" in str(err.value)
    assert check_sample(npy(np.zeros((3, 4)))).startswith(b"\x93NUMPY")


@pytest.mark.parametrize("data", [pickle.dumps(np.zeros(3)), b"PK\x03\x04zip", b"1,2,3\n"])
def test_anything_but_a_npy_file_is_refused_by_its_magic(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"not a \.npy file"):
        check_sample(data)


# -- the worker: parsing ----------------------------------------------------------------------


def test_the_worker_reads_a_numeric_array(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.testing.assert_array_equal(sample_input.read(_written(tmp_path, npy(x))), x)


def test_an_object_array_is_refused_before_anything_unpickles_it(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> Any:
            return (print, ("pwned",))

    data = npy(np.array([Boom(), 1], dtype=object), allow_pickle=True)
    message = _refusal(lambda: sample_input.read(_written(tmp_path, data)))
    assert "Python objects" in message


def test_a_header_that_promises_more_than_the_file_holds_is_refused(tmp_path: Path) -> None:
    data = npy(np.zeros((2, 4), np.float32))
    lying = data.replace(b"(2, 4)", b"(9, 4)", 1)  # the header keeps its length
    message = _refusal(lambda: sample_input.read(_written(tmp_path, lying)))
    assert "promises" in message and "holds 32" in message


@pytest.mark.parametrize(("array", "said"), [
    (np.array(["a", "b"]), "<U1 values"),
    (np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]), "must hold numbers"),
    (np.zeros((0, 4)), "holds no rows"),
    (np.zeros(2, dtype=np.complex64), "complex64 values"),
])
def test_anything_but_rows_of_numbers_is_refused(tmp_path: Path, array: Any, said: str) -> None:
    assert said in _refusal(lambda: sample_input.read(_written(tmp_path, npy(array))))


def test_a_missing_file_is_a_bad_job_spec(tmp_path: Path) -> None:
    with pytest.raises(WorkerError) as err:
        sample_input.read(str(tmp_path / "none.npy"))
    assert err.value.exit is WorkerExit.BAD_JOB_SPEC


# -- the worker: fitting the model's input ----------------------------------------------------


def test_a_sample_is_cast_to_the_input_dtype() -> None:
    feeds = sample_input.feeds(np.arange(8).reshape(2, 4), SPEC, print)
    assert feeds["X"].dtype == np.float32 and feeds["X"].shape == (2, 4)


@pytest.mark.parametrize(("array", "inputs", "said"), [
    (np.zeros((5, 3)), SPEC, "has 3 features per row; the model takes 4"),
    (np.zeros(4), SPEC, "shape [4] (1 dimensions); the model's input 'X' has shape [N, 4]"),
    (np.zeros((5, 4)), [{"name": "X", "dtype": "int64", "shape": [-1, 4]}],
     "holds float64 values; the model's input 'X' takes int64"),
    (np.zeros((5, 4)), [*SPEC, {"name": "Y", "dtype": "float32", "shape": [-1, 1]}],
     "has 2 inputs ('X', 'Y')"),
    (np.full((1, 4), 1e300), SPEC, "beyond float32's range"),
    (np.zeros((2, 3, 4)), [{"name": "img", "dtype": "float32", "shape": [-1, 3, 5]}],
     "has 4 in dimension 2; the model takes 5"),
])
def test_a_sample_that_does_not_fit_says_what_it_holds_and_what_the_model_takes(
        array: Any, inputs: list[dict[str, Any]], said: str) -> None:
    assert said in _refusal(lambda: sample_input.feeds(array, inputs, print))


def test_rows_beyond_the_cap_are_left_out_with_a_warning() -> None:
    warned: list[str] = []
    rows = sample_input.MAX_SAMPLE_ROWS + 10
    feeds = sample_input.feeds(np.zeros((rows, 4)), SPEC, warned.append)
    assert len(feeds["X"]) == sample_input.MAX_SAMPLE_ROWS
    assert warned == [f"parity used the sample's first 4096 of {rows} rows"]


def test_the_job_and_parity_name_the_sample_alike() -> None:
    assert worker_job.SAMPLE_SOURCE == parity.SAMPLE


def _categorical_pipeline() -> tuple[Any, np.ndarray]:
    """Categories behind a step that says nothing of its inputs' range: parity's generated
    rows are unknown categories, which the converted graph cannot even run on."""
    from sklearn.feature_selection import VarianceThreshold
    from sklearn.naive_bayes import CategoricalNB
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(80, 4)).astype(np.float64)
    y = (x[:, 0] + x[:, 1] > 3).astype(np.int64)
    return make_pipeline(VarianceThreshold(), CategoricalNB()).fit(x, y), x


def _convert(model: Any, tmp_path: Path, sample: np.ndarray | None) -> Job:
    tmp_path.mkdir(exist_ok=True)
    job = Job(spec=JobSpec(job_id="t", sample_input=sample is not None), artifact="",
              out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE)
    job.sample = sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sklearn_convert.convert_object(job, model)
    return job


def test_a_sample_makes_parity_pass_where_generated_rows_cannot_run(tmp_path: Path) -> None:
    model, x = _categorical_pipeline()
    with pytest.raises(WorkerError) as err:
        _convert(model, tmp_path / "generated", None)
    assert err.value.exit is WorkerExit.CONVERSION_FAILED
    job = _convert(model, tmp_path, x[:20])
    assert job.report.parity_inputs == "sample"
    assert {e.output_name for e in job.report.parity} == {"label", "probabilities"}
    assert all(e.passed and e.samples == 20 for e in job.report.parity)
    assert (tmp_path / OUTPUT_NAMES[OutputFormat.ONNX]).exists()


def test_parity_says_which_rows_it_ran_on(tmp_path: Path) -> None:
    from sklearn.linear_model import LinearRegression

    x = np.random.default_rng(1).standard_normal((30, 4))
    model = LinearRegression().fit(x, x @ np.arange(4.0))
    assert _convert(model, tmp_path / "a", None).report.parity_inputs == "generated"
    job = Job(spec=JobSpec(job_id="t"), artifact="", out_dir=str(tmp_path),
              fmt=ArtifactFormat.PICKLE, parity_example={None: x[:3]})
    sklearn_convert.convert_object(job, model)
    assert job.report.parity_inputs == "input_example+generated"


# -- the broker: the cap, the magic, the file in the job directory ----------------------------


def test_the_broker_caps_the_sample_with_its_own_reason() -> None:
    with pytest.raises(AirlockError) as err:
        job_request(pb.ConvertMetadata(sample_input=b"\x93NUMPY" + b"\0" * MAX_SAMPLE_BYTES),
                    "j", default_deadline=60, max_deadline=60)
    assert err.value.reason is Reason.SAMPLE_TOO_LARGE
    assert "at most 1048576 bytes" in err.value.message
    with pytest.raises(AirlockError) as err:
        job_request(pb.ConvertMetadata(sample_input=b"PK\x03\x04"), "j", default_deadline=60,
                    max_deadline=60)
    assert err.value.reason is Reason.SAMPLE_INVALID
    for reason in (Reason.SAMPLE_TOO_LARGE, Reason.SAMPLE_INVALID):
        assert STATUS_TABLE[reason][0] is grpc.StatusCode.INVALID_ARGUMENT
    ok = job_request(pb.ConvertMetadata(sample_input=npy(np.zeros((2, 4)))), "j",
                     default_deadline=60, max_deadline=60)
    assert ok.sample_input == npy(np.zeros((2, 4))) and ok.sample_record() is not None
    assert job_request(pb.ConvertMetadata(), "j", default_deadline=60,
                       max_deadline=60).sample_record() is None


def test_a_sample_over_the_cap_sent_past_the_client_is_refused_by_the_broker(
        make_broker: BrokerFactory) -> None:
    address, backend = make_broker(lambda spec, data, out: 0)
    meta = pb.ConvertMetadata(size_bytes=len(PICKLE), target=pb.TARGET_FORMAT_ONNX,
                              sample_input=b"\x93NUMPY" + b"\0" * MAX_SAMPLE_BYTES)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ConversionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Convert(iter([pb.ConvertRequest(metadata=meta)]), timeout=30))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1048576 bytes" in (err.value.details() or "")
    assert backend.specs == []  # no sandbox ran


def _uses_the_sample(spec: JobSpec, data: bytes, out: Path) -> int:
    """Plays a worker that finds the sample and says parity ran on it."""
    from tests.unit.test_broker import write_safetensors

    del data
    found = (out.parent / "in" / SAMPLE_NAME).read_bytes()
    assert spec.sample_input and found == npy(np.ones((2, 4)))
    write_safetensors(spec, b"", out)
    report = json.loads((out / "report.json").read_text())
    report["parity_inputs"] = "sample"
    (out / "report.json").write_text(json.dumps(report))
    return 0


def test_the_sample_reaches_the_sandbox_as_a_file_and_the_report_says_it_was_used(
        make_broker: BrokerFactory, tmp_path: Path) -> None:
    address, backend = make_broker(_uses_the_sample)
    artifact = tmp_path / "t.npy"
    artifact.write_bytes(npy(np.ones((2, 4), np.float32)))
    sample = tmp_path / "rows.npy"
    sample.write_bytes(npy(np.ones((2, 4))))
    with Client(address, timeout=30) as client:
        result = client.convert(artifact, tmp_path / "out.safetensors", sample_input=sample)
    assert result.report.parity_inputs == "sample"
    assert [s.sample_input for s in backend.specs] == [True]


def test_a_worker_refusing_the_sample_is_sample_invalid_with_its_sentence(
        make_broker: BrokerFactory, tmp_path: Path) -> None:
    def refuse(spec: JobSpec, data: bytes, out: Path) -> int:
        (out / "report.json").write_text(json.dumps({"error": {
            "exit": "SAMPLE_INVALID", "message": "SAMPLE_INVALID: the parity sample (shape "
            "[2, 3]) has 3 features per row; the model takes 4"}}))
        return WorkerExit.SAMPLE_INVALID

    address, _ = make_broker(refuse)
    artifact = tmp_path / "t.npy"
    artifact.write_bytes(npy(np.ones((2, 4), np.float32)))
    with Client(address, timeout=30) as client, pytest.raises(ConversionError) as err:
        client.convert(artifact, tmp_path / "out", sample_input=npy(np.ones((2, 3))))
    assert err.value.reason == "SAMPLE_INVALID" and err.value.code == "INVALID_ARGUMENT"
    assert "does not fit the model's input" in err.value.message
    assert "has 3 features per row; the model takes 4" in err.value.message


def test_the_extraction_sandbox_gets_the_same_sample(tmp_path: Path) -> None:
    import asyncio

    from airlock_broker.sandboxes.workspace import remove_quietly

    backend = FakeSandbox(tmp_path, lambda spec, data, out: 0)
    upload = tmp_path / "upload"
    upload.write_bytes(PICKLE)

    async def both() -> tuple[bytes, bytes]:
        first = await backend.prepare("sklearn")
        second = await backend.prepare("sklearn")
        await backend.hand_over(first, upload, npy(np.ones(3)))
        await backend.hand_over(second, first)
        return first.workspace.sample.read_bytes(), second.workspace.sample.read_bytes()

    one, two = asyncio.run(both())
    assert one == two == npy(np.ones(3))
    remove_quietly(upload)


# -- the client and the CLI -------------------------------------------------------------------


def test_the_client_reads_a_path_or_bytes_and_checks_before_sending(tmp_path: Path) -> None:
    data = npy(np.zeros((2, 4)))
    path = tmp_path / "rows.npy"
    path.write_bytes(data)
    assert read_sample(path) == read_sample(str(path)) == read_sample(data) == data
    assert read_sample(None) == b""
    big = tmp_path / "big.npy"
    big.write_bytes(b"\x93NUMPY" + b"\0" * (3 * MAX_SAMPLE_BYTES))
    with pytest.raises(SampleTooLarge, match=f"{3 * MAX_SAMPLE_BYTES + 6} bytes"):
        read_sample(big)
    with pytest.raises(ValueError, match="cannot read the parity sample"):
        read_sample(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="empty"):
        read_sample(b"")
    with pytest.raises(ValueError, match=r"not a \.npy file"):
        read_sample(pickle.dumps([1, 2]))


def test_the_cli_takes_a_sample_path() -> None:
    args = build_parser().parse_args(["convert", "m.pkl", "--sample-input", "rows.npy"])
    assert args.sample_input == Path("rows.npy")
    assert build_parser().parse_args(["convert", "m.pkl"]).sample_input is None


def test_the_cli_refuses_a_sample_it_cannot_send_as_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from airlock_client import cli

    model = tmp_path / "m.pkl"
    model.write_bytes(PICKLE)
    big = tmp_path / "big.npy"
    big.write_bytes(b"\x93NUMPY" + b"\0" * MAX_SAMPLE_BYTES)
    code = cli.main(["convert", str(model), "--sample-input", str(big), "--server",
                     "127.0.0.1:9"])
    assert code == 2
    assert "the parity sample is 1048582 bytes; at most 1048576" in capsys.readouterr().err

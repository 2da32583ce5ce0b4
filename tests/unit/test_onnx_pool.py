"""The ONNX validator pool: a crash, hang or memory blow-up of a validator fails only that job,
the broker process never parses the model, the next validation works, and no process is left."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from airlock_broker.errors import AirlockError, Reason
from airlock_broker.validation import OutputLimits, validate_onnx_bytes
from airlock_broker.validation.onnx_pool import OnnxValidatorPool, ValidatorSettings
from tests.unit import hostile_outputs as hostile
from tests.unit import onnx_pool_fakes as fakes

LIMITS = OutputLimits()
FAKE = fakes.__name__
T = TypeVar("T")


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return to_onnx(LogisticRegression().fit(x, y), x[:1],
                   options={"zipmap": False}).SerializeToString()


def alive(pid: int) -> bool:
    # A reaped child is gone from /proc; a zombie would still be listed (and be a leak).
    return Path(f"/proc/{pid}").exists()


def with_pool(settings: ValidatorSettings,
              body: Callable[[OnnxValidatorPool], Awaitable[T]]) -> tuple[T, list[int]]:
    """Run ``body`` against a started pool; close it; return the body's result and every
    validator pid the pool ever had, after asserting none of them is still alive."""
    seen: set[int] = set()

    async def main() -> T:
        pool = OnnxValidatorPool(LIMITS, settings, worker_module=FAKE)
        pool.start()
        try:
            seen.update(pool.pids())
            result = await body(pool)
            seen.update(pool.pids())
            return result
        finally:
            await pool.close()

    result = asyncio.run(main())
    pids = sorted(seen)
    assert pids and not [p for p in pids if alive(p)], "a validator process was left behind"
    return result, pids


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_pool_returns_exactly_the_in_process_canonical_model(
    tmp_path: Path, model_bytes: bytes
) -> None:
    source = write(tmp_path, "model.onnx", model_bytes)

    async def body(pool: OnnxValidatorPool) -> list[tuple[bytes, object]]:
        return [await pool.validate(source) for _ in range(3)]

    results, pids = with_pool(ValidatorSettings(processes=1), body)
    canonical, info = validate_onnx_bytes(model_bytes, LIMITS)
    assert all(got == (canonical, info) for got in results)
    assert len(pids) == 1  # passing jobs reuse the process


def test_a_refused_model_is_refused_with_the_validators_reason(tmp_path: Path) -> None:
    source = write(tmp_path, "model.onnx", hostile.external_in_if_branch().SerializeToString())

    async def body(pool: OnnxValidatorPool) -> AirlockError:
        with pytest.raises(AirlockError) as caught:
            await pool.validate(source)
        return caught.value

    exc, pids = with_pool(ValidatorSettings(processes=1), body)
    assert exc.reason is Reason.OUTPUT_INVALID and "external data" in exc.message
    assert len(pids) == 2  # a validator that refused a model is not trusted with another


@pytest.mark.parametrize(("payload", "settings", "words"), [
    (fakes.CRASH, ValidatorSettings(processes=1), "SIGSEGV"),
    (fakes.NATIVE_MEMORY, ValidatorSettings(processes=1, memory_bytes=256 * 1024**2),
     "SIGABRT"),
    (fakes.MEMORY, ValidatorSettings(processes=1, memory_bytes=256 * 1024**2), "out of memory"),
    (fakes.HANG, ValidatorSettings(processes=1, timeout_seconds=1.0), "did not finish in 1 s"),
    (fakes.SPIN, ValidatorSettings(processes=1, cpu_seconds=1, timeout_seconds=30.0), "SIGXCPU"),
])
def test_a_misbehaving_validator_fails_only_that_job(
    tmp_path: Path, model_bytes: bytes, payload: bytes, settings: ValidatorSettings, words: str
) -> None:
    bad = write(tmp_path, "bad.onnx", payload)
    good = write(tmp_path, "good.onnx", model_bytes)

    async def body(pool: OnnxValidatorPool) -> tuple[AirlockError, int, bytes]:
        first = pool.pids()
        with pytest.raises(AirlockError) as caught:
            await pool.validate(bad)
        # The validator that misbehaved is dead and reaped before the next job starts.
        assert not [p for p in first if alive(p)]
        canonical, _info = await pool.validate(good)
        return caught.value, pool.started, canonical

    (exc, started, canonical), _pids = with_pool(settings, body)
    assert exc.reason is Reason.OUTPUT_INVALID
    assert words in exc.message
    assert started == 2
    assert canonical == validate_onnx_bytes(model_bytes, LIMITS)[0]


def test_validators_are_replaced_after_max_jobs(tmp_path: Path, model_bytes: bytes) -> None:
    source = write(tmp_path, "model.onnx", model_bytes)

    async def body(pool: OnnxValidatorPool) -> tuple[int, list[int]]:
        owners = []
        for _ in range(5):
            owners.extend(pool.pids())  # the one idle validator, about to take the job
            await pool.validate(source)
        return pool.started, owners

    (started, owners), _pids = with_pool(
        ValidatorSettings(processes=1, max_jobs_per_process=2), body)
    assert started == 3
    a, b, c = sorted(set(owners), key=owners.index)
    assert owners == [a, a, b, b, c]  # jobs 1-2 on the first, 3-4 on the second, 5 on the third
    assert not [p for p in (a, b, c) if alive(p)]


def test_a_cancelled_validation_kills_its_validator(tmp_path: Path, model_bytes: bytes) -> None:
    hang = write(tmp_path, "hang.onnx", fakes.HANG)
    good = write(tmp_path, "good.onnx", model_bytes)

    async def body(pool: OnnxValidatorPool) -> bytes:
        first = pool.pids()
        job = asyncio.ensure_future(pool.validate(hang))
        await asyncio.sleep(3.0)  # long enough for the validator to start and take the job
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert not [p for p in first if alive(p)]
        canonical, _info = await pool.validate(good)
        return canonical

    canonical, _pids = with_pool(ValidatorSettings(processes=1), body)
    assert canonical == validate_onnx_bytes(model_bytes, LIMITS)[0]


def test_concurrent_validations_use_every_process(tmp_path: Path, model_bytes: bytes) -> None:
    source = write(tmp_path, "model.onnx", model_bytes)
    hang = write(tmp_path, "hang.onnx", fakes.HANG)

    async def body(pool: OnnxValidatorPool) -> tuple[BaseException | bytes, ...]:
        # One validator hangs until its deadline; the other keeps serving meanwhile.
        stuck = asyncio.ensure_future(pool.validate(hang))
        await asyncio.sleep(0)
        done = [(await pool.validate(source))[0] for _ in range(3)]
        assert not stuck.done()
        with pytest.raises(AirlockError):
            await stuck
        return tuple(done)

    done, _pids = with_pool(ValidatorSettings(processes=2, timeout_seconds=20.0), body)
    assert len(set(done)) == 1


def test_a_closed_pool_refuses_work(tmp_path: Path, model_bytes: bytes) -> None:
    source = write(tmp_path, "model.onnx", model_bytes)

    async def main() -> AirlockError:
        pool = OnnxValidatorPool(LIMITS, ValidatorSettings(processes=1))
        pool.start()
        pids = pool.pids()
        await pool.close()
        assert not [p for p in pids if alive(p)]
        with pytest.raises(AirlockError) as caught:
            await pool.validate(source)
        return caught.value

    assert asyncio.run(main()).reason is Reason.INTERNAL


@pytest.mark.parametrize("bad", [
    {"processes": 0}, {"processes": 65}, {"timeout_seconds": 0}, {"memory_bytes": -1},
    {"cpu_seconds": True}, {"max_jobs_per_process": 0}, {"start_timeout_seconds": "1"},
])
def test_settings_are_checked(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ValidatorSettings(**bad)  # type: ignore[arg-type]


def test_the_broker_process_never_parses_onnx_outputs() -> None:
    # outputs.py must reach ONNX validation only through the pool.
    source = (Path(__file__).parents[2] / "service/airlock_broker/outputs.py").read_text()
    assert "validate_onnx_bytes" not in source and "onnx_check" not in source
    assert "onnx_validator.validate(" in source
    assert os.fspath("onnx_pool") in source


def test_a_validator_that_cannot_be_replaced_costs_no_slot(
    tmp_path: Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airlock_broker.validation import onnx_pool

    crash = write(tmp_path, "crash.onnx", fakes.CRASH)
    good = write(tmp_path, "good.onnx", model_bytes)
    real_worker = onnx_pool._Worker

    def no_processes(module: str, config: str) -> onnx_pool._Worker:
        raise OSError(11, "Resource temporarily unavailable")

    async def body(pool: OnnxValidatorPool) -> tuple[Reason, Reason, bytes]:
        monkeypatch.setattr(onnx_pool, "_Worker", no_processes)
        with pytest.raises(AirlockError) as crashed:
            await pool.validate(crash)  # its replacement cannot start
        with pytest.raises(AirlockError) as starved:
            await pool.validate(good)  # the slot is still there: it tries, and says why
        monkeypatch.setattr(onnx_pool, "_Worker", real_worker)
        canonical, _info = await asyncio.wait_for(pool.validate(good), 60)
        return crashed.value.reason, starved.value.reason, canonical

    (crashed, starved, canonical), _pids = with_pool(ValidatorSettings(processes=1), body)
    assert crashed is Reason.OUTPUT_INVALID
    assert starved is Reason.INTERNAL
    assert canonical == validate_onnx_bytes(model_bytes, LIMITS)[0]


def test_config_reads_the_onnx_validator_section(tmp_path: Path) -> None:
    from airlock_broker.config import BrokerConfig

    path = tmp_path / "broker.toml"
    path.write_text("[onnx_validator]\nprocesses = 3\ntimeout_seconds = 5.0\n")
    config = BrokerConfig.load(path)
    assert config.onnx_validator == ValidatorSettings(processes=3, timeout_seconds=5.0)
    assert BrokerConfig().onnx_validator == ValidatorSettings()
    path.write_text("[onnx_validator]\nin_process = true\n")
    with pytest.raises(ValueError, match="onnx_validator"):
        BrokerConfig.load(path)

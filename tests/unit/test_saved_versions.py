"""A model saved by another scikit-learn version than the sandbox's (saved_versions.py):
scikit-learn's own warning, which the worker otherwise silences, reaches the result. The
pickles are read in this process by the policy loader, which runs nothing they name."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import sklearn
from sklearn.exceptions import InconsistentVersionWarning

from airlock_sandbox.contract import REPORT_WARNING_CHARS, JobSpec, LoadingPolicy, WorkerExit
from airlock_sandbox.formats import ArtifactFormat
from airlock_worker import saved_versions, sklearn_convert
from airlock_worker.errors import WorkerError
from airlock_worker.job import Job
from tests.fixtures.models import make_sklearn_pickle_saved_by

NOTE = "saved with scikit-learn"


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("a policy loader's poison refuses to print")


def _job(path: Path, tmp_path: Path) -> Job:
    spec = JobSpec(job_id="t", artifact_format=ArtifactFormat.PICKLE,
                   policy=LoadingPolicy.SAFE_ONLY)
    return Job(spec=spec, artifact=str(path), out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE)


@pytest.mark.parametrize("reading", ["convert", "verify"])
def test_a_model_saved_by_another_version_says_so(reading: str, tmp_path: Path) -> None:
    path = make_sklearn_pickle_saved_by(tmp_path, "1.0.2")
    job = _job(path, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as the worker runs (__main__.py)
        getattr(sklearn_convert, reading)(job)
    assert (tmp_path / "model.onnx").is_file()
    notes = [w for w in job.report.warnings if NOTE in w]
    assert notes == [
        f"saved with scikit-learn 1.0.2, read with {sklearn.__version__}, which may give other "
        "results; parity compares with this reading only (LogisticRegression, Pipeline, "
        "StandardScaler)"]
    assert len(notes[0]) <= REPORT_WARNING_CHARS


def test_a_model_saved_by_this_version_says_nothing(tmp_path: Path) -> None:
    path = make_sklearn_pickle_saved_by(tmp_path, sklearn.__version__)
    job = _job(path, tmp_path)
    sklearn_convert.convert(job)
    assert not [w for w in job.report.warnings if NOTE in w]


def test_a_failed_load_names_both_versions(tmp_path: Path) -> None:
    job = _job(tmp_path / "unused", tmp_path)
    with pytest.raises(WorkerError) as caught, job.loading():
        warnings.warn(InconsistentVersionWarning(
            estimator_name="SVC", current_sklearn_version=sklearn.__version__,
            original_sklearn_version="0.22.1"), stacklevel=1)
        raise ValueError("buffer dtype mismatch")
    assert caught.value.exit is WorkerExit.CONVERSION_FAILED
    assert caught.value.message == ("loading failed: ValueError: buffer dtype mismatch (saved "
                                    f"with scikit-learn 0.22.1, read with {sklearn.__version__})")


def test_only_the_version_warning_is_taken_and_the_filters_are_restored(
        tmp_path: Path) -> None:
    job = _job(tmp_path / "unused", tmp_path)
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as elsewhere:
        warnings.simplefilter("always")
        with job.loading():
            warnings.warn("a library's own warning", DeprecationWarning, stacklevel=1)
            for name in ("SVC", "SVC", "Pipeline"):
                warnings.warn(InconsistentVersionWarning(
                    estimator_name=name, current_sklearn_version="1.8.0",
                    original_sklearn_version="pre-0.18"), stacklevel=1)
    assert [str(w.message) for w in elsewhere] == ["a library's own warning"]
    [note] = job.report.warnings
    assert note.startswith("saved with scikit-learn pre-0.18, read with 1.8.0, ")
    assert note.endswith(" (Pipeline, SVC)")
    assert warnings.filters == before


def test_what_the_artifact_says_is_capped() -> None:
    versions = saved_versions.Versions()
    versions.found = [InconsistentVersionWarning(
        estimator_name=f"Step{i}" + "x" * 200, current_sklearn_version="1.8.0",
        original_sklearn_version="9" * 500) for i in range(8)]
    versions.found.append(InconsistentVersionWarning(  # a version that is not a string
        estimator_name="SVC", current_sklearn_version="1.8.0",
        original_sklearn_version=Unprintable()))
    sentence, other = versions.sentences()
    assert sentence.startswith(f"saved with scikit-learn {'9' * saved_versions.MAX_VERSION_CHARS}, "
                               "read with 1.8.0, ")
    assert sentence.endswith(f"(Step0{'x' * 35}, Step1{'x' * 35}, Step2{'x' * 35} and 5 more)")
    assert other.startswith("saved with scikit-learn <Unprintable>, read with 1.8.0, ")


def test_a_skops_file_from_another_version_says_so(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.base
    import skops.io

    from tests.fixtures.models import sklearn_pipeline

    model = sklearn_pipeline()
    with monkeypatch.context() as patched:  # what BaseEstimator.__getstate__ records
        patched.setattr(sklearn.base, "__version__", "1.4.2")
        path = tmp_path / "model.skops"
        skops.io.dump(model, path)
    job = Job(spec=JobSpec(job_id="t", artifact_format=ArtifactFormat.SKOPS,
                           policy=LoadingPolicy.SAFE_ONLY),
              artifact=str(path), out_dir=str(tmp_path), fmt=ArtifactFormat.SKOPS)
    sklearn_convert.convert_skops(job)
    [note] = [w for w in job.report.warnings if NOTE in w]
    assert note.startswith("saved with scikit-learn 1.4.2, read with ")
    assert note.endswith("(LogisticRegression, Pipeline, StandardScaler)")

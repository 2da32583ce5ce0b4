"""A scipy sparse matrix read by the policy loader must be one scipy would build.

BUILD sets a sparse matrix's ``__dict__`` as it is (csr/csc have no ``__setstate__``), and even
the constructor checks only shapes (``check_format(full_check=False)``), so index arrays could
point anywhere: scipy's C++ routines (``toarray``, products, ``tocsr``) index their buffers
with them unchecked. skl2onnx's SVM converter calls ``support_vectors_.toarray()``: a pickled
SVR whose sparse support vectors name column 2**27 wrote a double 1 GiB past a 24-byte buffer
during a ``safe_only`` conversion (SIGSEGV; a smaller index corrupts the heap silently: a
relative write, which needs no address).
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from airlock_worker import policy_loader
from airlock_worker.policy_loader import PolicyRefused

ROOT = Path(__file__).resolve().parents[2]


def _svr_with_sparse_support_vectors(column: int) -> bytes:
    import scipy.sparse as sp
    from sklearn.svm import SVR

    x = np.random.RandomState(0).rand(20, 3)
    model = SVR().fit(x, x.sum(axis=1))
    vectors = sp.csr_matrix(model.support_vectors_)
    vectors.indices = vectors.indices.copy()
    vectors.indices[0] = column
    model.support_vectors_ = vectors
    return pickle.dumps(model, protocol=4)


@pytest.mark.parametrize("tolerant", [False, True])
def test_sparse_indices_outside_the_matrix_are_refused(tolerant: bool) -> None:
    data = _svr_with_sparse_support_vectors(3)  # one past the last column
    with pytest.raises(PolicyRefused, match="sparse"):
        reading = policy_loader.read(io.BytesIO(data), tolerant=tolerant)
        pytest.fail(f"admitted: indices {reading.obj.support_vectors_.indices[:3]} of a "
                    f"matrix of {reading.obj.support_vectors_.shape[1]} columns")


def test_a_safe_only_conversion_never_writes_outside_a_buffer(tmp_path: Path) -> None:
    """The conversion the worker runs (skl2onnx on the reading's object), in a child: it died
    of SIGSEGV before; now the reading refuses the pickle."""
    artifact = tmp_path / "model.pkl"
    artifact.write_bytes(_svr_with_sparse_support_vectors(2**27))
    script = textwrap.dedent(f"""
        import sys
        from airlock_worker import policy_loader
        from airlock_worker.policy_loader import PolicyRefused
        try:
            with open({str(artifact)!r}, "rb") as fh:
                model = policy_loader.read(fh, tolerant=False).obj
        except PolicyRefused as exc:
            print("refused:", exc)
            sys.exit(0)
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
        convert_sklearn(model, initial_types=[("x", FloatTensorType([None, 3]))],
                        target_opset={{"": 18, "ai.onnx.ml": 3}})
        print("converted")
        sys.exit(3)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        str(ROOT / p) for p in ("sandbox", "service", "clients", "protos", "."))}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert "refused:" in done.stdout


@pytest.mark.parametrize("kind", ["csr_matrix", "csc_matrix", "coo_matrix", "csr_array",
                                  "csc_array"])
def test_valid_sparse_matrices_still_read(kind: str) -> None:
    import scipy.sparse as sp

    dense = np.array([[0.0, 1.5, 0.0], [2.0, 0.0, 3.0]])
    matrix = getattr(sp, kind)(dense)
    got = policy_loader.read(io.BytesIO(pickle.dumps({"m": matrix, "again": matrix},
                                                     protocol=4)), tolerant=False).obj
    assert type(got["m"]) is type(matrix) and got["m"] is got["again"]
    np.testing.assert_array_equal(got["m"].toarray(), dense)


def _sub(obj: object) -> bytes:
    """``obj``'s opcodes without the protocol header and STOP, to splice into a pickle."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def test_an_index_array_rebuilt_after_its_matrix_was_read_is_not_the_matrixs() -> None:
    """The pickle holds the index array too, and BUILD (``ndarray.__setstate__``) can set it
    again once the matrix was read and checked: the matrix must not see it."""
    dense = np.array([[0.0, 1.5, 0.0], [2.0, 0.0, 3.0]])
    import scipy.sparse as sp

    valid = sp.csr_matrix(dense)
    bad = np.array([2**27, 0, 2], dtype=valid.indices.dtype)
    data = b"".join([
        b"\x80\x02",
        _sub(valid.indices.copy()), b"q\xfa0",  # the index array, kept in memo 250
        b"cscipy.sparse._csr\ncsr_matrix\n)\x81}(",  # NEWOBJ csr_matrix, its state:
        _sub("data"), _sub(valid.data.copy()),
        _sub("indices"), b"h\xfa",  # the same array
        _sub("indptr"), _sub(valid.indptr.copy()),
        _sub("_shape"), _sub(valid.shape),
        _sub("maxprint"), _sub(50),
        b"ubq\xfb0",  # SETITEMS, BUILD, kept in memo 251
        b"h\xfa", _sub((1, (3,), bad.dtype, False, bad.tobytes())), b"b0",  # BUILD it again
        b"h\xfb.",
    ])
    try:
        got = policy_loader.read(io.BytesIO(data), tolerant=False).obj
    except PolicyRefused:
        return
    np.testing.assert_array_equal(got.indices, valid.indices)
    np.testing.assert_array_equal(got.toarray(), dense)


def test_models_holding_sparse_matrices_still_read() -> None:
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    rng = np.random.RandomState(0)
    x = rng.rand(40, 5) * (rng.rand(40, 5) > 0.5)
    y = (x.sum(axis=1) > 1).astype(int)
    for model in (SVC().fit(sp.csr_matrix(x), y), LogisticRegression().fit(x, y).sparsify()):
        for how in ("pickle", "joblib"):
            if how == "pickle":
                data = pickle.dumps(model, protocol=4)
            else:
                import joblib

                buf = io.BytesIO()
                joblib.dump(model, buf)
                data = buf.getvalue()
            got = policy_loader.read(io.BytesIO(data), tolerant=False).obj
            np.testing.assert_array_equal(got.decision_function(sp.csr_matrix(x)),
                                          model.decision_function(sp.csr_matrix(x)))

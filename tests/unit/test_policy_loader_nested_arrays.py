"""The pickle inside a joblib object array is read under the same rules as the rest.

joblib (1.6) reads an object array's elements as a nested pickle with a fresh
``pickle._Unpickler``, routing only ``find_class`` through the policy loader: the loader's
other rules (no BUILD on a class or function it handed out, no numpy array over the
pickle's bytes, no dunder attributes...) did not apply there. A joblib file naming only
allowlisted globals could so set ``KFold.split`` (any attribute of a library class without
``__setstate__``, or a library function's ``__defaults__``) for the rest of the job
(the loader's own test says this is refused, and it was, outside an object array), or hand
out ``os.system`` by its address.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import joblib
import numpy as np
import pytest

from airlock_worker import policy_loader
from airlock_worker.policy_loader import PolicyRefused


@contextmanager
def _nested_stream(sentinel: np.ndarray, stream: bytes) -> Iterator[None]:
    """While joblib dumps ``sentinel`` (an object array), write ``stream`` as its elements'
    nested pickle instead of ``pickle.dump(sentinel)``."""
    import joblib.numpy_pickle as numpy_pickle

    real = numpy_pickle.pickle.dump

    def dump(obj: Any, fh: Any, *args: Any, **kwargs: Any) -> None:
        if obj is sentinel:
            fh.write(stream)
        else:
            real(obj, fh, *args, **kwargs)

    numpy_pickle.pickle.dump = dump
    try:
        yield
    finally:
        numpy_pickle.pickle.dump = real


def _joblib_with_nested(stream: bytes) -> bytes:
    from sklearn.linear_model import LinearRegression

    model = LinearRegression().fit([[0.0], [1.0]], [0.0, 1.0])
    sentinel = np.array(["a", None], dtype=object)
    model.labels_ = sentinel  # type: ignore[attr-defined]
    buf = io.BytesIO()
    with _nested_stream(sentinel, stream):
        joblib.dump(model, buf)
    return buf.getvalue()


def _body(obj: Any) -> bytes:
    """``obj``'s protocol-2 opcodes without the header and STOP."""
    return pickle.dumps(obj, protocol=2)[2:-1]


@pytest.mark.parametrize("tolerant", [False, True])
def test_a_nested_stream_cannot_modify_a_class_it_is_handed(tolerant: bool) -> None:
    from sklearn.model_selection import KFold

    assert "split" not in vars(KFold)  # inherited (_BaseKFold), and no __setstate__
    # GLOBAL KFold; (None, {"split": 1}); BUILD (setattr on the class); POP; then a real
    # object array
    stream = (b"\x80\x02csklearn.model_selection._split\nKFold\n"
              b"N}X\x05\x00\x00\x00splitK\x01s\x86b0"
              + _body(np.array(["a", None], dtype=object)) + b".")
    data = _joblib_with_nested(stream)
    try:
        with pytest.raises(PolicyRefused, match="tries to modify"):
            policy_loader.read(io.BytesIO(data), tolerant=tolerant)
    finally:
        changed = "split" in vars(KFold)
        if changed:
            del KFold.split
    assert not changed


class _ObjectArrayOverBytes:
    def __init__(self, address: int) -> None:
        self.address = address

    def __reduce__(self) -> tuple[Any, ...]:
        return np.ndarray, ((1,), np.dtype(object), bytearray(struct.pack("<Q", self.address)))


@pytest.mark.parametrize("tolerant", [False, True])
def test_a_nested_stream_cannot_build_an_array_over_its_bytes(tolerant: bool) -> None:
    data = _joblib_with_nested(pickle.dumps(_ObjectArrayOverBytes(id(os.system)),
                                             protocol=4))
    try:
        reading = policy_loader.read(io.BytesIO(data), tolerant=tolerant)
    except PolicyRefused as exc:
        assert "buffer" in str(exc)
        return
    pytest.fail(f"admitted, handing out {reading.obj.labels_[0]!r}")


def test_a_nested_stream_must_be_an_object_array() -> None:
    data = _joblib_with_nested(pickle.dumps({"not": "an array"}, protocol=2))
    with pytest.raises(PolicyRefused, match="object array"):
        policy_loader.read(io.BytesIO(data), tolerant=False)


@pytest.mark.parametrize("compress", [0, 3])
def test_object_arrays_in_joblib_files_still_read(compress: int) -> None:
    inner = np.array([np.array([1.0, 2.0]), "x", None], dtype=object)
    value = {"labels": np.array(["fraud", "ok"], dtype=object), "nested": inner,
             "grid": np.ma.array(np.array([1, "a"], dtype=object), mask=[False, True])}
    buf = io.BytesIO()
    joblib.dump(value, buf, compress=compress)
    got = policy_loader.read(io.BytesIO(buf.getvalue()), tolerant=False).obj
    np.testing.assert_array_equal(got["labels"], value["labels"])
    np.testing.assert_array_equal(got["nested"][0], inner[0])
    assert list(got["nested"][1:]) == ["x", None]
    assert list(got["grid"].mask) == [False, True]

"""The policy loader must not let a pickle reach process memory through numpy.

Two ways a pickle naming only allowlisted globals made numpy treat the artifact's bytes as
memory addresses, so that what the reading handed back was not built from the pickle's data:

* ``numpy.ndarray(shape, object, buffer)`` (REDUCE / NEWOBJ on the allowlisted class): an
  object array whose elements are the pointers written in the buffer, i.e. any object at a
  known address (``os.system`` below, which the pickle never names), and forged objects at
  any other: a refcount increment at each address read, and a fake ``PyObject`` wherever
  the bytes point;
* an ``__array_interface__`` stored on an object the pickle builds (a ``Bunch`` key, an
  estimator's ``__dict__``): numpy reads it from the instance whenever it coerces the object
  (``MaskedArray(obj)`` during the load, ``np.asarray`` in scikit-learn and skl2onnx later),
  and makes an array over any address the pickle gives (read and write), or an object array
  over its bytes.

The tests build the pickles with real addresses of this process (an attacker would aim at
what the worker's memory holds); the loader must refuse them, strict or tolerant.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from typing import Any

import numpy as np
import pytest

from airlock_worker import policy_loader
from airlock_worker.policy_loader import PolicyRefused


class _ObjectArrayOverBytes:
    """Pickles as ``numpy.ndarray((1,), dtype('O'), bytearray(<address>))``."""

    def __init__(self, address: int) -> None:
        self.address = address

    def __reduce__(self) -> tuple[Any, ...]:
        return np.ndarray, ((1,), np.dtype(object), bytearray(struct.pack("<Q", self.address)))


class _ObjectArrayOverBytesNewobj(_ObjectArrayOverBytes):
    """The same through NEWOBJ: ``ndarray.__new__(ndarray, shape, dtype, buffer)`` (the
    pickler checks that the object's ``__class__`` is the one NEWOBJ names)."""

    __class__ = property(lambda self: np.ndarray)  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        import copyreg

        return copyreg.__newobj__, (np.ndarray, (1,), np.dtype(object),
                                    bytearray(struct.pack("<Q", self.address)))


class _Interface:
    """Pickles as ``numpy.ma.MaskedArray(Bunch(__array_interface__=...))``."""

    def __init__(self, interface: dict[str, Any]) -> None:
        self.interface = interface

    def __reduce__(self) -> tuple[Any, ...]:
        from sklearn.utils import Bunch

        return np.ma.MaskedArray, (Bunch(__array_interface__=self.interface),)


class _Holder:
    """An object the pickle rebuilds as a ``_ConstantPredictor`` whose ``__dict__`` (its
    BUILD state) carries an ``__array_interface__``."""

    def __init__(self, interface: dict[str, Any]) -> None:
        self.interface = interface

    def __reduce__(self) -> tuple[Any, ...]:
        from sklearn.multiclass import _ConstantPredictor

        return (_ConstantPredictor, (), {"__array_interface__": self.interface})


def _model(coef: Any) -> Any:
    from sklearn.linear_model import LinearRegression

    model = LinearRegression()
    model.coef_, model.intercept_, model.n_features_in_ = coef, 0.0, 2
    return model


def _read(obj: Any, tolerant: bool, protocol: int = 4) -> policy_loader.Reading:
    return policy_loader.read(io.BytesIO(pickle.dumps(obj, protocol=protocol)),
                              tolerant=tolerant)


@pytest.mark.parametrize("tolerant", [False, True])
@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("forge", [_ObjectArrayOverBytes, _ObjectArrayOverBytesNewobj])
def test_an_object_array_over_the_pickles_bytes_is_refused(forge: type, protocol: int,
                                                           tolerant: bool) -> None:
    data = pickle.dumps(_model(forge(id(os.system))), protocol=protocol)
    try:
        reading = policy_loader.read(io.BytesIO(data), tolerant=tolerant)
    except PolicyRefused as exc:
        assert "memory" in str(exc)
        return
    # Before: admitted, with a global the pickle never named in the model's coefficients.
    handed = reading.obj.coef_[0]
    pytest.fail(f"the reading handed the pickle {handed!r} (refused: {reading.refused})")


@pytest.mark.parametrize("tolerant", [False, True])
def test_an_array_interface_over_process_memory_is_refused(tolerant: bool) -> None:
    secret = np.array([2.0, 3.0])
    interface = {"data": (secret.ctypes.data, False), "shape": (2,), "typestr": "<f8",
                 "version": 3}
    try:
        reading = _read(_model(_Interface(interface)), tolerant)
    except PolicyRefused as exc:
        assert "__array_interface__" in str(exc)
        return
    model = reading.obj
    got = model.predict(np.array([[1.0, 1.0]]))
    model.coef_[0] = 7.0  # the loaded model's coefficients are this process's memory
    pytest.fail(f"admitted: predict read {got} from another array, which is now {secret}")


@pytest.mark.parametrize("tolerant", [False, True])
def test_an_array_interface_of_object_pointers_is_refused(tolerant: bool) -> None:
    interface = {"data": bytearray(struct.pack("<Q", id(os.system))), "shape": (1,),
                 "typestr": "|O", "version": 3}
    with pytest.raises(PolicyRefused, match="__array_interface__"):
        reading = _read(_model(_Interface(interface)), tolerant)
        pytest.fail(f"admitted, handing out {reading.obj.coef_[0]!r}")


@pytest.mark.parametrize("tolerant", [False, True])
def test_an_array_interface_in_an_estimators_state_is_refused(tolerant: bool) -> None:
    secret = np.array([2.0, 3.0])
    interface = {"data": (secret.ctypes.data, False), "shape": (2,), "typestr": "<f8",
                 "version": 3}
    with pytest.raises(PolicyRefused, match="__array_interface__"):
        reading = _read(_model(_Holder(interface)), tolerant)
        pytest.fail(f"admitted: {np.asarray(reading.obj.coef_)} is another array's memory")


def test_ordinary_object_arrays_and_masked_arrays_still_read() -> None:
    labels = np.array(["fraud", "ok"], dtype=object)
    masked = np.ma.array([1.0, 2.0], mask=[False, True])
    reading = _read({"labels": labels, "masked": masked, "view": labels[::-1]}, False)
    np.testing.assert_array_equal(reading.obj["labels"], labels)
    np.testing.assert_array_equal(reading.obj["masked"].mask, masked.mask)
    np.testing.assert_array_equal(reading.obj["view"], labels[::-1])


# -- a dtype whose pickled state numpy's constructor would refuse -------------------------

_PAIR = np.dtype([("a", "O"), ("b", "<u8")])


class _Dtype:
    """Pickles as ``numpy.dtype('V16', False, True)`` whose BUILD sets ``state``."""

    def __init__(self, state: tuple[Any, ...]) -> None:
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return np.dtype, ("V16", False, True), self.state


class _Array:
    """Pickles as numpy pickles an array: ``_reconstruct`` then BUILD with ``state``."""

    def __init__(self, state: tuple[Any, ...]) -> None:
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (0,), b"b"), self.state


def _without_object_flags(address: int) -> Any:
    """The pair dtype with its flags cleared: numpy then takes the object field's pointers
    from the raw bytes, as for a dtype without objects."""
    state = _PAIR.__reduce__()[2]
    dtype = _Dtype((*state[:7], 0, *state[8:]))
    return _Array((1, (1,), dtype, False, struct.pack("<QQ", address, 0)))


def _overlapping_fields(address: int) -> Any:
    """An object field and an integer field at the same offset (numpy's constructor:
    "Cannot create a NumPy dtype with overlapping object fields"): the integer written
    second is the pointer."""
    state = _PAIR.__reduce__()[2]
    fields = {"a": (np.dtype("O"), 0), "b": (np.dtype("<u8"), 0)}
    dtype = _Dtype((state[0], state[1], None, ("a", "b"), fields, 8, state[6], state[7]))
    return _Array((1, (1,), dtype, False, [(None, address)]))


@pytest.mark.parametrize("tolerant", [False, True])
@pytest.mark.parametrize("forge", [_without_object_flags, _overlapping_fields])
def test_a_dtype_state_numpy_would_not_construct_is_refused(forge: Any,
                                                            tolerant: bool) -> None:
    target = os.system
    try:
        reading = _read(_model(forge(id(target))), tolerant)
    except PolicyRefused as exc:
        assert "dtype" in str(exc)
        return
    handed = reading.obj.coef_[0]["a"]
    pytest.fail(f"the reading handed the pickle {handed!r} (refused: {reading.refused})")


@pytest.mark.parametrize("dtype", ["<f8", ">i4", "|b1", "<U7", "|S3", "O", "<M8[ns]",
                                   "<m8[s]", "<c16"])
def test_ordinary_dtypes_still_read(dtype: str) -> None:
    structured = np.dtype([("x", dtype), ("y", "<f4", (2,))], align=True)
    for dt in (np.dtype(dtype), structured, np.dtype((dtype, (2, 3)))):
        array = np.zeros(3, dt)
        got = _read({"dtype": dt, "array": array}, False).obj
        assert got["dtype"] == dt and got["dtype"].flags == dt.flags
        # (joblib's unpickler makes arrays native-endian; a subarray dtype is the shape's)
        assert got["array"].shape == array.shape
        assert got["array"].dtype.newbyteorder("=") == array.dtype.newbyteorder("=")

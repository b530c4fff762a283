"""Shaping requests: a float sent to an integer input is refused outside the input type's range, right at its
edges (2.0**63 passed the check and reached an int64 model as -2**63); an input name the model lacks is refused."""
from __future__ import annotations

import numpy as np
import pytest

import mlplat as mp
from mlplat.serving.shaping import ModelInfo, check_cast, to_arrays

INTS = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


def _edges(want: type, floats: type) -> tuple[float, float, float, float]:
    """(the lowest and highest value of ``floats`` inside ``want``'s range, the first ones outside), exactly."""
    info = np.iinfo(want)
    top = floats(2.0 ** (info.bits - (1 if info.min < 0 else 0)))  # the first value above the range: exact
    inside_top = floats(info.max)  # exact for small types; rounded up to ``top`` for the wide ones
    if float(inside_top) > info.max:
        inside_top = np.nextafter(inside_top, floats(0))
    low = floats(info.min)
    below = floats(float(info.min) - 1)  # the first whole number below: exact for small types
    if float(below) >= info.min:
        below = np.nextafter(low, floats(-np.inf))  # wide types: the next float down is whole too
    return float(low), float(inside_top), float(below), float(top)


@pytest.mark.parametrize("floats", [np.float64, np.float32])
@pytest.mark.parametrize("want", INTS, ids=[t.__name__ for t in INTS])
def test_floats_at_the_edges_of_an_integer_type(want, floats):
    low, high, below, above = _edges(want, floats)
    inside = np.array([low, high], dtype=floats)
    check_cast("x", "INT", inside, np.dtype(want))
    assert inside.astype(want).tolist() == [int(low), int(high)]  # what the model gets: the same numbers
    for bad in ([above], [below] if np.iinfo(want).min < 0 else [-1.0]):
        with pytest.raises(mp.DataError, match="its values must lie in"):
            check_cast("x", "INT", np.array(bad, dtype=floats), np.dtype(want))


def test_integers_at_the_edges_are_compared_exactly():
    check_cast("x", "INT64", np.array([2**63 - 1, -2**63], dtype=np.int64), np.dtype(np.int64))
    with pytest.raises(mp.DataError, match="its values must lie in"):
        check_cast("x", "INT64", np.array([2**63], dtype=np.uint64), np.dtype(np.int64))
    with pytest.raises(mp.DataError, match="its values must lie in"):
        check_cast("x", "INT32", np.array([2**31], dtype=np.int64), np.dtype(np.int32))


def test_an_input_name_the_model_does_not_have_is_refused():
    """A misspelt or extra name was dropped silently by every backend."""
    info = ModelInfo("one", (("input__0", "FP32", (2,)),), ("output__0",), 8, (), 0)
    x = np.zeros((3, 2), np.float32)
    assert list(to_arrays(info, {"input__0": x})) == ["input__0"]
    for inputs in ({"input__0": x, "input__1": x}, {"inputs__0": x}):
        with pytest.raises(mp.DataError, match="model 'one' has no input 'input(s__0|__1)'; its inputs are "
                                               r"\['input__0'\]"):
            to_arrays(info, inputs)

"""Runtime.first_nan_index, the look behind on_nonfinite="raise", on every built-in
runtime: the C-order flat index of the first NaN for any shape, and None where there
is none (infinities are not NaN)."""
import itertools

import numpy as np
import pytest

import kvquant

BACKENDS = ["numpy", "torch", "jax"]
SHAPES = [(0,), (1,), (7,), (3, 4), (2, 3, 4)]


@pytest.fixture(params=BACKENDS)
def runtime(request):
    pytest.importorskip(request.param)
    return kvquant.get_backend(request.param).runtime


def values(shape):
    return np.random.default_rng(0).uniform(0.5, 2.0, shape).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_no_nan_gives_none_even_with_infinities(runtime, shape):
    v = values(shape)
    if v.size:
        v.flat[0], v.flat[-1] = np.inf, -np.inf
    assert runtime.first_nan_index(runtime.from_numpy(v)) is None


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_each_position_of_a_single_nan(runtime, shape):
    size = int(np.prod(shape))
    for flat, sign in itertools.product(range(size), (1, -1)):
        v = values(shape)
        v.flat[flat] = sign * np.nan
        assert runtime.first_nan_index(runtime.from_numpy(v)) == flat, (shape, flat, sign)


@pytest.mark.parametrize("shape", SHAPES[2:], ids=str)
def test_the_first_of_several_nans(runtime, shape):
    v = values(shape)
    size = v.size
    v.flat[[size - 1, size // 2, 1]] = np.nan
    v.flat[0] = np.inf
    assert runtime.first_nan_index(runtime.from_numpy(v)) == 1

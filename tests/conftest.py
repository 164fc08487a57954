import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # broken_backends, shared helpers

EXHAUSTIVE = os.environ.get("KVQUANT_EXHAUSTIVE") == "1"


def bits(a):
    a = np.ascontiguousarray(np.asarray(a))
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_same_bits(expected, actual, what=""):
    """Vectorised check first; on failure, the first bad index with both values in hex."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    assert expected.shape == actual.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert expected.dtype == actual.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    e, a = bits(expected).reshape(-1), bits(actual).reshape(-1)
    bad = np.flatnonzero(e != a)
    if bad.size:
        i = int(bad[0])
        index = np.unravel_index(i, expected.shape)
        pytest.fail(f"{what}: {bad.size} of {e.size} elements differ; first at {index}: "
                    f"expected 0x{int(e[i]):x}, actual 0x{int(a[i]):x}")


def e4m3_encoder_cases():
    """Inputs for an e4m3 encoder: every rounding boundary (midpoints, ties to even, one
    and two ulp either side), every e4m3 value of both signs, the subnormal e4m3 range,
    and float32 subnormals (flushed on the way in by XLA; ml_dtypes rounds them to 0)."""
    from kvquant.conformance.cases import e4m3_values, fp8_boundary_values

    tiny = np.float32([2.0**-10, 2.0**-11, 3 * 2.0**-11, 2.0**-7 - 2.0**-30, 2.0**-130, -(2.0**-149), 0.0, -0.0])
    return np.concatenate([fp8_boundary_values(), e4m3_values(), -e4m3_values(), tiny])


def check_e4m3_encoder(encode, every_float32=False):
    """``encode`` (float32 NumPy array -> uint8 NumPy codes) against ml_dtypes on
    e4m3_encoder_cases(), or with ``every_float32`` on every float32 of either sign up
    to 448 (the tests that ask for it are marked exhaustive)."""
    import ml_dtypes

    def check(values, what):
        assert_same_bits(values.astype(ml_dtypes.float8_e4m3fn).view(np.uint8), encode(values), what)

    if not every_float32:
        check(e4m3_encoder_cases(), "rounding boundaries")
        return
    top = 0x43E00000  # 448.0
    for start in range(0, top + 1, 1 << 24):
        block = np.arange(start, min(top + 1, start + (1 << 24)), dtype=np.uint32)
        for sign in (0, 0x80000000):
            check((block | np.uint32(sign)).view(np.float32), f"every float32 from {start | sign:#x}")


def pytest_configure(config):
    config.addinivalue_line("markers", "exhaustive: sweeps every float32 of a range; KVQUANT_EXHAUSTIVE=1 runs them")


def pytest_collection_modifyitems(config, items):
    if EXHAUSTIVE:
        return
    skip = pytest.mark.skip(reason="exhaustive sweep: set KVQUANT_EXHAUSTIVE=1")
    for item in items:
        if "exhaustive" in item.keywords:
            item.add_marker(skip)

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


def pytest_configure(config):
    config.addinivalue_line("markers", "exhaustive: sweeps every float32 of a range; KVQUANT_EXHAUSTIVE=1 runs them")


def pytest_collection_modifyitems(config, items):
    if EXHAUSTIVE:
        return
    skip = pytest.mark.skip(reason="exhaustive sweep: set KVQUANT_EXHAUSTIVE=1")
    for item in items:
        if "exhaustive" in item.keywords:
            item.add_marker(skip)

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


# The formats the framework-specific tests (tests/test_torch_backend.py,
# tests/test_jax_backend.py) run, with their pytest ids.
FORMATS = [("fp8", {}), ("fp8_per_tensor", {}), ("fp8_per_tensor", {"scale": 0.02}), ("int8", {}),
           ("int4", {"group_size": 32}), ("int2", {"group_size": 32}), ("int4_per_channel", {"group_size": 32}),
           ("int2_per_channel", {"group_size": 32})]
FIDS = ["fp8", "fp8_tensor", "fp8_static", "int8", "int4", "int2", "int4_channel", "int2_channel"]


def shape_for(fmt, shape):
    """``shape`` as a format can take it. Per-channel formats quantize whole blocks of
    32 tokens here, so every axis a view may move into the token axis (all but the
    first and last; the first of a 2-D shape) is made 8 times longer and rounded up to
    whole blocks."""
    if not fmt.endswith("per_channel"):
        return tuple(shape)
    longer = lambda d: -(-d * 8 // 32) * 32  # noqa: E731
    if len(shape) == 2:
        return (longer(shape[0]), shape[1])
    return (shape[0],) + tuple(longer(d) for d in shape[1:-1]) + (shape[-1],)


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

"""The dequantization shortcut of the torch and JAX backends, side by side.

On the CPU their compiled (torch) and jitted (JAX) dequantizations first look at the
small per-token or per-group parameters and, when no element can need it, skip the
element-wise flush and NaN search (``scales_checked``, ``params_checked``). The
shortcut must give the checking kernel's bits wherever the look allows it, and the
look must refuse every parameter that could make a difference."""
import importlib

import numpy as np
import pytest

import kvquant
from conftest import assert_same_bits
from kvquant.backends.numpy import kernels as ref

BACKENDS = ["torch", "jax"]
OUT_DTYPES = ["float32", "float16", "bfloat16"]
LOWEST_BINADE = np.float32(1.5 * 2.0**-126)  # with zero 0, q = 1 dequantizes to it: below 2^-125


def backend(name):
    pytest.importorskip(name)
    return importlib.import_module(f"kvquant.backends.{name}.kernels"), kvquant.get_backend(name).runtime


def tokens():
    """Tokens from 1e-30 to 1e30, so that scales span most of float32's range."""
    rng = np.random.default_rng(5)
    return (rng.standard_normal((64, 128)) * 3 * np.logspace(-30, 30, 64)[:, None]).astype(np.float32)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("name", BACKENDS)
def test_fp8_shortcut_gives_the_checking_kernels_bits(name, out_dtype):
    mod, rt = backend(name)
    codes, scales = ref.fp8_quantize_per_token(tokens())
    codes.view(np.uint8)[:, :2] = (0x7F, 0xFF)  # NaN codes still give the canonical NaN
    codes, scales = rt.from_numpy(codes), rt.from_numpy(scales[:, None])
    assert bool(mod.fp8_scales_checked(scales))
    checking = rt.to_numpy(mod.fp8_dequantize(codes, scales, out_dtype))
    assert_same_bits(checking, rt.to_numpy(mod.fp8_dequantize(codes, scales, out_dtype, True)), "shortcut")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0, 2.0**-117, 1e-40, LOWEST_BINADE], ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_fp8_look_refuses_scales_that_matter(name, bad):
    mod, rt = backend(name)
    scales = np.ones((8, 1), np.float32)
    scales[3, 0] = bad
    assert not bool(mod.fp8_scales_checked(rt.from_numpy(scales)))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("name", BACKENDS)
def test_int4_shortcut_gives_the_checking_kernels_bits(name, out_dtype):
    mod, rt = backend(name)
    packed, scales, zeros = ref.int4_quantize(tokens()[16:48], 32)  # 1e-20 to 1e20: scales >= 2^-99
    # A subnormal zero reads as 0: with a large scale the look lets it through, and the
    # shortcut must still read it as the spec does (q = 0 gives +0, not -1e-10).
    scales[0, 0], zeros[0, 0] = 1e30, 1e-40
    packed, scales, zeros = rt.from_numpy(packed), rt.from_numpy(scales), rt.from_numpy(zeros)
    assert bool(mod.int4_params_checked(scales, zeros))
    checking = rt.to_numpy(mod.int4_dequantize(packed, scales, zeros, 32, out_dtype))
    assert_same_bits(checking, rt.to_numpy(mod.int4_dequantize(packed, scales, zeros, 32, out_dtype, True)), "shortcut")


@pytest.mark.parametrize("bad_scale, bad_zero", [
    (np.nan, 1.0), (1.0, np.nan), (np.inf, 1.0), (1.0, -np.inf),
    (LOWEST_BINADE, 0.0), (LOWEST_BINADE, 1e-40),  # a subnormal zero reads as 0
    (2.0**-100, 1.0), (2.0**-90, 2.0**-40),
], ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_int4_look_refuses_parameters_that_matter(name, bad_scale, bad_zero):
    mod, rt = backend(name)
    scales, zeros = np.ones((4, 4), np.float32), np.full((4, 4), 7.5, np.float32)
    scales[1, 2], zeros[1, 2] = bad_scale, bad_zero
    assert not bool(mod.int4_params_checked(rt.from_numpy(scales), rt.from_numpy(zeros)))

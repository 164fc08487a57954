"""The constants and formats of docs/spec.md, checked against first principles."""
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from kvquant import _spec

SPEC = (Path(__file__).resolve().parents[1] / "docs" / "spec.md").read_text()


def rn_f32(q: Fraction) -> int:
    """Bits of the float32 nearest to q, ties to even, by exact rational arithmetic."""
    lo = np.float32(float(q))  # within an ulp; walk to the correctly rounded neighbour
    cands = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
    best = min(cands, key=lambda c: (abs(Fraction(float(c)) - q), int(np.array(c).view(np.uint32)) & 1))
    return int(np.array(best, np.float32).view(np.uint32))


@pytest.mark.parametrize("n, bits", [(448, _spec.R448_BITS), (127, _spec.R127_BITS), (15, _spec.R15_BITS)])
def test_reciprocal_constant_is_correctly_rounded(n, bits):
    assert rn_f32(Fraction(1, n)) == bits


@pytest.mark.parametrize("value, bits", [
    (2.0**-100, _spec.S_MIN_BITS), (1.0, _spec.ONE_BITS), (448.0, _spec.FP8_MAX_BITS),
    (127.0, _spec.INT8_MAX_BITS), (15.0, _spec.INT4_MAX_BITS), (2.0**-126, _spec.MIN_NORMAL_BITS),
    (2.0**-116, _spec.STATIC_SCALE_DAZ_BITS), (2.0**-125, _spec.PRODUCT_FLUSH_BITS),
    (2.0**-116, _spec.FP8_PLAIN_SCALE_BITS), (2.0**-99, _spec.INT4_PLAIN_SCALE_BITS),
    (2.0**-124, _spec.INT4_PLAIN_ZERO_PRODUCT_BITS),
])
def test_exact_constant_bits(value, bits):
    assert _spec.f32_bits(value) == bits


def test_plain_bounds_keep_every_product_at_or_above_the_flush():
    # docs/spec.md, section 8, items 7 and 8, in exact arithmetic.
    f = lambda bits: Fraction(_spec.f32_from_bits(bits))  # noqa: E731
    flush_bound = f(_spec.PRODUCT_FLUSH_BITS)
    smallest_e4m3 = Fraction(1, 2**9)
    assert smallest_e4m3 * f(_spec.FP8_PLAIN_SCALE_BITS) >= flush_bound
    assert smallest_e4m3 * f(_spec.FP8_PLAIN_SCALE_BITS - 1) < flush_bound  # and no lower bound would do
    # INT4, q >= 1: |q - zero| is 0 or at least 2^-24 (|zero| < 1) or 2^-23 (|zero| >= 1),
    # so with the smallest plain scale every nonzero value is at least 2^-123.
    assert Fraction(1, 2**24) * f(_spec.INT4_PLAIN_SCALE_BITS) >= flush_bound
    # q = 0: |zero * scale| >= 2^-124 rounds to at least 2^-124 > 2^-125.
    assert f(_spec.INT4_PLAIN_ZERO_PRODUCT_BITS) > flush_bound


def test_fp8_max_is_the_largest_finite_e4m3():
    assert float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max) == _spec.f32_from_bits(_spec.FP8_MAX_BITS)


@pytest.mark.parametrize("name", ["R448_BITS", "R127_BITS", "R15_BITS", "S_MIN_BITS", "FP8_MAX_BITS", "MIN_NORMAL_BITS", "NAN_BITS"])
def test_docs_table_matches_code(name):
    assert f"0x{getattr(_spec, name):08X}" in SPEC, f"docs/spec.md does not list {name} = 0x{getattr(_spec, name):08X}"


@pytest.mark.parametrize("dtype", sorted(_spec.NAN_BITS_BY_DTYPE))
def test_docs_name_every_canonical_nan(dtype):
    bits = _spec.NAN_BITS_BY_DTYPE[dtype]
    assert f"0x{bits:0{8 if dtype == 'float32' else 4}X}" in SPEC

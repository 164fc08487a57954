"""The reference against a literal transcription of the spec, and its fast encoder
against ml_dtypes."""
import threading
import time

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvquant.conformance import transcription
from conftest import assert_same_bits, check_e4m3_encoder
from kvquant.backends.numpy import kernels as ref
from kvquant.conformance.cases import Format, all_specs
from kvquant.conformance.runner import CALLER_PARAM_FLOORS, caller_param_inputs

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def both(fn, *args):
    with np.errstate(all="ignore"):
        return getattr(ref, fn)(*args), getattr(transcription, fn)(*args)


def check_all_formats(x):
    for fn, extra in [("fp8_quantize_per_token", ()), ("int8_quantize", ()), ("fp8_quantize_per_tensor", (None,)),
                      ("fp8_quantize_per_tensor", (0.125,)), ("fp8_quantize_per_tensor", (2.0**-122,)),
                      ("int4_quantize", (32,)), ("int4_quantize", (64,)), ("int4_quantize", (128,))]:
        got, want = both(fn, x, *extra)
        for name, g, w in zip(("codes", "scales", "zeros"), got, want):
            assert_same_bits(w, g, f"{fn}{extra} {name}")
        for out in ("float32", "float16", "bfloat16"):
            if fn.startswith("int4"):
                d = both("int4_dequantize", got[0], got[1], got[2], extra[0], out)
            elif fn.startswith("int8"):
                d = both("int8_dequantize", got[0], got[1][:, None], out)
            else:
                s = got[1].reshape(-1, 1) if got[1].ndim else got[1].reshape(1, 1)
                d = both("fp8_dequantize", got[0], s, out)
            assert_same_bits(d[1], d[0], f"{fn}{extra} dequant {out}")


special = st.sampled_from([0.0, -0.0, np.nan, np.inf, -np.inf, 2.0**-126, 2.0**-127, -2.0**-149, 448.0, 3.4e38, -3.4e38, 2.0**-100, 7.5, 0.5])


@settings(max_examples=60, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    tokens=st.integers(0, 9),
    head_dim=st.sampled_from([2, 64, 80, 96, 128, 256]),
    exponent=st.integers(-149, 127),
    seed=st.integers(0, 2**32 - 1),
    specials=st.lists(st.tuples(st.integers(0, 10**6), special), max_size=6),
)
def test_reference_equals_transcription_on_adversarial_inputs(dtype, tokens, head_dim, exponent, seed, specials):
    rng = np.random.default_rng(seed)
    x = np.clip(rng.standard_normal((tokens, head_dim)) * 2.0**exponent, -3.4e38, 3.4e38).astype(np.float32)
    for pos, value in specials:
        if x.size:
            x.reshape(-1)[pos % x.size] = value
    with np.errstate(all="ignore"):
        check_all_formats(x.astype(DTYPES[dtype]))


@pytest.mark.parametrize("rows", [1, 4095, 4096, 4097, 8200])
def test_chunk_boundaries_do_not_change_results(rows):
    # The reference works in row chunks (2 MiB: 4096 rows of 128 float32); results must
    # not depend on where a chunk ends.
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 128)).astype(np.float32)
    x[rows // 2] = np.nan
    check_all_formats(x)


def test_chunk_runs_finish_before_an_error_surfaces(monkeypatch):
    # The calling thread runs the first chunks itself; if one of them raises, the pool's
    # runs must be over before the caller sees the error, or they would still write
    # into outputs the caller has given up on.
    monkeypatch.setattr(ref, "_threads", 2)
    started, finished = threading.Event(), []

    def body(start, stop):
        if start == 0:
            started.wait(5)
            raise RuntimeError("first chunk")
        started.set()
        time.sleep(0.2)
        finished.append(start)

    with pytest.raises(RuntimeError, match="first chunk"):
        ref._each_chunk(4 * 4096, 128, body)
    assert finished == [2 * 4096, 3 * 4096]


def test_encoder_on_every_rounding_boundary():
    check_e4m3_encoder(ref.encode_e4m3)


def test_encoder_decoder_roundtrip_every_code():
    codes = np.array([c for c in range(256) if c not in (0x7F, 0xFF)], np.uint8)
    values = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    decoded = np.empty(codes.shape, np.float32)
    ref._decode_e4m3_into(codes, decoded)
    assert_same_bits(values, decoded, "decode")
    assert_same_bits(codes, ref.encode_e4m3(values), "encode")


@pytest.mark.exhaustive
def test_encoder_on_every_float32_up_to_448():
    check_e4m3_encoder(ref.encode_e4m3, every_float32=True)


@pytest.mark.parametrize("group_size", [2, 4, 64])
def test_group_min_max_from_integer_reductions_equals_float_min_max(group_size):
    # The reference reads group minima and maxima off integer reductions of the raw
    # bits; every sign mix (all negative, all non-negative, both), signed zeros,
    # infinities and NaNs of either sign must give what float min/max give, or a NaN.
    specials = np.array([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, np.inf, -np.inf, 1e-40, -1e-40, 3e38, -3e38], np.float32)
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001], np.uint32).view(np.float32)
    rng = np.random.default_rng(7)
    pool = np.concatenate([specials, nans, rng.standard_normal(16).astype(np.float32)])
    x = rng.choice(pool, size=(4096, 2 * group_size)).astype(np.float32)
    x[:64] = -np.abs(x[:64])  # all-negative groups, -0.0 and -NaN included
    x[64:128] = np.abs(x[64:128])
    mn, mx = ref._group_min_max(x, group_size)
    groups = x.reshape(len(x), -1, group_size)
    with np.errstate(invalid="ignore"):
        want_mn, want_mx = groups.min(axis=2), groups.max(axis=2)
    # A NaN shows in the minimum or the maximum (by its sign), which poisons the range.
    assert np.array_equal(np.isnan(mn) | np.isnan(mx), np.isnan(want_mn))
    clean = ~np.isnan(want_mn)
    for got, want in ((mn, want_mn), (mx, want_mx)):
        assert np.array_equal(got[clean], want[clean])  # +0 == -0: a zero's sign is the spec's to set


@pytest.mark.parametrize("spec", [s for s in all_specs(v11="sampled") if s.static_scale is None], ids=lambda s: s.label)
@pytest.mark.parametrize("floor", [None, *CALLER_PARAM_FLOORS], ids=lambda f: "any" if f is None else f"floor-0x{int(np.float32(f).view(np.uint32)):08x}")
def test_dequantize_equals_transcription_on_caller_parameters(spec, floor):
    # Quantize only ever stores scales >= 2^-100; a caller may hand in anything, and the
    # reference's skip-the-flush shortcuts, which decide from the smallest scale of a
    # call or a row, must still give the literal spec's bits (the conformance check
    # invariance/*/caller-params holds other backends to the reference on the same draws).
    inputs, _ = caller_param_inputs(spec, floor)
    for out in ("float32", "float16", "bfloat16"):
        if spec.info.has_zeros:
            got, want = both(f"{spec.info.kernel}_dequantize", *inputs, spec.group_size, out)
        else:
            codes, scales = inputs
            fn = "int8_dequantize" if spec.format is Format.INT8 else "fp8_dequantize"
            got, want = both(fn, codes, scales.reshape(-1, 1), out)
        assert_same_bits(want, got, f"{spec.label} dequant {out}")

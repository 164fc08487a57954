"""Every row of the bad-input list, on every built-in backend: a clear exception from
kvquant's own checks, never a bare IndexError/TypeError from deep inside a framework."""
import math

import numpy as np
import pytest

import kvquant

BACKENDS = ["numpy", "torch", "jax"]


@pytest.fixture(params=BACKENDS)
def ops(request):
    pytest.importorskip(request.param)
    return kvquant.get_backend(request.param)


def arr(ops, a):
    return ops.runtime.from_numpy(np.asarray(a))


def x2(ops, tokens=3, head_dim=64, dtype=np.float32):
    return arr(ops, np.random.default_rng(0).standard_normal((tokens, head_dim)).astype(dtype))


QUANTIZERS = [
    ("fp8", lambda o, x, t, d, **k: o.quantize_kv_fp8_per_token(x, t, d, **k)),
    ("fp8_tensor", lambda o, x, t, d, **k: o.quantize_kv_fp8_per_tensor(x, t, d, **k)),
    ("int8", lambda o, x, t, d, **k: o.quantize_kv_int8(x, t, d, **k)),
    ("int4", lambda o, x, t, d, **k: o.quantize_kv_int4(x, t, d, 64, **k)),
]
QIDS = [q[0] for q in QUANTIZERS]


def ours(excinfo):
    """The exception came from kvquant's checks, not from inside a framework."""
    tb = excinfo.traceback[-1]
    return "kvquant" in str(tb.path) or "main/kvquant" in str(tb.path)


@pytest.mark.parametrize("name, quant", QUANTIZERS, ids=QIDS)
@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint8])
def test_wrong_input_dtype_names_the_allowed_ones(ops, name, quant, dtype):
    x = arr(ops, np.ones((2, 64), dtype))
    if ops.runtime.dtype_name(x) == "float32":
        pytest.skip("JAX without x64 holds float64 data as float32")
    with pytest.raises(TypeError, match="float32, float16, bfloat16") as e:
        quant(ops, x, 2, 64)
    assert ours(e)


@pytest.mark.parametrize("name, quant", QUANTIZERS, ids=QIDS)
@pytest.mark.parametrize("shape", [(64,), ()])
def test_wrong_rank(ops, name, quant, shape):
    with pytest.raises(ValueError, match="rank 2"):
        quant(ops, arr(ops, np.ones(shape, np.float32)), 1, 64)


@pytest.mark.parametrize("name, quant", QUANTIZERS, ids=QIDS)
def test_num_tokens_disagrees(ops, name, quant):
    with pytest.raises(ValueError, match="num_tokens=4"):
        quant(ops, x2(ops), 4, 64)


@pytest.mark.parametrize("name, quant", QUANTIZERS, ids=QIDS)
def test_head_dim_disagrees(ops, name, quant):
    with pytest.raises(ValueError, match="head_dim=32"):
        quant(ops, x2(ops), 3, 32)


@pytest.mark.parametrize("name, quant", QUANTIZERS, ids=QIDS)
@pytest.mark.parametrize("bad", [3.0, True, "3", None])
def test_counts_must_be_ints(ops, name, quant, bad):
    with pytest.raises(TypeError, match="num_tokens must be an int"):
        quant(ops, x2(ops), bad, 64)


@pytest.mark.parametrize("name, quant", QUANTIZERS, ids=QIDS)
def test_unknown_on_nonfinite(ops, name, quant):
    with pytest.raises(ValueError, match="on_nonfinite"):
        quant(ops, x2(ops), 3, 64, on_nonfinite="ignore")


@pytest.mark.parametrize("name, quant", QUANTIZERS, ids=QIDS)
def test_not_an_array(ops, name, quant):
    with pytest.raises(TypeError, match="must be a"):
        quant(ops, [[1.0] * 64] * 3, 3, 64)


def test_odd_head_dim_for_int4(ops):
    with pytest.raises(ValueError, match="even"):
        ops.quantize_kv_int4(x2(ops, head_dim=63), 3, 63, 32)


@pytest.mark.parametrize("group", [16, 48, 256, 64.0, "64", True, None])
def test_unknown_group_size(ops, group):
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        ops.quantize_kv_int4(x2(ops), 3, 64, group)


def test_group_size_enum_and_int_agree(ops):
    a = ops.quantize_kv_int4(x2(ops), 3, 64, kvquant.Int4GroupSize.G32)
    b = ops.quantize_kv_int4(x2(ops), 3, 64, 32)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(ops.runtime.to_numpy(p).view(np.uint8), ops.runtime.to_numpy(q).view(np.uint8))


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf, -math.inf, 1e-39, 1e39, 2.0**-127])
def test_static_scale_must_be_finite_normal_positive(ops, scale):
    with pytest.raises(ValueError, match="static scale"):
        ops.quantize_kv_fp8_per_tensor(x2(ops), 3, 64, scale)


@pytest.mark.parametrize("scale", ["0.5", True, [0.5, 0.5]])
def test_static_scale_must_be_a_number(ops, scale):
    with pytest.raises(TypeError, match="static scale"):
        ops.quantize_kv_fp8_per_tensor(x2(ops), 3, 64, scale)


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        kvquant.quantize(np.ones((2, 64), np.float32), "int3")


def test_options_for_the_wrong_format():
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="group_size applies only to the grouped formats"):
        kvquant.quantize(x, "int8", group_size=32)
    with pytest.raises(ValueError, match="static scale applies only"):
        kvquant.quantize(x, "fp8", scale=1.0)


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_codes_of_wrong_dtype(ops, fmt):
    q = kvquant.quantize(x2(ops), fmt, backend=ops)
    wrong = arr(ops, np.zeros(ops.runtime.shape(q.codes), np.int16))
    deq = {"fp8": lambda: ops.dequantize_kv_fp8_per_token(wrong, q.scales, 3, 64),
           "int8": lambda: ops.dequantize_kv_int8(wrong, q.scales, 3, 64),
           "int4": lambda: ops.dequantize_kv_int4(wrong, q.scales, q.zeros, 3, 64)}[fmt]
    with pytest.raises(TypeError, match="codes must have dtype"):
        deq()


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_codes_of_wrong_shape(ops, fmt):
    q = kvquant.quantize(x2(ops), fmt, backend=ops)
    codes = ops.runtime.to_numpy(q.codes)
    wrong = ops.runtime.from_numpy(codes[:2])
    deq = {"fp8": lambda: ops.dequantize_kv_fp8_per_token(wrong, q.scales, 3, 64),
           "int8": lambda: ops.dequantize_kv_int8(wrong, q.scales, 3, 64),
           "int4": lambda: ops.dequantize_kv_int4(wrong, q.scales, q.zeros, 3, 64)}[fmt]
    with pytest.raises(ValueError, match="num_tokens=3"):
        deq()


@pytest.mark.parametrize("fmt", ["fp8", "fp8_per_tensor", "int8", "int4"])
@pytest.mark.parametrize("which", ["scales", "zeros"])
def test_params_of_wrong_shape_or_dtype(ops, fmt, which):
    if which == "zeros" and fmt != "int4":
        pytest.skip("only INT4 has zeros")
    q = kvquant.quantize(x2(ops), fmt, backend=ops)
    good = getattr(q, which)
    wrong_shape = arr(ops, np.ones((5,), np.float32))
    wrong_dtype = arr(ops, ops.runtime.to_numpy(good).astype(np.float16))
    for bad, exc, pattern in [(wrong_shape, ValueError, "has shape"), (wrong_dtype, TypeError, "float32")]:
        q_bad = kvquant.QuantizedKV(q.codes, bad if which == "scales" else q.scales, bad if which == "zeros" else q.zeros,
                                    q.format, q.group_size, q.shape, q.source_dtype, q.backend)
        with pytest.raises(exc, match=pattern):
            kvquant.dequantize(q_bad)


def test_flat_seed_layouts_are_accepted(ops):
    x = arr(ops, np.random.default_rng(1).standard_normal((2, 3, 4, 96)).astype(np.float32))
    q = kvquant.quantize(x, "int4", group_size=64)
    want = ops.runtime.to_numpy(kvquant.dequantize(q))
    flat_s = ops.runtime.reshape(q.scales, (24 * 2,))
    flat_z = ops.runtime.reshape(q.zeros, (24 * 2,))
    got = ops.runtime.to_numpy(ops.dequantize_kv_int4(q.codes, flat_s, flat_z, 24, 96, 64))
    np.testing.assert_array_equal(want.view(np.uint32), got.view(np.uint32))
    q8 = kvquant.quantize(x, "int8")
    got8 = ops.dequantize_kv_int8(q8.codes, ops.runtime.reshape(q8.scales, (24,)), 24, 96)
    np.testing.assert_array_equal(ops.runtime.to_numpy(kvquant.dequantize(q8)).view(np.uint32), ops.runtime.to_numpy(got8).view(np.uint32))


@pytest.mark.parametrize("dtype", ["int8", np.float64, "float8_e4m3fn"])
def test_bad_output_dtype(ops, dtype):
    q = kvquant.quantize(x2(ops), "int8", backend=ops)
    with pytest.raises(TypeError, match="output_dtype"):
        ops.dequantize_kv_int8(q.codes, q.scales, 3, 64, dtype)


def test_mixed_frameworks_rejected():
    torch = pytest.importorskip("torch")
    q = kvquant.quantize(np.ones((2, 64), np.float32), "int8")
    np_ops = kvquant.get_backend("numpy")
    with pytest.raises(TypeError, match="must be a numpy array"):
        np_ops.dequantize_kv_int8(q.codes, torch.from_numpy(q.scales), 2, 64)


def test_mixed_devices_rejected():
    torch = pytest.importorskip("torch")
    ops = kvquant.get_backend("torch")
    q = kvquant.quantize(torch.ones(2, 64), "int8")
    with pytest.raises(ValueError, match="kvquant never moves arrays between devices"):
        ops.dequantize_kv_int8(q.codes, q.scales.to("meta"), 2, 64)


@pytest.mark.parametrize("fmt", ["fp8", "fp8_per_tensor", "int8", "int4"])
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 3, 64)])
def test_zero_tokens_give_empty_arrays(ops, fmt, shape):
    x = arr(ops, np.zeros(shape, np.float32))
    q = kvquant.quantize(x, fmt)
    assert ops.runtime.shape(q.codes) == shape[:-1] + ((32,) if fmt == "int4" else (64,))
    out = kvquant.dequantize(q)
    assert ops.runtime.shape(out) == shape
    assert ops.runtime.is_array(out)


def test_dequantize_takes_a_record():
    with pytest.raises(TypeError, match="QuantizedKV"):
        kvquant.dequantize(np.ones((2, 64)))


def test_array_of_unknown_framework():
    with pytest.raises(TypeError, match="no kvquant backend accepts"):
        kvquant.quantize([[1.0] * 64], "int8")


def test_unknown_backend_name():
    with pytest.raises(kvquant.BackendNotFoundError, match="no kvquant backend named 'nope'"):
        kvquant.get_backend("nope")


# ------------------------------------------------- found when the API was audited
def test_masked_array_is_refused_not_silently_unmasked():
    x = np.ma.masked_array(np.ones((2, 64), np.float32), mask=np.eye(2, 64, dtype=bool))
    with pytest.raises(TypeError, match="masked arrays"):
        kvquant.quantize(x, "int8")


def test_sparse_tensor_is_refused_in_kvquant_words():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="sparse_coo tensors are not supported"):
        kvquant.quantize(torch.eye(64).to_sparse(), "int8")


@pytest.mark.parametrize("fmt", ["fp8", "fp8_per_tensor", "int8", "int4"])
def test_meta_tensors_give_shapes_without_reading_values(fmt):
    torch = pytest.importorskip("torch")
    q = kvquant.quantize(torch.empty(2, 3, 5, 64, device="meta"), fmt)
    out = kvquant.dequantize(q, torch.bfloat16)
    assert q.codes.device.type == "meta" and out.device.type == "meta"
    assert tuple(out.shape) == (2, 3, 5, 64) and out.dtype == torch.bfloat16


def test_quantized_kv_takes_its_format_by_name():
    q = kvquant.quantize(np.ones((2, 64), np.float32), "int8")
    named = kvquant.QuantizedKV(q.codes, q.scales, None, "int8", None, q.shape, "float32")
    assert named.format is kvquant.Format.INT8
    np.testing.assert_array_equal(kvquant.dequantize(named), kvquant.dequantize(q))
    with pytest.raises(ValueError, match="unknown format 'int9'"):
        kvquant.QuantizedKV(q.codes, q.scales, None, "int9", None, q.shape, "float32")


def test_rank_error_says_what_is_accepted(ops):
    with pytest.raises(ValueError, match=r"rank 2 or more .*any \[\.\.\., head_dim\]"):
        ops.quantize_kv_int8(arr(ops, np.ones((64,), np.float32)), 1, 64)


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_jax_grad_through_a_round_trip_is_zero_not_a_device_error(fmt):
    jax = pytest.importorskip("jax")
    x = jax.numpy.linspace(-1, 1, 4 * 64).reshape(4, 64)
    loss = lambda t: kvquant.dequantize(kvquant.quantize(t, fmt)).sum()  # noqa: E731
    assert float(jax.numpy.abs(jax.grad(loss)(x)).sum()) == 0.0  # quantization is cut from autodiff
    assert float(jax.numpy.abs(jax.jit(jax.grad(loss))(x)).sum()) == 0.0


def test_seed_group_size_enum_under_torch_compile():
    """The issue's own snippet: an Int4GroupSize member crashed dynamo (RecursionError)."""
    torch = pytest.importorskip("torch")
    ops = kvquant.get_backend("torch")
    g = kvquant.Int4GroupSize.G64
    f = torch.compile(lambda v: ops.quantize_kv_int4(v, 64, 128, g), fullgraph=True)
    x = torch.randn(64, 128)
    for got, want in zip(f(x), ops.quantize_kv_int4(x, 64, 128, 64)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("fmt", ["int4_per_channel", "int2_per_channel"])
def test_per_channel_needs_whole_blocks_of_tokens(fmt):
    x = np.ones((2, 4, 40, 64), np.float32)  # 40 tokens: not a multiple of 32
    with pytest.raises(ValueError, match=r"dimension -2\) of the input must be a multiple of 32, got shape \(2, 4, 40, 64\)"):
        kvquant.quantize(x, fmt, group_size=32)
    q = kvquant.quantize(x[:, :, :32], fmt, group_size=32)
    with pytest.raises(ValueError, match="scales has shape"):
        getattr(kvquant.get_backend("numpy"), f"dequantize_kv_{fmt}")(q.codes, q.scales[:, :, :0], q.zeros, 256, 64, 32)


def test_int2_needs_head_dim_a_multiple_of_four():
    with pytest.raises(ValueError, match="int2 packs 4 codes per byte, so head_dim must be a multiple of 4, got 66"):
        kvquant.quantize(np.ones((2, 66), np.float32), "int2")


def test_per_channel_raise_names_block_and_channel():
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 16)).astype(np.float32)
    x[1, 2, 40, 9] = np.inf
    with pytest.raises(kvquant.NonFiniteInputError) as info:
        kvquant.quantize(x, "int4_per_channel", group_size=32)
    assert info.value.index == (1, 2, 1, 9)
    assert "channel 9 of token block 1" in str(info.value)
